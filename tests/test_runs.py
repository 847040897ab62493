"""One command run in a VM of the pool (pool/runs.py), from the pool's events to the CLI.

The wait for a VM is timed under a fake clock with scripted VMs whose guests
never connect; the events and the retirement of the VM are checked on real
guests (the process driver), through the pool's call and through the real CLI
of a real supervisor whose VM is killed in the middle of a run.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import time
from pathlib import Path

import pytest
import trio
import trio.testing
from fireclaw.pool.drivers import ProcessDriver
from fireclaw.pool.group import RoleGroup
from fireclaw.pool.lifecycle import State
from fireclaw.pool.runs import (
    NotReady,
    RunEvent,
    RunExited,
    RunFailed,
    RunOutput,
    RunStarted,
    run_command,
)
from swarmctl import FIRECLAW, WAIT, idle, role_yaml, swarm_yaml
from test_supervision import ScriptedDriver, make_group

#: How long a run on a real guest may take here, boot included: a loaded machine's.
DEADLINE = 90.0
#: A command that runs until its guest is lost, and then ends by itself: its next
#: write goes to a pipe nobody reads. (Killed from outside, a process driver's
#: guest outside a cgroup cannot take along what it started in sessions of its own.)
TICKING = "echo started; while echo tick; do sleep 0.1; done"


async def test_a_run_waits_for_a_vm_as_long_as_one_may_boot(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    group = make_group(tmp_path, ScriptedDriver([]), "{}")  # guests never connect
    async with trio.open_nursery() as nursery:
        await nursery.start(group.run)
        started = trio.current_time()
        with pytest.raises(NotReady) as info, trio.fail_after(2000):
            async for _ in run_command(group, ["true"]):
                pass
        assert trio.current_time() - started == group.rt.control.boot_timeout == 1000
        assert str(info.value) == "no worker VM became ready within 1000s"
        nursery.cancel_scope.cancel()


def process_group(tmp_path: Path) -> RoleGroup:
    """A worker pool of real guests (the process driver), one VM at a time."""
    return make_group(tmp_path, ProcessDriver(), "{}")


async def test_a_run_yields_its_vm_its_output_and_its_exit_then_retires_the_vm(
    tmp_path: Path,
) -> None:
    group = process_group(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(group.run)
        with trio.fail_after(DEADLINE):
            script = "echo out; echo err >&2; exit 3"
            events = [e async for e in run_command(group, ["sh", "-c", script])]
            vm = events[0]
            assert isinstance(vm, RunStarted)
            child = group.children[vm.vm]
            output = {
                s: b"".join(e.data for e in events if isinstance(e, RunOutput) and e.stream == s)
                for s in ("stdout", "stderr")
            }
            assert output == {"stdout": b"out\n", "stderr": b"err\n"}
            assert events[-1] == RunExited(code=3)

            missing = [e async for e in run_command(group, ["/no/such/binary"])]
            assert isinstance(missing[0], RunStarted) and missing[0].vm != vm.vm
            (exited,) = missing[1:]
            assert isinstance(exited, RunExited) and exited.code == 127 and exited.error

            # Served once, then retired: stopped, never restarted, and out of the pool.
            await child.done.wait()
            assert (child.state, child.restarts) == (State.STOPPED, 0)
            assert group.children.get(vm.vm) is not child
        nursery.cancel_scope.cancel()


async def test_a_run_whose_vm_dies_ends_with_run_failed(tmp_path: Path) -> None:
    group = process_group(tmp_path)
    events: list[RunEvent] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(group.run)
        with trio.fail_after(DEADLINE):
            run = run_command(group, ["sh", "-c", TICKING])
            async with contextlib.aclosing(run):
                async for event in run:
                    events.append(event)
                    if isinstance(event, RunOutput) and len(events) == 2:  # its first output
                        assert isinstance(events[0], RunStarted)
                        pid = group.children[events[0].vm].pid
                        assert pid is not None
                        os.kill(pid, signal.SIGKILL)
        nursery.cancel_scope.cancel()
    output = events[1:-1]  # what the guest sent before it was killed
    assert output and all(isinstance(e, RunOutput) for e in output)
    assert b"".join(e.data for e in output if isinstance(e, RunOutput)).startswith(b"started\n")
    assert isinstance(events[-1], RunFailed)
    assert events[-1].reason and "\n" not in events[-1].reason


def test_a_vm_lost_mid_run_is_one_line_from_the_cli(make_swarm) -> None:  # type: ignore[no-untyped-def]
    swarm = make_swarm(swarm_yaml(role_yaml("worker", min_idle=1)))
    swarm.wait_for("an idle worker", idle("worker", 1))
    argv = [FIRECLAW, "--state-dir", str(swarm.state), "run", "--"]
    with subprocess.Popen(
        [*argv, "sh", "-c", TICKING],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as cli:
        assert cli.stdout is not None
        assert read_line(cli.stdout, WAIT) == b"started\n"
        (vm,) = [a for a in swarm.status()["agents"] if a["state"] == "active"]
        os.kill(vm["pid"], signal.SIGKILL)
        out, err = cli.communicate(timeout=WAIT)
    prefix = f"fireclaw-swarm: {vm['name']} was lost during the run: ".encode()
    assert cli.returncode == 1 and set(out.splitlines()) <= {b"tick"}
    assert err.startswith(prefix) and err.endswith(b"\n") and err.count(b"\n") == 1
    # The VM is not restarted: a claimed VM serves one run; the pool refills.
    swarm.wait_for("the pool refilled", lambda s: idle("worker", 1)(s) and len(s["agents"]) == 1)
    assert not [e for e in swarm.events("crashed") if e["subject"] == vm["name"]]


def read_line(stream: object, timeout: float) -> bytes:
    """One line of a child's pipe, or fail after ``timeout`` seconds."""
    fileno = stream.fileno()  # type: ignore[attr-defined]
    line = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fileno, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise AssertionError(f"no line within {timeout:g}s (so far {line!r})")
            chunk = os.read(fileno, 1)
            if not chunk:
                break
            line += chunk
    return line
