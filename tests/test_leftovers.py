"""``fireclaw-swarm doctor`` and ``gc``: finding and removing what a dead swarm left.

The root tests make real leftovers for a state dir of their own (a namespace,
a bridge with a veth and an nft table, a cgroup, a guest process, an overlay,
run dirs, a registry row), then drive the real CLI in a subprocess. They only
ever touch their own instance: ``gc --all`` would take other swarms' leftovers
on a shared host, so it is not run here.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from fireclaw.pool import cgroup, netns, network
from fireclaw.pool.network import Network
from fireclaw.pool.procid import ProcessIdentity, process_identity, still_running
from fireclaw.pool.runtime import instance_id
from fireclaw.supervisor import leftovers, pidfile
from fireclaw.supervisor.doctor import Report
from fireclaw.supervisor.ircd import render_config
from fireclaw.supervisor.leftovers import Leftovers, Owner, Process, ServiceProcess
from fireclaw.supervisor.state import ServiceRecord, Store, VmRecord
from swarmctl import FIRECLAW, Swarm, idle, role_yaml, swarm_yaml
from test_services import identity_of, running

CLI_DEADLINE = 60.0

needs_root = pytest.mark.skipif(
    netns.probe() is not None or cgroup.probe() is not None or shutil.which("nft") is None,
    reason=f"needs root with namespaces, cgroups and nft: {netns.probe() or cgroup.probe()}",
)


def config_text(subnet: str = "10.254.0.0/24") -> str:
    return swarm_yaml(role_yaml("worker", min_idle=1)) + f"network:\n  subnet: {subnet}\n"


async def cli(*argv: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(CLI_DEADLINE):
        return await trio.run_process(
            [FIRECLAW, *argv], capture_stdout=True, capture_stderr=True, check=False
        )


def text(done: subprocess.CompletedProcess[bytes]) -> str:
    return done.stdout.decode() + done.stderr.decode()


# ---------------------------------------------------------------- without root


def test_the_lock_holder_is_read_without_taking_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "supervisor.pid"
    assert pidfile.holder(path) is None  # no file
    with pidfile.PidLock(path):
        assert pidfile.holder(path) == os.getpid()
        assert leftovers.owner(tmp_path) == Owner("running", os.getpid())
    assert pidfile.holder(path) is None  # the file stays, the lock is gone
    assert leftovers.owner(tmp_path) == Owner("stopped")


def test_proc_locks_lines_are_matched_by_device_and_inode() -> None:
    locks = (
        "1: POSIX  ADVISORY  READ 20162 fe:00:2203792 128 128\n"
        "2: FLOCK  ADVISORY  WRITE 20179 fe:00:2146342 0 EOF\n"
        "2: -> FLOCK  ADVISORY  WRITE 20200 fe:00:2146342 0 EOF\n"
    )
    assert pidfile._flock_holder(locks, 0xFE, 0, 2146342) == 20179
    assert pidfile._flock_holder(locks, 0xFE, 0, 2203792) is None  # a POSIX lock
    assert pidfile._flock_holder(locks, 0xFE, 1, 2146342) is None


def report(
    supervisor: Owner, mine: Leftovers, others: dict[str, tuple[Owner, Leftovers]]
) -> Report:
    return Report(
        config=Path("/x/swarm.yaml"),
        state_dir=Path("/x/state"),
        instance="abc123",
        supervisor=supervisor,
        backend="process (configured)",
        accel="not probed yet",
        isolation="netns: no; cgroups: no",
        network="nft: yes; qemu-img: yes",
        mine=mine,
        others=others,
    )


def test_a_running_swarm_owns_its_resources_and_is_healthy() -> None:
    mine = Leftovers("abc123", netns=["fireclaw-abc123-worker-0-aaaaaa"])
    busy = Leftovers("def456", links=["fcdef456br"])
    r = report(Owner("running", 42), mine, {"def456": (Owner("running", 43), busy)})
    lines = r.lines()
    assert "leftovers     none: its 1 resources belong to the running supervisor (pid 42)" in lines
    assert "others        def456: running (pid 43), 1 resources in use" in lines
    assert not any("gc" in line for line in lines)
    assert r.exit_status == 0


def test_leftovers_of_a_stopped_swarm_and_of_unknown_ones_are_listed() -> None:
    proc = Process(pid=7, started=1.0, ppid=1, vm_id="abc123-worker-0-aaaaaa", command="sleep")
    mine = Leftovers("abc123", processes=[proc], disks=[Path("/x/state/disks/a.qcow2")])
    lost = Leftovers("def456", tables=["inet fireclaw_def456"])
    r = report(Owner("stopped"), mine, {"def456": (Owner("unknown"), lost)})
    lines = r.lines()
    assert lines[lines.index("leftovers     2 of this swarm:") + 1 :][:2] == [
        "              process 7 (sleep, vm abc123-worker-0-aaaaaa)",
        "              disk /x/state/disks/a.qcow2",
    ]
    assert "others        def456: supervisor not found, 1 left over:" in lines
    assert "                nft table inet fireclaw_def456" in lines
    assert "gc --all" in lines[-1]
    assert r.exit_status == 1
    # Only another swarm's leftovers: still not clean, and gc --all is the way.
    r = report(Owner("stopped"), Leftovers("abc123"), {"def456": (Owner("unknown"), lost)})
    assert r.exit_status == 1
    assert r.lines()[-1] == "run `fireclaw-swarm gc --all` to remove other swarms' leftovers"


def test_a_dead_swarm_s_services_are_listed_process_first_then_row() -> None:
    ident = ProcessIdentity(pid=9, start_time=5, boot_id="b")
    ngircd = ServiceProcess(
        service="ircd", ident=ident, ppid=1, command="ngircd", state_dir=Path("/x/state")
    )
    row = ServiceRecord(name="ircd", command="/usr/sbin/ngircd", pid=9, start_time=5, boot_id="b")
    mine = Leftovers("abc123", services=[ngircd], service_rows=[row])
    r = report(Owner("stopped"), mine, {})
    lines = r.lines()
    assert lines[lines.index("leftovers     2 of this swarm:") + 1 :][:2] == [
        "              process 9 (ngircd, service ircd of /x/state)",
        "              registry row service ircd (pid 9)",
    ]
    assert r.exit_status == 1


@pytest.mark.parametrize(
    ("argv", "state_dir"),
    [
        (["-n", "-f", "/srv/swarm/state/ircd/ngircd.conf"], Path("/srv/swarm/state")),
        (["-f", "/ircd/ngircd.conf"], Path("/")),
        (["-n", "-f", "state/ircd/ngircd.conf"], None),  # relative: nobody's for sure
        (["-n", "-f", "/etc/ngircd/ngircd.conf"], None),  # the Debian service
        (["-n", "-f", "/x/ircd/ngircd.conf.d"], None),
        ([], None),
    ],
)
def test_the_state_dir_is_read_from_the_command_line(
    argv: list[str], state_dir: Path | None
) -> None:
    assert leftovers._state_dir_named(argv, leftovers.SERVICES["ircd"].config) == state_dir


def test_a_service_left_running_is_found_by_row_and_by_name_and_removed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    inst = instance_id(state)
    with running(state) as proc, Store.open(state / "swarm.db") as store:
        ident = identity_of(proc)
        store.put_service(
            ServiceRecord(
                name="ircd",
                command="/usr/sbin/ngircd",
                pid=ident.pid,
                start_time=ident.start_time,
                boot_id=ident.boot_id,
            )
        )
        found = leftovers.find(state)
        assert [s.ident for s in found.services] == [ident]
        assert [r.pid for r in found.service_rows] == [ident.pid]
        # Known by name alone too (no state dir given): its command line names it.
        by_name = leftovers.find_all()[inst]
        assert by_name.state_dir is None and by_name.service_rows == []
        assert [str(s) for s in by_name.services] == [
            f"process {ident.pid} (ngircd, service ircd of {state})"
        ]
        # Its parent (pytest) is no supervisor: nobody is seen running it.
        assert inst not in leftovers.running_instances({inst: by_name})

        done = leftovers.remove(found)
        assert [str(r) for r in done] == [
            f"removed process {ident.pid} (ngircd, service ircd of {state})",
            f"removed registry row service ircd (pid {ident.pid})",
        ]
        assert proc.wait() == -signal.SIGTERM  # asked to stop first, not killed
        assert not still_running(ident)
        assert store.services() == []
        assert leftovers.find(state).items() == []


@pytest.mark.parametrize(
    ("config", "ours"),
    [
        (None, True),  # its state dir is gone: nobody else names that path
        ("managed", True),  # as the managed server's config is written
        ("[Global]\nName = irc.example.org\n", False),  # someone else's ngircd
    ],
)
def test_a_look_alike_path_is_not_taken_for_a_swarm_s(
    tmp_path: Path, config: str | None, ours: bool
) -> None:
    state = tmp_path / "state"
    conf = state / leftovers.SERVICES["ircd"].config
    conf.parent.mkdir(parents=True)
    if config == "managed":
        config = render_config(
            workdir=conf.parent,
            listen="127.0.0.1",
            port=6667,
            server_name="irc.fireclaw.local",
            network="fireclaw",
            password=None,
            max_nick_length=30,
        )
    if config is not None:
        conf.write_text(config)
    with running(state) as proc:
        found = leftovers.find_all().get(instance_id(state), Leftovers(""))
        assert [s.pid for s in found.services] == ([proc.pid] if ours else [])


async def test_a_bad_config_exits_78(tmp_path: Path) -> None:
    (tmp_path / "swarm.yaml").write_text("version: 1\nbackend: nonsense\nroles: {}\n")
    done = await cli("doctor", "--config", str(tmp_path / "swarm.yaml"))
    assert done.returncode == 78, text(done)
    assert done.stderr.decode().startswith("fireclaw-swarm: ")
    assert len(done.stderr.splitlines()) == 1


async def test_gc_with_nothing_left_says_so_and_creates_nothing(tmp_path: Path) -> None:
    state = tmp_path / "never-started"
    done = await cli("gc", "--state-dir", str(state))
    assert (done.returncode, done.stdout) == (0, b"nothing to remove\n"), text(done)
    assert not state.exists()


# ---------------------------------------------------------------- real leftovers


@dataclass
class Made:
    """What the test left behind for its state dir, as the CLI must show it."""

    state: Path
    instance: str
    config: Path
    proc: subprocess.Popen[bytes]
    items: list[str] = field(default_factory=list)


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process that looks like a process-driver guest of ``tmp_path/state``'s swarm."""
    inst = instance_id(tmp_path / "state")
    proc = subprocess.Popen(
        ["sleep", "600"],
        env=dict(os.environ, FIRECLAW_VM_ID=f"{inst}-x"),
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
async def made(tmp_path: Path, guest: subprocess.Popen[bytes]) -> AsyncIterator[Made]:
    state = tmp_path / "state"
    state.mkdir()
    inst = instance_id(state)
    proc = guest
    third = secrets.randbelow(250)
    config = tmp_path / "swarm.yaml"
    config.write_text(config_text(f"10.254.{third}.0/24"))
    lonely, attached = f"{netns.PREFIX}{inst}-lonely", f"{netns.PREFIX}{inst}-vm"
    net = Network(instance=inst, subnet=ipaddress.IPv4Network(f"10.254.{third}.0/24"), egress=False)
    tmp_run = Path(tempfile.mkdtemp(prefix=f"fireclaw-{inst}-x-"))
    cg: Path | None = None
    try:
        (await netns.create_with_listener(lonely)).close()
        await net.open()
        sock, link = await net.attach(attached)
        sock.close()
        cg = cgroup.create(f"{inst}-x", 64)
        (state / "disks").mkdir()
        (state / "disks" / f"{inst}-x.qcow2").write_bytes(b"")
        (state / "logs" / "run" / f"{inst}-x").mkdir(parents=True)
        ident = process_identity(proc.pid)
        assert ident is not None
        with Store.open(state / "swarm.db") as store:
            store.put_vm(
                VmRecord(
                    name="worker-0",
                    role="worker",
                    pid=proc.pid,
                    start_time=ident.start_time,
                    boot_id=ident.boot_id,
                    spec_hash="x",
                    netns=lonely,
                    cgroup=str(cg),
                )
            )
        yield Made(
            state=state,
            instance=inst,
            config=config,
            proc=proc,
            items=[
                f"process {proc.pid} (sleep, vm {inst}-x)",
                f"registry row worker-0 (pid {proc.pid})",
                f"cgroup {cg}",
                f"netns {attached}",
                f"netns {lonely}",
                f"link fc{inst}br",
                f"link {link.veth}",
                f"nft table inet fireclaw_{inst}",
                f"disk {state / 'disks' / f'{inst}-x.qcow2'}",
                f"run dir {state / 'logs' / 'run' / f'{inst}-x'}",
                f"run dir {tmp_run}",
            ],
        )
    finally:
        if cg is not None:
            cgroup.remove(cg)
        for name in (lonely, attached):
            netns.remove_sync(name)
        await net.close()
        shutil.rmtree(tmp_run, ignore_errors=True)


@needs_root
async def test_doctor_lists_what_a_dead_swarm_left_and_gc_removes_it(made: Made) -> None:
    found = leftovers.find(made.state)
    assert sorted(found.items()) == sorted(made.items)
    assert made.instance in leftovers.find_all()  # found by name alone, too

    doctor = await cli("doctor", "--config", str(made.config))
    out = doctor.stdout.decode()
    assert doctor.returncode == 1, text(doctor)
    assert "supervisor    not running" in out
    assert f"leftovers     {len(made.items)} of this swarm:" in out
    for item in made.items:
        assert f"              {item}\n" in out
    assert "run `fireclaw-swarm gc`" in out

    gc = await cli("gc", "--config", str(made.config))
    assert gc.returncode == 0, text(gc)
    lines = gc.stdout.decode().splitlines()
    assert sorted(lines[:-1]) == sorted(f"removed {item}" for item in made.items)
    assert lines[-1] == f"removed {len(made.items)} of {len(made.items)}"

    with trio.fail_after(10):
        assert await trio.to_thread.run_sync(made.proc.wait) == -signal.SIGKILL
    assert leftovers.find(made.state).items() == []
    assert netns.leftovers(f"{netns.PREFIX}{made.instance}-") == []
    assert network.host_links(made.instance) == []
    assert f"inet fireclaw_{made.instance}" not in network.tables()
    with Store.open(made.state / "swarm.db") as store:
        assert store.vms() == []

    doctor = await cli("doctor", "--config", str(made.config))
    out = doctor.stdout.decode()
    assert "leftovers     none" in out, out
    assert [line for line in out.splitlines() if made.instance in line] == [
        f"state dir     {made.state} (instance {made.instance})"
    ]
    # Clean unless other swarms on this (shared) host have left something.
    others_left = "left over:" in out or "problem" in out
    assert doctor.returncode == (1 if others_left else 0), text(doctor)


@pytest.fixture
def running_swarm(tmp_path: Path) -> Iterator[Swarm]:
    swarm = Swarm(tmp_path, config_text(f"10.254.{secrets.randbelow(250)}.0/24"))
    try:
        swarm.start()
        yield swarm
    finally:
        swarm.close()
    assert leftovers.find(swarm.state).items() == []  # a clean stop leaves nothing


@needs_root
async def test_gc_refuses_while_the_swarm_runs(running_swarm: Swarm) -> None:
    swarm = running_swarm
    await trio.to_thread.run_sync(swarm.wait_for, "an idle worker", idle("worker", 1))
    assert swarm.proc is not None
    pid = swarm.proc.pid

    gc = await cli("gc", "--config", str(swarm.config))
    assert gc.returncode == 1, text(gc)
    assert gc.stdout == b""
    (line,) = gc.stderr.decode().splitlines()
    assert line.startswith("fireclaw-swarm: the swarm of ") and f"(pid {pid})" in line
    assert len(swarm.agents()) == 1  # nothing of it was touched
    assert leftovers.running_instances()[instance_id(swarm.state)] == pid

    doctor = await cli("doctor", "--config", str(swarm.config))
    out = doctor.stdout.decode()
    assert f"supervisor    running (pid {pid})" in out, out
    assert f"belong to the running supervisor (pid {pid})" in out
