"""A real supervisor (process backend) whose state dir is a small tmpfs that the
test fills to the last byte: it keeps running and keeps its VMs, refuses new
tasks with one line and 507, holds a finished task's result until the disk has
room, and then takes tasks again by itself."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fireclaw.supervisor import ballast
from fireclaw.supervisor.client import ApiError
from fireclaw.supervisor.daemon import DB_NAME
from fireclaw.supervisor.state import Store, VmRecord
from smalldisk import fill_under, needs_root, tmpfs
from swarmctl import WAIT, Swarm, idle, pids, role_yaml, swarm_yaml

pytestmark = needs_root


@pytest.fixture
def small_state(tmp_path: Path) -> Iterator[Path]:
    """The state dir of ``make_swarm``'s swarm, on a 16 MiB tmpfs. Requested before
    ``make_swarm``, so it is unmounted only after the swarm has stopped."""
    with tmpfs(tmp_path / "state", 16) as state:
        yield state


def _notified(swarm: Swarm, pattern: str, timeout: float) -> str:
    """The first sd_notify ``STATUS=`` line matching ``pattern``, as it arrives."""
    assert swarm._notify is not None
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        swarm._notify.settimeout(min(left, 0.5))
        try:
            msg = swarm._notify.recv(4096).decode()
        except TimeoutError:
            continue
        for line in msg.split("\n"):
            if line.startswith("STATUS=") and re.search(pattern, line):
                return line
    raise AssertionError(f"no STATUS matching {pattern!r}; log:\n{swarm.tail()}")


def test_the_supervisor_survives_a_full_state_disk(
    small_state: Path, make_swarm: Callable[..., Swarm], tmp_path: Path
) -> None:
    gate, runs = tmp_path / "gate", tmp_path / "runs"
    # Each execution is noted; the task "held" finishes only once the gate exists.
    harness = (
        'harness: {kind: command, command: ["sh", "-c", '
        f'"echo $FIRECLAW_PROMPT >> {runs}; '
        f"if [ $FIRECLAW_PROMPT = held ]; then while [ ! -e {gate} ]; do sleep 0.05; done; fi; "
        'echo done: $FIRECLAW_PROMPT"]}\n'
    )
    # One active VM at most: "waiting" is claimed only once "held" is finished. Agent
    # work runs as root, so the harness sees the gate in the test's private directory.
    swarm = make_swarm(
        swarm_yaml(role_yaml("worker", min_idle=1, max_active=1, extra=harness)),
        env={"FIRECLAW_AGENT_USER": "root"},
    )
    assert swarm.proc is not None
    pid = swarm.proc.pid
    held = swarm.api.post("/tasks", {"role": "worker", "prompt": "held"})
    swarm.wait_for(
        "the held task claimed, the pool refilled",
        lambda st: st["tasks"]["claimed"] == 1 and idle("worker", 1)(st),
    )
    waiting = swarm.api.post("/tasks", {"role": "worker", "prompt": "waiting"})

    db = small_state / DB_NAME
    filler = fill_under(db)

    # A task is refused with one line (CLI) and 507 (API), not an internal error.
    out = swarm.cli("task", "worker", "after")
    assert out.returncode == 1
    assert out.stderr.decode() == (
        f"fireclaw-swarm: the state disk is full: task not accepted ({db})\n"
    )
    with pytest.raises(ApiError) as info:
        swarm.api.post("/tasks", {"role": "worker", "prompt": "after"})
    assert info.value.status == 507
    assert str(info.value) == f"the state disk is full: task not accepted ({db})"
    _notified(swarm, r"; state disk full: tasks refused, \d+ events dropped$", WAIT)

    # A VM that crashes meanwhile is replaced; its events and registry rows are dropped.
    ((idle_vm, idle_pid),) = [
        (n, p)
        for n, p in pids(swarm, "worker").items()
        if any(a["name"] == n and a["state"] == "idle" for a in swarm.agents("worker"))
    ]
    os.kill(idle_pid, signal.SIGKILL)
    swarm.wait_for(
        "the crashed VM replaced",
        lambda st: any(
            a["name"] == idle_vm and a["state"] == "idle" and a["pid"] not in (None, idle_pid)
            for a in st["agents"]
        ),
    )

    # The held task's VM finishes and goes; its result waits in memory for the disk,
    # and the next task's claim waits too, its VM not promoted.
    gate.touch()
    st = swarm.wait_for(
        "result and claim held, the pool refilled",
        lambda st: st["state"]["pending_writes"] == 2 and idle("worker", 1)(st),
    )
    assert st["pid"] == pid and swarm.proc.poll() is None
    assert st["state"]["writable"] is False and st["state"]["why"] == "full"
    assert st["state"]["dropped_events"] >= 1 and st["state"]["dropped_writes"] >= 1
    assert st["tasks"] == {
        "queued": 1,
        "claimed": 1,
        "waiting_for_input": 0,
        "done": 0,
        "failed": 0,
    }
    # The VM held for "waiting" is handed out but not promoted (no agent in it).
    held_for = [a for a in st["agents"] if a["state"] == "active"]
    assert len(held_for) == 1 and held_for[0]["agent"] is None
    out = swarm.cli("status")
    assert out.returncode == 0, out.stderr
    assert re.search(
        rb"^state disk full since \d\d:\d\d:\d\d: tasks refused, 2 task writes waiting, \d+ events"
        rb" dropped$",
        out.stdout,
        re.M,
    ), out.stdout
    assert runs.read_text().split() == ["held"]

    # Room again: the result is written, the same submission is accepted, both run once.
    filler.unlink()
    out = swarm.cli("task", "worker", "after")
    assert out.returncode == 0, out.stderr
    st = swarm.wait_for("every task done", lambda st: st["tasks"]["done"] == 3)
    assert st["pid"] == pid
    assert st["state"]["writable"] is True and st["state"]["pending_writes"] == 0
    for task in (held, waiting):
        row = swarm.api.get(f"/tasks/{task['id']}")
        assert (row["state"], row["attempts"]) == ("done", 0)
        assert row["result"].strip() == f"done: {task['prompt']}"
        done = [e for e in swarm.events("task_done") if e["detail"]["task_id"] == task["id"]]
        assert len(done) == 1
    assert sorted(runs.read_text().split()) == ["after", "held", "waiting"]
    _notified(swarm, r"^STATUS=\d+ idle, \d+ active, 0 failed$", WAIT)

    assert swarm.stop() == 0


def test_what_a_full_disk_kept_out_of_the_registry_is_reclaimed_after_kill_9(
    small_state: Path, make_swarm: Callable[..., Swarm]
) -> None:
    """The crash-only guarantee without registry rows: a VM started while the
    disk was full has none, and the next start still finds and removes it."""
    swarm = make_swarm(swarm_yaml(role_yaml("worker", min_idle=1)))
    swarm.wait_for("the pool full", idle("worker", 1))
    ((name, old_pid),) = pids(swarm, "worker").items()
    filler = fill_under(small_state / DB_NAME)
    os.kill(old_pid, signal.SIGKILL)
    st = swarm.wait_for(
        "a replacement started on the full disk",
        lambda st: any(
            a["name"] == name and a["state"] == "idle" and a["pid"] not in (None, old_pid)
            for a in st["agents"]
        ),
    )
    assert st["state"]["writable"] is False and st["state"]["dropped_writes"] >= 1
    swarm.kill9()
    filler.unlink()
    # The row left is the crashed incarnation's (its drop was refused too); what
    # is left running is the replacement's namespace, which no row names.
    (row,) = _registry(small_state)
    assert row.name == name and row.pid == old_pid
    left = swarm.leftovers()["netns"]
    assert left and row.netns not in left, left

    swarm.start()
    st = swarm.wait_for("the pool full again", idle("worker", 1))
    assert st["state"]["writable"] is True
    # make_swarm's teardown: nothing of either supervisor's VMs is left.


def test_a_restart_on_a_full_state_disk_runs_in_the_room_of_its_ballast(
    small_state: Path, make_swarm: Callable[..., Swarm]
) -> None:
    """A supervisor killed (or a host rebooted) once its state disk is full comes
    back with its fleet: the start releases the ballast an earlier start made,
    opens the database in its room and runs tasks; once the disk has room
    again, the next start makes the ballast again."""
    reserve = small_state / ballast.NAME
    swarm = make_swarm(swarm_yaml(role_yaml("worker", min_idle=1)))
    swarm.wait_for("the pool full", idle("worker", 1))
    size = ballast.size_for(shutil.disk_usage(small_state).total)
    assert reserve.stat().st_blocks * 512 >= size  # blocks held, not a sparse file
    swarm.kill9()
    filler = fill_under(small_state / DB_NAME)
    assert ballast.disk_full(small_state)

    swarm.start()
    swarm.wait_for("the pool full on a full disk", idle("worker", 1))
    assert not reserve.exists()
    assert f"its {size}-byte ballast was released to start" in swarm.tail(), swarm.tail()
    task = swarm.api.post("/tasks", {"role": "worker", "prompt": "after the restart"})
    swarm.wait_for("the task done", lambda st: st["tasks"]["done"] == 1)
    assert swarm.api.get(f"/tasks/{task['id']}")["state"] == "done"
    assert swarm.stop() == 0

    filler.unlink()
    swarm.start()
    swarm.wait_for("the pool full with room again", idle("worker", 1))
    assert reserve.stat().st_size == size


def _registry(state: Path) -> list[VmRecord]:
    with Store.open(state / DB_NAME) as store:
        return store.vms()
