"""The pieces of adoption on the host side, each on its own.

The pidfd watcher on real processes that are not the test's children; a
resuming guest's Hello and its held-back result over in-memory WebSockets
under trio's fake clock; the plan a restarted supervisor makes from a real
registry. The whole of it, on real VMs, is in ``test_qemu_swarm.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import trio
import trio.testing
import trio_websocket
from fireclaw.config import load_config, role_hash
from fireclaw.guest_daemon import protocol as p
from fireclaw.guest_daemon.channel import WsChannel
from fireclaw.pool import netns
from fireclaw.pool.control import ConnectionLost, ControlSession, GuestViolation, HeartbeatMissed
from fireclaw.pool.drivers.adopted import AdoptedProcess
from fireclaw.pool.drivers.base import DriverError, Running
from fireclaw.pool.drivers.qemu import QemuDriver
from fireclaw.pool.group import Adoptee
from fireclaw.pool.image import Image
from fireclaw.pool.procid import process_identity
from fireclaw.supervisor import leftovers
from fireclaw.supervisor.adoption import _sparing
from fireclaw.supervisor.daemon import Supervisor
from fireclaw.supervisor.state import AgentRecord, Store, VmRecord
from swarmctl import role_yaml, swarm_yaml
from test_control import SPEC, TOKEN, pair
from test_qemu import STEP_DEADLINE, TCG, _spec, image, needs_tools, no_leftovers

WAIT = 15.0  # a process dying and being reaped by init, on a loaded machine
__all__ = ["image", "no_leftovers"]  # fixtures, used by name


@pytest.fixture
def orphan() -> Iterator[int]:
    """A process that is not ours: started by a shell that exits at once, so it is
    reparented (to init or the nearest subreaper) like a VM whose supervisor died."""
    out = subprocess.run(
        ["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"],
        capture_output=True,
        check=True,
        text=True,
    )
    pid = int(out.stdout)
    try:
        yield pid
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def running(pid: int, **changes: object) -> Running:
    ident = process_identity(pid)
    assert ident is not None
    fields: dict[str, object] = {
        "pid": pid,
        "start_time": ident.start_time,
        "boot_id": ident.boot_id,
        "control_socket": Path("/nonexistent/qmp.sock"),
    }
    fields.update(changes)
    return Running(**fields)  # type: ignore[arg-type]


async def test_a_watched_orphan_wakes_every_waiter_when_it_dies(orphan: int) -> None:
    proc = AdoptedProcess.open(running(orphan))
    assert proc.pid == orphan and not proc.exited
    woken: list[str] = []

    async def waiter(name: str) -> None:
        await proc.wait()
        woken.append(name)

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter, "a")
            nursery.start_soon(waiter, "b")
            await trio.testing.wait_all_tasks_blocked()
            assert woken == []  # it runs
            proc.send_signal(signal.SIGKILL)
    assert sorted(woken) == ["a", "b"]
    assert proc.exited and proc.returncode is None  # not our child: its status is unknowable
    proc.send_signal(signal.SIGKILL)  # a no-op now: never another process with that pid
    proc.close()


async def test_a_cancelled_waiter_hands_the_watch_over(orphan: int) -> None:
    proc = AdoptedProcess.open(running(orphan))
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            first = trio.CancelScope()

            async def polling() -> None:
                with first:
                    await proc.wait()

            nursery.start_soon(polling)
            await trio.testing.wait_all_tasks_blocked()  # it polls the descriptor
            nursery.start_soon(proc.wait)  # this one waits for it to say
            await trio.testing.wait_all_tasks_blocked()
            first.cancel()  # the second takes the polling over
            await trio.testing.wait_all_tasks_blocked()
            assert not proc.exited
            proc.send_signal(signal.SIGKILL)
    assert first.cancelled_caught and proc.exited
    proc.close()


async def test_only_the_recorded_process_is_taken(orphan: int) -> None:
    ident = process_identity(orphan)
    assert ident is not None
    # The same pid, but another start time or another boot: another process.
    with pytest.raises(DriverError, match="not the VMM that was recorded"):
        AdoptedProcess.open(running(orphan, start_time=ident.start_time + 1))
    with pytest.raises(DriverError, match="not the VMM that was recorded"):
        AdoptedProcess.open(running(orphan, boot_id="another-boot"))
    fd = os.pidfd_open(orphan)
    try:
        os.kill(orphan, signal.SIGKILL)
        with trio.fail_after(WAIT):
            await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)
    # Dead (a zombie until its parent reaps it, then gone): never taken.
    with pytest.raises(DriverError, match="not the VMM that was recorded|is gone"):
        AdoptedProcess.open(running(orphan, start_time=ident.start_time))


# --- a resuming guest's Hello -------------------------------------------------------


async def resumed(
    nursery: trio.Nursery, resume: p.Resume | None
) -> tuple[ControlSession, trio_websocket.WebSocketConnection]:
    host, guest = await pair(nursery)
    hello = p.Hello(vm_id="w-0", token=TOKEN, version=p.PROTOCOL_VERSION, resume=resume)
    await guest.send_message(p.encode(hello))
    session = await ControlSession.handshake(WsChannel(host), vm_id="w-0", token=TOKEN, spec=SPEC)
    assert isinstance(p.decode_host(await guest.get_message()), p.Welcome)
    return session, guest


async def test_a_held_back_result_sent_first_thing_is_kept_for_its_task(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        session, guest = await resumed(nursery, p.Resume(agent="worker-1", tasks=[7, 8]))
        assert session.hello.resume == p.Resume(agent="worker-1", tasks=[7, 8])
        assert session.holds(7) and session.holds(8) and not session.holds(9)
        # The guest sends task 7's result right after the Welcome, before anyone asks.
        await guest.send_message(p.encode(p.TaskDone(task_id=7, code=0, output="seven")))
        nursery.start_soon(session.serve)
        await trio.sleep(3.0)
        assert await session.result(7) == p.TaskDone(task_id=7, code=0, output="seven")
        assert not session.holds(7)  # taken once
        # Task 8 is still running in the guest: its result comes later, heartbeats meanwhile.
        started = trio.current_time()

        async def guest_side() -> None:
            for seq in range(4):
                await trio.sleep(1.0)
                await guest.send_message(p.encode(p.Heartbeat(seq=seq)))
            await guest.send_message(p.encode(p.TaskDone(task_id=8, code=1, output="eight")))

        nursery.start_soon(guest_side)
        assert await session.result(8) == p.TaskDone(task_id=8, code=1, output="eight")
        assert trio.current_time() - started == pytest.approx(4.0)
        nursery.cancel_scope.cancel()


async def test_a_held_task_whose_guest_goes_quiet_is_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        session, _ = await resumed(nursery, p.Resume(agent="worker-1", tasks=[8]))

        async def serve() -> None:
            with pytest.raises(HeartbeatMissed):
                await session.serve()

        nursery.start_soon(serve)
        started = trio.current_time()
        with pytest.raises(ConnectionLost, match="no heartbeat for 5s"):
            await session.result(8)
        assert trio.current_time() - started == pytest.approx(SPEC.heartbeat_timeout)
        nursery.cancel_scope.cancel()


async def test_a_result_for_a_task_the_guest_did_not_say_it_holds_is_a_violation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        session, guest = await resumed(nursery, p.Resume(agent="worker-1", tasks=[8]))
        await guest.send_message(p.encode(p.TaskDone(task_id=9, code=0, output="")))
        with pytest.raises(GuestViolation, match="unknown task 9"):
            await session.serve()
        nursery.cancel_scope.cancel()


async def test_a_fresh_guest_holds_nothing(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        session, _ = await resumed(nursery, None)
        assert not session.holds(1)
        nursery.cancel_scope.cancel()


# --- the plan a restarted supervisor makes ----------------------------------------------


def test_only_qemu_vms_are_adopted(tmp_path: Path) -> None:
    """The process driver's guests end with their connection: a restarted
    supervisor on that backend adopts nothing, whatever its registry says."""
    config = tmp_path / "swarm.yaml"
    config.write_text(swarm_yaml(role_yaml("worker")))
    cfg = load_config(config)
    store = Store.open(tmp_path / "state" / "swarm.db")
    try:
        ident = process_identity(os.getpid())
        assert ident is not None
        store.put_vm(
            VmRecord(
                name="worker-0",
                role="worker",
                pid=os.getpid(),  # alive, and recorded as it is
                start_time=ident.start_time,
                boot_id=ident.boot_id,
                spec_hash=role_hash(cfg.roles["worker"]),
                socket="/x/qmp.sock",
                port=7000,
                guest_token="t" * 32,
                address="10.249.0.2",
            )
        )
        store.put_agent(AgentRecord(name="alice", role="worker"))
        supervisor = Supervisor(cfg, tmp_path / "state", store)
        assert supervisor.backend_choice.name == "process"
        assert supervisor.plan_adoption() == {}
    finally:
        store.close()


def _row(name: str, spec_hash: str, **changes: object) -> VmRecord:
    """A registry row of a VM that runs (this very test process stands in for it)."""
    ident = process_identity(os.getpid())
    assert ident is not None
    fields: dict[str, object] = {
        "name": name,
        "role": "worker",
        "pid": os.getpid(),
        "start_time": ident.start_time,
        "boot_id": ident.boot_id,
        "spec_hash": spec_hash,
        "netns": f"fireclaw-abc123-{name}-f00",
        "socket": f"/x/{name}/qmp.sock",
        "port": 7000,
        "guest_id": "abc123-tpl-0011-aa",
        "guest_token": "t" * 32,
        "veth": "fcabc123v0a1b2c",
        "address": "10.250.0.3",
    }
    fields.update(changes)
    return VmRecord(**fields)  # type: ignore[arg-type]


@pytest.mark.skipif(netns.probe() is not None, reason="qemu VMs need network namespaces")
def test_the_plan_adopts_what_runs_matches_and_has_work_or_none(tmp_path: Path) -> None:
    config = tmp_path / "swarm.yaml"
    config.write_text(
        swarm_yaml(role_yaml("worker"), backend="qemu", network="subnet: 10.250.0.0/24")
    )
    cfg = load_config(config)
    spec = role_hash(cfg.roles["worker"])
    store = Store.open(tmp_path / "state" / "swarm.db")
    try:
        store.put_agent(AgentRecord(name="alice", role="worker", model="m2"))
        runner = store.add_task("worker", "a job")
        assert store.claim_task("worker", "worker-5") is not None
        rows = [
            _row("worker-0", spec),  # idle
            _row("worker-1", spec, claimed=True, agent="alice", workspace=True),
            _row("worker-2", spec, claimed=True, agent="bob"),  # destroyed meanwhile
            _row("worker-3", spec, claimed=True),  # served a run: nothing to come back to
            _row("worker-4", "another spec"),  # its role changed
            _row("worker-5", spec, claimed=True),  # runs task ``runner``
            _row("worker-6", spec, start_time=1),  # its pid is another process now
            _row("worker-7", spec, port=0, guest_token=""),  # a row of before adoption
            _row("worker-8", spec, address="10.9.0.3"),  # the subnet changed
            _row("other-0", spec, role="gone"),  # its role was removed
        ]
        for row in rows:
            store.put_vm(row)
        supervisor = Supervisor(cfg, tmp_path / "state", store)
        plan = supervisor.plan_adoption()
        assert sorted(plan) == ["worker-0", "worker-1", "worker-5"]
        assert plan["worker-0"].agent is None and plan["worker-0"].task_id is None
        alice = plan["worker-1"].agent
        assert alice is not None and (alice.name, alice.model) == ("alice", "m2")
        assert plan["worker-5"].task_id == runner.id
    finally:
        store.close()


def test_the_sweep_of_leftovers_spares_what_is_adopted(tmp_path: Path) -> None:
    kept = _row(
        "worker-0",
        "h",
        pid=101,
        cgroup="/sys/fs/cgroup/fireclaw/abc123-worker-0-f00",
        disk=str(tmp_path / "disks" / "abc123-worker-0-f00.qcow2"),
        socket=str(tmp_path / "logs" / "run" / "abc123-worker-0-f00" / "qmp.sock"),
    )
    gone = _row(
        "worker-1", "h", pid=102, netns="fireclaw-abc123-worker-1-f11", veth="fcabc123v999999"
    )
    found = leftovers.Leftovers(
        "abc123",
        tmp_path,
        processes=[
            leftovers.Process(
                pid=101, started=1.0, ppid=1, vm_id="abc123-worker-0-f00", command="q"
            ),
            leftovers.Process(
                pid=102, started=1.0, ppid=1, vm_id="abc123-worker-1-f11", command="q"
            ),
        ],
        vms=[kept, gone],
        cgroups=[Path(kept.cgroup or ""), Path("/sys/fs/cgroup/fireclaw/abc123-worker-1-f11")],
        netns=[kept.netns or "", gone.netns or ""],
        links=["fcabc123br", kept.veth or "", gone.veth or ""],
        tables=["inet fireclaw_abc123"],
        disks=[Path(kept.disk or ""), tmp_path / "disks" / "abc123-worker-1-f11.qcow2"],
        run_dirs=[
            Path(kept.socket or "").parent,
            tmp_path / "logs" / "run" / "abc123-worker-1-f11",
        ],
    )
    left = _sparing(found, [Adoptee(kept)], "abc123")
    assert [p.pid for p in left.processes] == [102]
    assert left.vms == [gone]
    assert [c.name for c in left.cgroups] == ["abc123-worker-1-f11"]
    assert left.netns == [gone.netns]
    assert left.links == [gone.veth]  # the bridge and the rules stay with the adopted VM
    assert left.tables == []
    assert [d.name for d in left.disks] == ["abc123-worker-1-f11.qcow2"]
    assert [d.name for d in left.run_dirs] == ["abc123-worker-1-f11"]
    # Nothing adopted: everything goes.
    assert _sparing(found, [], "abc123") is found


# --- the qemu driver, on a real QEMU ------------------------------------------------------


@pytest.mark.image
@needs_tools
@pytest.mark.usefixtures("no_leftovers")
async def test_the_qemu_driver_adopts_a_running_vm_and_not_a_paused_one(
    image: Image, tmp_path: Path
) -> None:
    """Here the QEMU is this test's child (its supervisor is alive): the adopted
    handle still knows it only through its pidfd, as a later supervisor would."""
    driver = QemuDriver(image, TCG)
    spec = _spec(log_path=tmp_path / "logs" / "worker-0.log")
    vm = await driver.start(spec)
    try:
        ident = process_identity(vm.pid)
        assert ident is not None
        recorded = Running(
            pid=vm.pid,
            start_time=ident.start_time,
            boot_id=ident.boot_id,
            control_socket=vm.qmp_path,
        )
        with trio.fail_after(STEP_DEADLINE):
            await vm.pause()
            with pytest.raises(DriverError, match="the VM is paused, not running"):
                await driver.adopt(spec, recorded)
            await vm.resume()
            adopted = await driver.adopt(spec, recorded)
        assert adopted.pid == vm.pid and adopted.info()["adopted"] is True
        with pytest.raises(DriverError, match="not the VMM that was recorded"):
            await driver.adopt(spec, replace(recorded, start_time=ident.start_time + 1))
        with trio.fail_after(STEP_DEADLINE):
            await adopted.kill()  # through the pidfd, and waited for
            assert await adopted.wait() is None  # how it ended is not known to it
            assert await vm.wait() == -signal.SIGKILL  # its parent knows
        assert "unknowable" in adopted.exit_text()
    finally:
        with trio.CancelScope(shield=True):
            await vm.kill()
