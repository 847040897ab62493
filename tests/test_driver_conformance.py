"""Driver conformance: one set of tests that every VMM driver runs.

Each test is parametrised over the drivers (process, qemu, firecracker) and
checks what the pool relies on through the driver protocol alone: a driver
describes itself truthfully, boots a VM whose guest reaches the test (dials
in, or serves the channel device the test attaches to) and runs a command,
snapshots it and restores clones that are told apart, sees a killed VMM
through ``wait``, and leaves no process, file or namespace behind once a
VM is stopped. The VMs are real: the guest daemon as a subprocess, QEMU/TCG on
the real guest image, each in a network namespace of its own, on a tap the
way the pool attaches real VMs (``fireclaw.pool.network``), inside a cgroup
where the host has them. The test plays the supervisor's control listener.

A case skips, saying why, where the host cannot run the driver (the driver's
own ``describe().unavailable``: here Firecracker is not installed and this
host's KVM boots no stock guest, so its cases skip and no Firecracker VM has
run in them) or where the driver lacks the capability under test (its
``describe().why_not``).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import secrets
import shutil
import signal
import tempfile
import typing
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from functools import partial
from ipaddress import IPv4Network
from pathlib import Path

import psutil
import pytest
import trio
from fireclaw.guest_daemon.protocol import Hello
from fireclaw.pool import cgroup, netns
from fireclaw.pool.accel import choose_accel
from fireclaw.pool.drivers import QEMU_OVERHEAD_MIB, Choice
from fireclaw.pool.drivers.base import (
    CONTROL_PORT,
    Capability,
    ChannelKind,
    DiskFormat,
    Driver,
    DriverInfo,
    Unsupported,
    VmHandle,
    VmSpec,
    info_path,
)
from fireclaw.pool.drivers.firecracker import FirecrackerDriver, FirecrackerVm
from fireclaw.pool.drivers.firecracker_jail import OVERHEAD_MIB as FIRECRACKER_OVERHEAD_MIB
from fireclaw.pool.drivers.process import ProcessDriver, ProcessVm
from fireclaw.pool.drivers.qemu import QemuDriver, QemuVm
from fireclaw.pool.image import Image, ImageSpec, build_image
from fireclaw.pool.network import GATEWAY, TAP, Link, Network
from test_qemu import (  # the QEMU tests' image cache, deadlines and guest helper
    BOOT_DEADLINE,
    MEMORY_MIB,
    QEMU,
    STEP_DEADLINE,
    TCG,
    TEST_CACHE,
    Guest,
    _fake_image,
    guest_of,
)

DRIVERS = ("process", "qemu", "firecracker")
#: Each driver's classes, for the protocol check.
CLASSES = {
    "process": (ProcessDriver, ProcessVm),
    "qemu": (QemuDriver, QemuVm),
    "firecracker": (FirecrackerDriver, FirecrackerVm),
}
#: The channel each driver offers its guests.
CHANNEL = {
    "process": ChannelKind.DIALLED,
    "qemu": ChannelKind.VIRTIO_SERIAL,
    "firecracker": ChannelKind.DIALLED,
}
#: Each VM's own disk, as the pool makes it for the driver (None: no disks of its own).
DISK = {"process": None, "qemu": DiskFormat.QCOW2_OVERLAY, "firecracker": DiskFormat.RAW_COPY}
#: What a VMM needs above its guest's RAM in the VM's cgroup.
OVERHEAD_MIB = {"process": 0, "qemu": QEMU_OVERHEAD_MIB, "firecracker": FIRECRACKER_OVERHEAD_MIB}
#: A guest that is a host process starts in a second or two; a guest kernel under
#: TCG on a loaded 2-core host takes much longer (test_qemu's measure).
BOOT = {"process": STEP_DEADLINE, "qemu": BOOT_DEADLINE, "firecracker": BOOT_DEADLINE}
#: The bridge the tap-attached VMs of one test hang off: a /24 nothing else here uses.
SUBNET = "10.251.{}.0/24"


def _protocol_members(proto: type) -> list[str]:
    return sorted(
        {n for n in vars(proto) if not n.startswith("_")}
        | set(vars(proto).get("__annotations__", {}))
    )


# --- what every driver says of itself (no VM runs) -------------------------------------------


@pytest.mark.parametrize("name", DRIVERS)
def test_the_driver_describes_itself(name: str) -> None:
    """Every capability is either had or lacked with a reason, every line is one
    line, and the template key's inputs are plain data that name the driver's
    own identity."""
    driver: Driver = {
        "process": ProcessDriver(),
        "qemu": QemuDriver(_fake_image(), TCG),
        "firecracker": FirecrackerDriver(_fake_image(), firecracker="firecracker", jailer="jailer"),
    }[name]
    info = driver.describe()
    assert isinstance(info, DriverInfo) and info.name == driver.name == name
    assert info.capabilities | set(info.lacking) == set(Capability)
    assert not info.capabilities & set(info.lacking)
    for capability in Capability:
        if not info.can(capability):
            why = info.why_not(capability)
            assert why.startswith(f"the {name} driver cannot {capability.value}: ")
            assert "\n" not in why and not why.endswith(": ")
    assert info.unavailable is None or "\n" not in info.unavailable
    json.dumps(dict(info.key_inputs))  # hashed into template keys
    if name != "process":
        assert info.key_inputs["image"] == "k" * 64  # a snapshot is of one image
        assert info.root_disk == _fake_image().rootfs
    # QEMU opens a qcow2 overlay on the image; Firecracker opens raw files only.
    assert (info.disk if info.root_disk is not None else None) is DISK[name]
    # How the guest reaches its host: QEMU offers a port (test_qemu's clones use it);
    # the process and Firecracker guests dial.
    assert info.channel is CHANNEL[name]


@pytest.mark.parametrize("name", DRIVERS)
def test_the_driver_fits_the_protocol(name: str) -> None:
    """Every member the pool uses through the protocol is there, of the same kind
    (property, plain or async method) and with the same parameters."""
    for proto, impl in zip((Driver, VmHandle), CLASSES[name], strict=True):
        members = _protocol_members(proto)
        assert members, proto
        for member in members:
            want = inspect.getattr_static(proto, member, None)
            got = inspect.getattr_static(impl, member, None)
            if want is None:  # an annotated attribute, such as Driver.name
                assert isinstance(got, typing.get_type_hints(proto)[member]), (impl, member)
                continue
            assert got is not None, f"{impl.__name__} has no {member}"
            assert isinstance(got, property) == isinstance(want, property), (impl, member)
            if isinstance(want, property):
                continue
            assert inspect.iscoroutinefunction(got) == inspect.iscoroutinefunction(want), member
            params = [(p.name, p.kind) for p in inspect.signature(want).parameters.values()]
            assert [(p.name, p.kind) for p in inspect.signature(got).parameters.values()] == params


# --- real VMs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image() -> Image:
    if os.geteuid() != 0:
        pytest.skip("building the guest image needs root")
    if not all(shutil.which(t) for t in ("mmdebstrap", "mke2fs", "nsenter")):
        pytest.skip("building the guest image needs mmdebstrap, e2fsprogs and util-linux")
    return build_image(ImageSpec(), TEST_CACHE, progress=print)


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> Driver:
    """A driver this host can run, or a skip saying why not (the driver's own words)."""
    name: str = request.param
    if os.geteuid() != 0:
        pytest.skip("each VM runs in a network namespace of its own: needs root")
    image: Image = request.getfixturevalue("image") if name != "process" else _fake_image()
    if name == "qemu" and shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed")
    made: Driver
    if name == "process":
        made = ProcessDriver()
    elif name == "firecracker":
        made = FirecrackerDriver(
            image,
            firecracker=shutil.which("firecracker") or "firecracker",
            jailer=shutil.which("jailer") or "jailer",
        )
    else:
        accel = trio.run(partial(choose_accel, image, cache_path=TEST_CACHE / "accel.json"))
        made = QemuDriver(image, accel, qemu=QEMU)
    why = made.describe().unavailable
    if why is not None:
        pytest.skip(f"{name} cannot run here: {why}")
    return made


@pytest.fixture
def snapshots(driver: Driver) -> None:
    """Skips, with the driver's reason, where it cannot snapshot. (A fixture: a
    skip raised in a trio test loses its reason on the way out.)"""
    info = driver.describe()
    if not info.can(Capability.SNAPSHOT):
        pytest.skip(info.why_not(Capability.SNAPSHOT))


@pytest.fixture
def lacking(driver: Driver) -> set[Capability]:
    """What the driver cannot do; a skip where it can do everything."""
    missing = set(Capability) - driver.describe().capabilities
    if not missing:
        pytest.skip(f"the {driver.name} driver lacks no capability")
    return missing


@dataclass
class Seat:
    """Where one VM runs: its namespace (a tap in it for a real VM), its cgroup,
    and the test's control listener inside it."""

    ns_name: str
    listener: trio.SocketListener
    control_url: str
    tap: str | None
    cgroup: Path | None
    link: Link | None = None


@dataclass
class Host:
    """The namespaces, taps and cgroups one test made; ``close`` removes them all and
    checks that each namespace was empty of processes by then."""

    driver: Driver
    tmp_path: Path
    seats: list[Seat] = field(default_factory=list)
    network: Network | None = None

    @property
    def tapped(self) -> bool:
        return not isinstance(self.driver, ProcessDriver)

    async def seat(self, *, port: int = 0) -> Seat:
        ns_name = f"{netns.PREFIX}dc-{secrets.token_hex(3)}"
        cg = None
        if cgroup.probe() is None:
            limit = MEMORY_MIB + OVERHEAD_MIB[self.driver.name]
            cg = await trio.to_thread.run_sync(cgroup.create, ns_name, limit)
        if self.tapped:
            if self.network is None:
                self.network = Network(
                    instance=secrets.token_hex(3),
                    subnet=IPv4Network(SUBNET.format(secrets.randbelow(200) + 20)),
                    egress=False,
                )
                await self.network.open()
            sock, link = await self.network.attach(ns_name, port)
            url, tap = f"ws://{GATEWAY}:{sock.getsockname()[1]}/", TAP
        else:
            sock, link, tap = await netns.create_with_listener(ns_name), None, None
            if port:
                sock.close()
                sock = await netns.open_listener(ns_name, "127.0.0.1", port)
            url = f"ws://127.0.0.1:{sock.getsockname()[1]}/"
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        seat = Seat(ns_name, listener, url, tap, cg, link)
        self.seats.append(seat)
        return seat

    def spec(self, seat: Seat, name: str, **changes: object) -> VmSpec:
        fields: dict[str, object] = dict(
            vm_id=f"{name}-{secrets.token_hex(3)}",
            name=name,
            role="worker",
            vcpus=1,
            memory_mib=MEMORY_MIB,
            control_url=seat.control_url,
            token=secrets.token_urlsafe(16),
            netns=seat.ns_name,
            cgroup=seat.cgroup,
            log_path=self.tmp_path / "logs" / f"{name}.log",
            tap=seat.tap,
        )
        fields.update(changes)
        return VmSpec(**fields)  # type: ignore[arg-type]

    async def close(self) -> list[str]:
        """Remove everything; returns what was still running in a namespace."""
        busy = []
        for seat in self.seats:
            await seat.listener.aclose()
            busy += [f"{seat.ns_name}: pid {pid}" for pid in _pids_in(seat.ns_name)]
            if seat.link is not None and self.network is not None:
                await self.network.detach(seat.link)
            else:
                await netns.remove(seat.ns_name)
            if seat.cgroup is not None:
                await trio.to_thread.run_sync(cgroup.remove, seat.cgroup)
        if self.network is not None:
            await self.network.close()
        return busy


def _pids_in(ns_name: str) -> list[int]:
    """Processes whose network namespace is ``ns_name``."""
    try:
        inode = os.stat(netns.NETNS_DIR / ns_name).st_ino
    except FileNotFoundError:
        return []
    found = []
    for pid in psutil.pids():
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino == inode:
                found.append(pid)
        except OSError:
            continue  # gone meanwhile, or a kernel thread
    return found


@pytest.fixture
async def host(driver: Driver, tmp_path: Path) -> AsyncIterator[Host]:
    made = Host(driver, tmp_path)
    try:
        yield made
    finally:
        with trio.CancelScope(shield=True), trio.fail_after(STEP_DEADLINE * 2):
            busy = await made.close()
        names = {s.ns_name for s in made.seats}
        assert not names & set(netns.leftovers()), "a namespace of this test is left"
        assert busy == [], "a process was left in a VM's namespace"


@pytest.fixture
def nothing_left(tmp_path: Path) -> Iterator[None]:
    """After the test: no process of it runs and nothing but logs (and the
    snapshots the test asked for) is left in its directories."""
    yield
    ours = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(tmp_path) in arg for arg in proc.info["cmdline"] or []):
            ours.append(proc.pid)
    assert ours == []
    run = tmp_path / "logs" / "run"
    assert not run.exists() or list(run.iterdir()) == []
    left = [p for p in (tmp_path / "logs").glob("*") if p.suffix != ".log" and p != run]
    assert left == []


async def _booted(
    driver: Driver, spec: VmSpec, seat: Seat, nursery: trio.Nursery
) -> tuple[VmHandle, Guest]:
    """``spec`` booted; its guest has said Hello, as ``spec``, and been welcomed."""
    vm = await driver.start(spec)
    try:
        with trio.fail_after(BOOT[driver.name]):
            guest = await guest_of(driver, vm, nursery, seat.listener)
            hello = await guest.recv()
    except BaseException:
        with trio.CancelScope(shield=True), trio.move_on_after(STEP_DEADLINE):
            await vm.kill()
        raise
    assert isinstance(hello, Hello) and (hello.vm_id, hello.token) == (spec.vm_id, spec.token)
    await guest.welcome(heartbeat_interval=0.2, hostname=spec.name)
    return vm, guest


async def _stop(vm: VmHandle, grace: float = STEP_DEADLINE) -> int | None:
    """The pool's stop: TERM, a grace period, then KILL and reap (which releases
    what the driver made for the VM)."""
    vm.terminate()
    code: int | None = None
    with trio.move_on_after(grace):
        code = await vm.wait()
    with trio.fail_after(STEP_DEADLINE):
        await vm.kill()
    return code


@pytest.mark.usefixtures("nothing_left")
async def test_boot_run_and_stop_leaves_nothing(
    driver: Driver, host: Host, nursery: trio.Nursery
) -> None:
    """A booted VM's guest runs commands; stopped, its VMM exits cleanly, and every
    process it ran (one that left its session too) goes with it."""
    seat = await host.seat()
    vm, guest = await _booted(driver, host.spec(seat, "worker-0"), seat, nursery)
    watched: list[int] = []  # pidfds of the other processes in the VM's cgroup
    try:
        out, code = await guest.run(1, ["sh", "-c", "echo conformance; echo $((6 * 7))"])
        assert (code, out.split()) == (0, ["conformance", "42"])
        if seat.cgroup is not None:
            # A child that leaves the guest's session and process group: only the
            # cgroup still knows it belongs to this VM (for a guest that is a host
            # process; inside a real VM it is the guest kernel's).
            out, code = await guest.run(
                2, ["sh", "-c", "setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $!"]
            )
            assert code == 0 and out.strip().isdigit()
            in_group = await trio.to_thread.run_sync(cgroup.pids, seat.cgroup)
            assert vm.pid in in_group
            watched = _pidfds(pid for pid in in_group if pid != vm.pid)
        if driver.describe().can(Capability.PAUSE):
            with trio.fail_after(STEP_DEADLINE):
                await vm.pause()
                await vm.resume()
            out, code = await guest.run(3, ["echo", "resumed"])
            assert (code, out) == (0, "resumed\n")
        assert await _stop(vm) == 0
        assert not psutil.pid_exists(vm.pid)
        with trio.fail_after(STEP_DEADLINE):
            for fd in watched:  # readable once that process has exited
                await trio.lowlevel.wait_readable(fd)
        if seat.cgroup is not None:
            assert await trio.to_thread.run_sync(cgroup.pids, seat.cgroup) == []
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(STEP_DEADLINE):
            await vm.kill()
        for fd in watched:
            os.close(fd)


def _pidfds(pids: typing.Iterable[int]) -> list[int]:
    """A pidfd for each of ``pids`` still running."""
    fds = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fds.append(os.pidfd_open(pid))
    return fds


@pytest.mark.usefixtures("nothing_left")
async def test_a_killed_vmm_is_seen_by_wait(driver: Driver, host: Host) -> None:
    """``kill -9`` of the VMM from outside (a crash) ends ``wait`` with the signal,
    and a ``kill`` after that is harmless and still releases everything."""
    seat = await host.seat()
    vm = await driver.start(host.spec(seat, "worker-0"))
    try:
        waited: list[int | None] = []
        with trio.fail_after(STEP_DEADLINE):
            async with trio.open_nursery() as nursery:

                async def wait() -> None:
                    waited.append(await vm.wait())

                nursery.start_soon(wait)
                await trio.testing.wait_all_tasks_blocked()
                assert waited == []  # it runs
                os.kill(vm.pid, signal.SIGKILL)
        assert waited == [-signal.SIGKILL]
        assert "exited with code -9" in vm.exit_text()
        with trio.fail_after(STEP_DEADLINE):
            await vm.kill()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(STEP_DEADLINE):
            await vm.kill()


@pytest.mark.usefixtures("nothing_left")
async def test_a_driver_without_a_capability_says_so_when_asked(
    driver: Driver, lacking: set[Capability], host: Host, tmp_path: Path
) -> None:
    """Each call a driver cannot serve raises ``Unsupported`` with the very line its
    ``describe`` gives, and the VM runs on unharmed."""
    info = driver.describe()
    seat = await host.seat()
    spec = host.spec(seat, "worker-0")
    vm = await driver.start(spec)
    try:
        calls = {
            Capability.SNAPSHOT: [
                lambda: vm.snapshot(tmp_path / "none.snap"),
                lambda: driver.restore(spec, tmp_path / "none.snap"),
            ],
            Capability.PAUSE: [vm.pause, vm.resume],
            Capability.WORKSPACE: [lambda: vm.attach_workspace(tmp_path / "ws.img")],
        }
        for capability in lacking:
            for call in calls[capability]:
                with pytest.raises(Unsupported) as raised:
                    await call()
                assert str(raised.value) == info.why_not(capability)
        assert vm.exit_text().endswith("is running")
        assert not await trio.Path(tmp_path / "none.snap").exists()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(STEP_DEADLINE):
            await _stop(vm, grace=STEP_DEADLINE / 2)


async def _entropy(guest: Guest, req: int) -> str:
    out, code = await guest.run(req, ["sh", "-c", "head -c 16 /dev/urandom | od -An -tx1"])
    assert code == 0 and len(out.split()) == 16, out
    return out


@pytest.mark.usefixtures("snapshots", "nothing_left")
async def test_clones_restored_from_one_snapshot_are_told_apart(
    driver: Driver, host: Host, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A snapshot of a parked guest restores into clones, each in its own namespace
    on the same port: each says Hello as the template, then takes its own name and
    fresh entropy from its own Welcome."""
    seat = await host.seat(port=CONTROL_PORT)
    template_spec = host.spec(seat, "template")
    vms: list[VmHandle] = []
    try:
        template, guest = await _booted(driver, template_spec, seat, nursery)
        vms.append(template)
        await guest.recv(heartbeats=True)  # parked and beating
        with trio.fail_after(STEP_DEADLINE * 2):
            taken = await template.snapshot(tmp_path / "template.snap")
        print(f"{driver.name}: snapshot {taken.size / 2**20:.1f} MiB in {taken.seconds:.2f} s")
        assert taken.path.is_file() and info_path(taken.path).is_file()
        with trio.fail_after(STEP_DEADLINE):
            await template.kill()

        clones: list[tuple[VmHandle, Guest, Seat]] = []
        for n in range(2):
            clone_seat = await host.seat(port=CONTROL_PORT)
            spec = host.spec(clone_seat, f"clone-{n}")
            with trio.fail_after(BOOT[driver.name]):
                clone = await driver.restore(spec, taken.path)
                vms.append(clone)
                clone_guest = await guest_of(driver, clone, nursery, clone_seat.listener)
                hello = await clone_guest.recv()
            # A clone is its template: the identity it was booted with.
            assert isinstance(hello, Hello)
            assert (hello.vm_id, hello.token) == (template_spec.vm_id, template_spec.token)
            await clone_guest.welcome(heartbeat_interval=0.2, hostname=spec.name)
            clones.append((clone, clone_guest, clone_seat))

        (a, guest_a, seat_a), (b, guest_b, seat_b) = clones
        assert a.pid != b.pid and a.pid in _pids_in(seat_a.ns_name)
        assert b.pid in _pids_in(seat_b.ns_name)
        assert await _entropy(guest_a, 1) != await _entropy(guest_b, 1)
        names = [(await g.run(2, ["hostname"]))[0].strip() for g in (guest_a, guest_b)]
        assert names == ["clone-0", "clone-1"]
        for clone in (a, b):
            assert await _stop(clone) == 0
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(STEP_DEADLINE):
            for vm in vms:
                await vm.kill()


@pytest.mark.parametrize(
    "driver_class", [ProcessDriver, QemuDriver, FirecrackerDriver], ids=lambda c: c.name
)
def test_the_backend_choice_knows_before_the_driver_exists_whether_its_vms_outlive_it(
    driver_class: type[ProcessDriver | QemuDriver | FirecrackerDriver],
) -> None:
    """Adoption is planned before the driver is made: the choice must agree with it."""
    choice = Choice(name=driver_class.name, reason="test", auto=False)  # type: ignore[arg-type]
    assert choice.outlives_supervisor is driver_class.outlives_supervisor


@pytest.mark.usefixtures("nothing_left")
async def test_a_process_guest_killed_leaves_no_agent_folder_in_the_temp_dir(
    driver: Driver, host: Host
) -> None:
    """A process guest's agent folder is named for its VM (``AgentDir``); a guest
    killed before it removes it has the driver remove it once the guest is gone."""
    if driver.name != "process":
        pytest.skip("only a process guest makes its folders in the host's temp dir")
    seat = await host.seat()
    spec = host.spec(seat, "worker-0")
    vm = await driver.start(spec)
    folder = Path(tempfile.mkdtemp(prefix=f"fireclaw-{spec.vm_id}-nobody-"))
    other = Path(tempfile.mkdtemp(prefix=f"fireclaw-{spec.vm_id}x-nobody-"))  # not its own
    try:
        (folder / "work").write_text("left by the agent")
        os.kill(vm.pid, signal.SIGKILL)
        with trio.fail_after(STEP_DEADLINE):
            assert await vm.wait() == -signal.SIGKILL
        assert not await trio.Path(folder).exists()
        assert await trio.Path(other).exists()
    finally:
        shutil.rmtree(other, ignore_errors=True)
        with trio.CancelScope(shield=True), trio.move_on_after(STEP_DEADLINE):
            await vm.kill()
