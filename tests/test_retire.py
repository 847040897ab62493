"""A VM whose work is done stops after the VMs booting beside it are up, not
while they boot; timed under a fake clock with scripted VMs (test_supervision's).
That the stop leaves nothing behind on real VMs is test_qemu_swarm's."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing
from fireclaw.pool.group import RETIRE_WAIT
from test_supervision import ScriptedDriver, make_group, wait_until


class Booting:
    """Something holding a boot slot, as a VM being restored does."""


async def test_a_finished_vm_stops_once_the_boot_beside_it_is_up(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    driver = ScriptedDriver([None])
    group = make_group(tmp_path, driver, "{backoff: {base: 100, max: 100}}")
    rt = group.rt
    async with trio.open_nursery() as nursery:
        await nursery.start(group.run)
        await wait_until(group, lambda: len(driver.starts) == 1)
        (child,) = group.children.values()
        child._boot_done()  # as if its guest said Hello
        restoring = Booting()
        await rt.boots.acquire_on_behalf_of(restoring)
        start = trio.current_time()
        group.retire(child, "run finished", done=True)
        group.retire(child, "run finished", done=True)  # once is enough
        await trio.sleep(1.0)
        assert not child.stopping and not driver.vms[0].gone.is_set()
        rt.boots.release_on_behalf_of(restoring)
        rt.bump()  # the restored VM is ready
        with trio.fail_after(RETIRE_WAIT):
            await child.done.wait()
        assert trio.current_time() - start == 1.0
        assert driver.vms[0].gone.is_set()
        nursery.cancel_scope.cancel()


async def test_a_finished_vm_waits_for_a_long_boot_only_so_long(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    driver = ScriptedDriver([None])
    group = make_group(tmp_path, driver, "{backoff: {base: 100, max: 100}}")
    async with trio.open_nursery() as nursery:
        await nursery.start(group.run)
        await wait_until(group, lambda: len(driver.starts) == 1)
        (child,) = group.children.values()
        child._boot_done()
        await group.rt.boots.acquire_on_behalf_of(Booting())  # a cold boot: never up here
        start = trio.current_time()
        group.retire(child, "run finished", done=True)
        await child.done.wait()
        assert trio.current_time() - start == RETIRE_WAIT
        nursery.cancel_scope.cancel()


async def test_a_vm_retired_for_another_reason_stops_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    driver = ScriptedDriver([None])
    group = make_group(tmp_path, driver, "{backoff: {base: 100, max: 100}}")
    async with trio.open_nursery() as nursery:
        await nursery.start(group.run)
        await wait_until(group, lambda: len(driver.starts) == 1)
        (child,) = group.children.values()
        child._boot_done()
        await group.rt.boots.acquire_on_behalf_of(Booting())
        start = trio.current_time()
        group.retire(child, "database lost")
        await child.done.wait()
        assert trio.current_time() == start
        nursery.cancel_scope.cancel()
