"""The restart loop of a pool child, timed exactly under a fake clock.

The VMs here are scripted in memory (a driver whose "VMM" exits when the script
says), so that backoff, the circuit breaker and resets can be checked to the
virtual millisecond. Real processes are exercised in test_swarm.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from fireclaw.config import parse_config
from fireclaw.pool.drivers.base import VmSpec
from fireclaw.pool.group import RoleGroup
from fireclaw.pool.lifecycle import State
from fireclaw.pool.runtime import Runtime
from fireclaw.supervisor.state import Store


class ScriptedVm:
    def __init__(self, code: int | None) -> None:
        self.code = code
        self.gone = trio.Event()
        self.killed = False
        self.on_kill: Callable[[], None] = lambda: None

    @property
    def pid(self) -> int:
        return 4242

    @property
    def control_socket(self) -> None:
        return None

    async def wait(self) -> int:
        if self.code is not None:
            return self.code
        await self.gone.wait()
        return -9

    def terminate(self) -> None:
        self.gone.set()

    async def kill(self) -> None:
        self.on_kill()
        self.killed = True
        self.gone.set()

    def info(self) -> dict[str, object]:
        return {}


class ScriptedDriver:
    """Each start pops the next exit code (None: runs until killed)."""

    name = "scripted"

    def __init__(self, codes: list[int | None]) -> None:
        self.codes = codes
        self.starts: list[float] = []
        self.vms: list[ScriptedVm] = []

    async def start(self, spec: VmSpec) -> ScriptedVm:
        self.starts.append(trio.current_time())
        vm = ScriptedVm(self.codes.pop(0) if self.codes else None)
        self.vms.append(vm)
        return vm


def make_group(tmp_path: Path, driver: ScriptedDriver, restart: str) -> RoleGroup:
    config = parse_config(
        "version: 1\ncontrol: {boot_timeout: 1000}\n"
        "roles:\n  worker:\n    pool: {min_idle: 1, max_active: 1}\n"
        "    harness: {command: ['true']}\n"  # no model server here
        f"    restart: {restart}\n",
        path=tmp_path / "swarm.yaml",
    )
    rt = Runtime(
        driver=driver,
        store=Store.open(tmp_path / "db"),
        state_dir=tmp_path,
        control=config.control,
        stop=config.stop,
        isolate_net=False,
        use_cgroups=False,
        uniform=lambda lo, hi: hi,  # the top of the jitter range: exact delays
    )
    return RoleGroup(config.roles["worker"], rt, max_attempts=3, scale=None)


def _any_in(group: RoleGroup, state: State) -> bool:
    return any(c.state is state for c in group.children.values())


async def wait_until(group: RoleGroup, pred: Callable[[], bool]) -> None:
    while not pred():
        await group.wait_changed()


async def test_backoff_doubles_then_the_circuit_opens(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    driver = ScriptedDriver([1, 1, 1, 1, 1])
    group = make_group(
        tmp_path,
        driver,
        "{max_restarts: 3, window: 600, stable_after: 10, backoff: {base: 0.5, max: 1.5}}",
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(group.run)
        with trio.fail_after(60):
            await wait_until(
                group, lambda: any(c.state is State.FAILED for c in group.children.values())
            )
        # Crash at once each time; delays 0.5, 1.0, then capped at 1.5; the 4th crash opens it.
        t0 = driver.starts[0]
        assert [round(t - t0, 3) for t in driver.starts] == [0.0, 0.5, 1.5, 3.0]
        (child,) = group.children.values()
        assert child.restarts == 3
        assert "not restarted" in child.reason
        assert group.degraded  # its only pool child failed
        assert group.rt.store.restart_count("worker-0") == 3
        # Failed means failed: no further start, however long we wait.
        await trio.sleep(3600)
        assert len(driver.starts) == 4
        # A reset brings it back (the next scripted VM stays up).
        group.reset()
        await wait_until(group, lambda: len(driver.starts) == 5)
        assert child.state is State.RESTORING
        nursery.cancel_scope.cancel()


async def test_a_crash_after_a_stable_run_restarts_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    driver = ScriptedDriver([None])
    group = make_group(tmp_path, driver, "{stable_after: 10, backoff: {base: 5, max: 60}}")
    async with trio.open_nursery() as nursery:
        await nursery.start(group.run)
        await wait_until(group, lambda: len(driver.starts) == 1)
        (child,) = group.children.values()
        child.tracker.ready(trio.current_time())  # as if the guest said hello
        await trio.sleep(30)  # a long good run
        driver.vms[0].gone.set()  # then the VMM dies
        await wait_until(group, lambda: len(driver.starts) == 2)
        assert driver.starts[1] - driver.starts[0] == pytest.approx(30.0)
        nursery.cancel_scope.cancel()


async def test_temporary_children_are_not_restarted(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    driver = ScriptedDriver([1])
    group = make_group(tmp_path, driver, "{policy: 'no'}")
    async with trio.open_nursery() as nursery:
        await nursery.start(group.run)
        await wait_until(
            group, lambda: any(c.state is State.FAILED for c in group.children.values())
        )
        await trio.sleep(3600)
        assert len(driver.starts) == 1
        nursery.cancel_scope.cancel()


async def test_stop_during_backoff_ends_the_child_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    driver = ScriptedDriver([1])
    group = make_group(tmp_path, driver, "{backoff: {base: 100, max: 100}}")
    async with trio.open_nursery() as nursery:
        await nursery.start(group.run)
        await wait_until(
            group, lambda: any(c.state is State.BACKOFF for c in group.children.values())
        )
        start = trio.current_time()
        await group.stop_all("test")
        assert trio.current_time() == start  # the 100 s wait was cut, not waited out
        assert not group.children


async def test_a_dead_vmm_shows_as_crashed_while_its_vm_is_torn_down(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Between the VMM's exit and the end of the teardown (netns, cgroup, disk)
    the child has no VM: it must not be shown as restoring, idle or active."""
    driver = ScriptedDriver([None])
    group = make_group(tmp_path, driver, "{backoff: {base: 100, max: 100}}")
    async with trio.open_nursery() as nursery:
        await nursery.start(group.run)
        await wait_until(group, lambda: len(driver.starts) == 1)
        (child,) = group.children.values()
        seen: list[tuple[State, int | None]] = []
        driver.vms[0].on_kill = lambda: seen.append((child.state, child.pid))
        driver.vms[0].gone.set()
        await wait_until(group, lambda: child.state is State.BACKOFF)
        assert seen == [(State.CRASHED, None)]
        nursery.cancel_scope.cancel()
