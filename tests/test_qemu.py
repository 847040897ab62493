"""The qemu driver and the accelerator choice.

Pure functions (command lines, URLs, the cpuinfo parser) directly; then real
QEMU on the real guest image (built once into ~/.cache/fireclaw/test-images,
shared with test_image.py), each VM in a network namespace of its own, with
the test playing the supervisor's control listener for the real guest daemon.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import psutil
import pytest
import trio
import trio_websocket
from fireclaw.config import ControlSpec
from fireclaw.guest_daemon import workspace as guest_workspace
from fireclaw.guest_daemon.channel import Channel, ChannelClosed, FramedChannel, WsChannel
from fireclaw.guest_daemon.protocol import (
    MAX_FRAME_BYTES,
    Attach,
    Exited,
    Goodbye,
    GuestMessage,
    Heartbeat,
    Hello,
    HostMessage,
    Output,
    Run,
    Stop,
    Welcome,
    decode_guest,
    encode,
)
from fireclaw.pool import accel as accel_mod
from fireclaw.pool import cgroup, netns
from fireclaw.pool.accel import (
    Accel,
    ProbeFailure,
    accel_argv,
    choose_accel,
    probe_argv,
    probe_boot,
    tsc_khz,
)
from fireclaw.pool.channel import attach
from fireclaw.pool.control import ConnectionLost
from fireclaw.pool.drivers import choose as choose_backend
from fireclaw.pool.drivers.base import (
    WORKSPACE_BYTES,
    WORKSPACE_SERIAL,
    ChannelKind,
    Driver,
    DriverError,
    VmHandle,
    VmSpec,
    info_path,
)
from fireclaw.pool.drivers.qemu import QemuDriver, QemuVm
from fireclaw.pool.drivers.qemu_argv import (
    CHANNEL_SOCKET,
    CONTROL_PORT_NAME,
    QMP_SOCKET,
    RUN_DIR_SOCKETS,
    guest_control_url,
    kernel_cmdline,
    make_run_dir,
    qemu_argv,
)
from fireclaw.pool.drivers.spawn import in_netns
from fireclaw.pool.image import Image, ImageSpec, build_image
from fireclaw.pool.qmp import open_qmp
from msgspec.structs import replace

TEST_CACHE = Path.home() / ".cache" / "fireclaw" / "test-images"
QEMU = "qemu-system-x86_64"
TOKEN = "qemu-t0ken-0123456789"
BOOT_DEADLINE = 90.0  # TCG on a possibly loaded 2-core host
STEP_DEADLINE = 30.0
MEMORY_MIB = 256

TCG = Accel("tcg", "test")


def _spec(**changes: object) -> VmSpec:
    fields: dict[str, object] = dict(
        vm_id="worker-0-abc123",
        name="worker-0",
        role="worker",
        vcpus=1,
        memory_mib=MEMORY_MIB,
        control_url="ws://127.0.0.1:7000/",
        token=TOKEN,
        netns=None,
        cgroup=None,
        log_path=Path("/var/lib/fireclaw/logs/worker-0.log"),
    )
    fields.update(changes)
    return VmSpec(**fields)  # type: ignore[arg-type]


def _fake_image(directory: Path = Path("/images/k")) -> Image:
    return Image(
        key="k" * 64,
        directory=directory,
        vmlinux=directory / "vmlinux",
        initramfs=directory / "initramfs.cpio.gz",
        rootfs=directory / "rootfs.ext4",
        kernel_release="6.1.0-test",
    )


# --- pure functions ---------------------------------------------------------------------


def test_guest_control_url_names_the_namespace_loopback() -> None:
    assert guest_control_url("ws://127.0.0.1:7000/") == "ws://10.0.2.2:7000/"
    assert guest_control_url("ws://localhost:41234") == "ws://10.0.2.2:41234/"
    assert guest_control_url("wss://127.0.0.1:9/ctl") == "wss://10.0.2.2:9/ctl"
    for bad in ("ws://10.1.2.3:7000/", "http://127.0.0.1:7000/", "ws://127.0.0.1/", "ws://[::1"):
        with pytest.raises(DriverError, match="control url") as info:
            guest_control_url(bad)
        assert "\n" not in str(info.value)


def test_kernel_cmdline() -> None:
    base = "console=ttyS0 panic=-1 root=/dev/vda ro"
    line = kernel_cmdline(base, _spec(), TCG, tsc_khz=2596148, port=CONTROL_PORT_NAME)
    assert line == (
        f"{base} fireclaw.port=fireclaw.control fireclaw.vm_id=worker-0-abc123"
        f" fireclaw.token={TOKEN} fireclaw.ip=10.0.2.15/24 fireclaw.gw=10.0.2.2 loglevel=4"
        " fireclaw.hostname=worker-0 tsc_early_khz=2596148"
    )
    # A guest with no port to serve (Firecracker's) dials the URL instead.
    dials = kernel_cmdline(base, _spec(), TCG, tsc_khz=None)
    assert "fireclaw.url=ws://10.0.2.2:7000/" in dials and "fireclaw.port" not in dials
    assert QemuDriver(_fake_image(), TCG).cmdline(_spec()).count("fireclaw.port=") == 1
    kvm = kernel_cmdline(base, _spec(name="Not_A_Hostname"), Accel("kvm", ""), tsc_khz=2596148)
    assert "tsc_early_khz" not in kvm and "fireclaw.hostname" not in kvm
    assert "tsc_early_khz" not in kernel_cmdline(base, _spec(), TCG, tsc_khz=None)
    with pytest.raises(DriverError, match="cannot hold blanks"):
        kernel_cmdline(base, _spec(vm_id="a b"), TCG, tsc_khz=None)


def test_qemu_argv() -> None:
    image = _fake_image(Path("/images/with,comma"))
    argv = qemu_argv(
        QEMU,
        image,
        TCG,
        vcpus=2,
        memory_mib=384,
        cmdline="console=ttyS0 x=1",
        log_path=Path("/logs/w.log"),
        qmp_fd=7,
        control_fd=8,
    )
    pairs = list(zip(argv[1::2], argv[2::2], strict=False))
    assert argv[0] == QEMU
    assert ("-accel", "tcg") in pairs and ("-cpu", "max") in pairs
    assert ("-M", "microvm,x-option-roms=off,rtc=on") in pairs
    assert ("-m", "384") in pairs and ("-smp", "2") in pairs
    assert {"-nodefaults", "-no-user-config", "-nographic", "-no-reboot"} <= set(argv)
    assert ("-append", "console=ttyS0 x=1") in pairs
    assert ("-kernel", "/images/with,comma/vmlinux") in pairs  # a plain argument: no escaping
    drive = argv[argv.index("-drive") + 1]
    assert drive == "file=/images/with,,comma/rootfs.ext4,if=none,format=raw,readonly=on,id=root"
    assert "virtio-blk-device,drive=root" in argv
    assert "user,id=n0,net=10.0.2.0/24,host=10.0.2.2" in argv
    assert "virtio-net-device,netdev=n0" in argv
    assert "file,id=console,path=/logs/w.log,append=on" in argv
    assert "socket,id=qmp,fd=7,server=on,wait=off" in argv
    # The control port: QEMU takes the connection already queued on it as it starts.
    assert "socket,id=control,fd=8,server=on,wait=on" in argv
    assert f"virtserialport,chardev=control,name={CONTROL_PORT_NAME}" in argv
    assert "-incoming" not in argv
    incoming = qemu_argv(
        QEMU, image, Accel("kvm", ""), vcpus=1, memory_mib=256, cmdline="c",
        log_path=Path("/l"), qmp_fd=7, control_fd=8, incoming=True,
    )  # fmt: skip
    assert incoming[-2:] == ["-incoming", "defer"]
    assert accel_argv(Accel("kvm", "")) == ["-accel", "kvm", "-cpu", "host"]
    assert in_netns(["qemu"], "fireclaw-x") == [
        "nsenter", "--net=/run/netns/fireclaw-x", "--", "qemu",
    ]  # fmt: skip
    assert in_netns(["qemu"], None) == ["qemu"]


def test_qemu_argv_on_a_tap_with_its_own_disk_and_a_spare() -> None:
    argv = qemu_argv(
        QEMU, _fake_image(Path("/images/i")), TCG, vcpus=1, memory_mib=256, cmdline="c",
        log_path=Path("/l"), qmp_fd=7, control_fd=8, tap="tap0", disk=Path("/d/vm.qcow2"),
    )  # fmt: skip
    assert "file=/d/vm.qcow2,if=none,format=qcow2,id=root,discard=unmap" in argv
    assert "tap,id=n0,ifname=tap0,script=no,downscript=no" in argv
    spare = f"virtio-blk-device,drive=ws,serial={WORKSPACE_SERIAL}"
    # The root disk comes first, then the spare the guest finds by its serial.
    assert argv.index("virtio-blk-device,drive=root") < argv.index(spare)
    assert f"size={WORKSPACE_BYTES}," in argv[argv.index(spare) - 4]
    # The guest looks for the serial the driver gives.
    assert guest_workspace.SERIAL == WORKSPACE_SERIAL
    cmdline = kernel_cmdline(
        "base", _spec(control_url="ws://172.16.0.1:7000/", tap="tap0", disk=Path("/d")), TCG,
        tsc_khz=None,
    )  # fmt: skip
    assert "fireclaw.url=ws://172.16.0.1:7000/" in cmdline
    assert "fireclaw.ip=172.16.0.2/30 fireclaw.gw=172.16.0.1 rw" in cmdline
    with pytest.raises(DriverError, match="a guest on a tap dials"):
        guest_control_url("ws://127.0.0.1:7000/", tap=True)


def test_run_dir_falls_back_when_the_socket_path_would_be_too_long(tmp_path: Path) -> None:
    short = make_run_dir(_spec(log_path=tmp_path / "w.log"))
    assert short == tmp_path / "run" / "worker-0-abc123" and short.is_dir()
    # Deep enough that "qmp.sock" would still fit but the control port's socket not.
    base = tmp_path / "run" / "worker-0-abc123"
    pad = 107 - len(os.fsencode(base / QMP_SOCKET)) - 1
    deep = tmp_path / ("d" * pad)
    assert len(os.fsencode(deep / "run" / "worker-0-abc123" / QMP_SOCKET)) <= 107
    assert len(os.fsencode(deep / "run" / "worker-0-abc123" / CHANNEL_SOCKET)) > 107
    for log_dir in (deep, tmp_path / ("d" * 100)):
        fallback = make_run_dir(_spec(log_path=log_dir / "w.log"))
        try:
            assert fallback.parent == Path(tempfile.gettempdir())
            for name in RUN_DIR_SOCKETS:
                assert len(os.fsencode(fallback / name)) <= 107
            assert fallback.stat().st_mode & 0o777 == 0o700
        finally:
            shutil.rmtree(fallback)


def test_the_driver_is_the_backend_the_config_names(tmp_path: Path) -> None:
    driver: Driver = QemuDriver(_fake_image(), TCG)  # checked by mypy
    assert driver.name == choose_backend("qemu", images=tmp_path, netns_why=None).name


def test_probe_gives_the_kernel_its_parameters_before_init_arguments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kernel passes every word after ``--`` to init unparsed: a TSC rate there is
    never seen, and a TCG probe on a busy host stalls in PIT calibration."""
    monkeypatch.setattr(accel_mod, "host_tsc_khz", lambda: 2596148)
    argv = probe_argv(_fake_image(), QEMU, TCG)
    append = argv[argv.index("-append") + 1]
    kernel, sep, init = append.partition(" -- ")
    assert sep and "--" not in kernel.split()
    assert kernel.split() == [
        "console=ttyS0", "panic=-1", "quiet", "loglevel=1", "rdinit=/bin/busybox",
        "tsc_early_khz=2596148",
    ]  # fmt: skip
    assert init.startswith("sh -c ") and "=" not in init.replace("$((6*7))", "")
    kvm = probe_argv(_fake_image(), QEMU, Accel("kvm", ""))
    assert "tsc_early_khz" not in kvm[kvm.index("-append") + 1]
    monkeypatch.setattr(accel_mod, "host_tsc_khz", lambda: None)
    unknown = probe_argv(_fake_image(), QEMU, TCG)
    assert "tsc_early_khz" not in unknown[unknown.index("-append") + 1]


def test_tsc_khz_from_cpuinfo() -> None:
    assert tsc_khz("processor\t: 0\ncpu MHz\t\t: 2596.148\ncache size\t: 1 KB\n") == 2596148
    assert tsc_khz("processor\t: 0\n") is None
    assert tsc_khz("cpu MHz\t\t: fast\n") is None


needs_qemu = pytest.mark.skipif(shutil.which(QEMU) is None, reason="qemu-system-x86 not installed")


@needs_qemu
async def test_cached_accel_answer_is_not_probed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not accel_mod.KVM_DEVICE.exists() or not os.access(accel_mod.KVM_DEVICE, os.R_OK | os.W_OK):
        with trio.fail_after(STEP_DEADLINE):
            chosen = await choose_accel(_fake_image(), cache_path=tmp_path / "accel.json")
        assert chosen.name == "tcg" and "/dev/kvm" in chosen.reason
        return
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(b"not booted")
    image = replace(_fake_image(tmp_path), vmlinux=vmlinux)
    cache = tmp_path / "accel.json"
    calls: list[Accel] = []

    async def fake_probe(image: Image, qemu: str, accel: Accel) -> ProbeFailure | None:
        calls.append(accel)
        return ProbeFailure("qemu exited with 1: no kvm", conclusive=True)

    monkeypatch.setattr(accel_mod, "probe_boot", fake_probe)
    with trio.fail_after(STEP_DEADLINE):
        first = await choose_accel(image, cache_path=cache)
        second = await choose_accel(image, cache_path=cache)
    assert first == second == Accel("tcg", "kvm: qemu exited with 1: no kvm; using tcg")
    assert [a.name for a in calls] == ["kvm"]
    os.utime(vmlinux, ns=(0, 12345))  # another kernel file: probed again
    with trio.fail_after(STEP_DEADLINE):
        await choose_accel(image, cache_path=cache)
    assert len(calls) == 2
    cache.write_text("{damaged")
    with trio.fail_after(STEP_DEADLINE):
        await choose_accel(image, cache_path=cache)
    assert len(calls) == 3


@needs_qemu
async def test_a_probe_that_only_ran_out_of_time_is_probed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KVM probe timing out on a busy host must not send every VM to TCG for good:
    only ``PROBE_TIMEOUTS`` timeouts in a row settle it. The probe boot is a fake
    here; the real one is run by the tests below."""
    device = tmp_path / "kvm"
    device.write_bytes(b"")
    monkeypatch.setattr(accel_mod, "KVM_DEVICE", device)
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(b"not booted")
    image = replace(_fake_image(tmp_path), vmlinux=vmlinux)
    cache = tmp_path / "accel.json"
    slow = ProbeFailure("no console output within 10s", conclusive=False)
    outcomes: list[ProbeFailure | None] = [slow, slow, None, slow, slow, slow]
    calls = 0

    async def fake_probe(image: Image, qemu: str, accel: Accel) -> ProbeFailure | None:
        nonlocal calls
        calls += 1
        return outcomes.pop(0)

    async def start() -> Accel:
        with trio.fail_after(STEP_DEADLINE):
            return await choose_accel(image, cache_path=cache)

    monkeypatch.setattr(accel_mod, "probe_boot", fake_probe)
    assert accel_mod.PROBE_TIMEOUTS == 3
    first = await start()
    assert first.name == "tcg" and first.reason == (
        "kvm: no console output within 10s; using tcg"
        " (timeout 1 of 3, probing again at the next start)"
    )
    assert "timeout 2 of 3" in (await start()).reason
    assert (await start()).name == "kvm"  # the host was only busy
    assert (await start()).name == "kvm" and calls == 3  # a success is kept
    os.utime(vmlinux, ns=(0, 12345))  # another kernel file: probed afresh
    assert [(await start()).name for _ in range(3)] == ["tcg"] * 3
    settled = await start()
    assert settled.reason == (
        "kvm: no console output within 10s; using tcg (timed out 3 starts in a row)"
    )
    assert calls == 6 and outcomes == []


def _fake_qemu(path: Path, script: str) -> str:
    """An executable standing in for QEMU: ``script`` run by /bin/sh."""
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return str(path)


async def test_probe_failures_say_whether_they_are_conclusive(tmp_path: Path) -> None:
    """A fake QEMU as a real subprocess: an error while it keeps running (KVM's emulation
    failure pauses the guest and QEMU lives on) is an answer; silence is only a timeout."""
    image = _fake_image(tmp_path)
    stuck = _fake_qemu(
        tmp_path / "stuck-qemu",
        'echo "$0: KVM internal error. Suberror: 1" >&2; echo "emulation failure" >&2;'
        " sleep 600 & wait",
    )
    silent = _fake_qemu(tmp_path / "silent-qemu", "sleep 600 & wait")
    exits = _fake_qemu(tmp_path / "exiting-qemu", 'echo "$0: -accel kvm: no kvm" >&2; exit 1')
    with trio.fail_after(STEP_DEADLINE):
        assert await probe_boot(image, stuck, TCG, deadline=5) == ProbeFailure(
            "qemu: KVM internal error. Suberror: 1", conclusive=True
        )
        assert await probe_boot(image, silent, TCG, deadline=0.5) == ProbeFailure(
            "no console output within 0.5s", conclusive=False
        )
        assert await probe_boot(image, exits, TCG, deadline=STEP_DEADLINE / 2) == ProbeFailure(
            "qemu exited with 1: -accel kvm: no kvm", conclusive=True
        )
    assert [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in str(p.info)] == []


# --- real QEMU, real image ----------------------------------------------------------------

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="network namespaces and image builds need root"
)
needs_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("mmdebstrap", "mke2fs", QEMU, "nsenter")),
    reason="needs mmdebstrap, e2fsprogs, qemu-system-x86 and util-linux",
)


@pytest.fixture(scope="module")
def image() -> Image:
    if os.geteuid() != 0:
        pytest.skip("building the image needs root")
    return build_image(ImageSpec(), TEST_CACHE, progress=print)


@pytest.fixture
async def accel(image: Image) -> Accel:
    with trio.fail_after(STEP_DEADLINE):
        chosen = await choose_accel(image, cache_path=TEST_CACHE / "accel.json")
    print(f"accel: {chosen.name} ({chosen.reason})")
    return chosen


def _our_qemus(marker: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["name"] == QEMU and any(str(marker) in arg for arg in cmdline):
            found.append(proc)
    return found


@pytest.fixture
def no_leftovers(tmp_path: Path) -> Iterator[None]:
    """After the test: no QEMU of this test runs and no run directory is left."""
    yield
    assert _our_qemus(tmp_path) == []
    run = tmp_path / "logs" / "run"
    assert not run.exists() or list(run.iterdir()) == []


class Guest:
    """The host's side of one guest daemon's control channel."""

    def __init__(self, ws: Channel) -> None:
        self.ws = ws

    async def send(self, msg: HostMessage) -> None:
        await self.ws.send_message(encode(msg))

    async def recv(self, *, heartbeats: bool = False) -> GuestMessage:
        with trio.fail_after(STEP_DEADLINE):
            while True:
                msg = decode_guest(await self.ws.get_message())
                if heartbeats or not isinstance(msg, Heartbeat):
                    return msg

    async def welcome(
        self, heartbeat_interval: float = 1.0, hostname: str = "", entropy: bytes | None = None
    ) -> None:
        await self.send(
            Welcome(
                entropy=entropy or os.urandom(64),
                unix_time=time.time(),
                heartbeat_interval=heartbeat_interval,
                hostname=hostname,
            )
        )

    async def run(self, req: int, argv: list[str]) -> tuple[str, int]:
        await self.send(Run(req=req, argv=argv))
        out = b""
        while True:
            msg = await self.recv()
            if isinstance(msg, Output) and msg.req == req and msg.stream == "stdout":
                out += msg.data
            elif isinstance(msg, Exited) and msg.req == req:
                return out.decode(), msg.code


async def accept_guest(nursery: trio.Nursery, listener: trio.SocketListener) -> Guest:
    """The guest that dials ``listener`` (a dialled channel)."""
    stream = await listener.accept()
    request = await trio_websocket.wrap_server_stream(nursery, stream)
    return Guest(WsChannel(await request.accept()))


async def attach_guest(vm: VmHandle) -> Guest:
    """The guest on ``vm``'s channel device: the host's end, and Attach said on it."""
    channel = FramedChannel(await vm.open_channel(), MAX_FRAME_BYTES)
    await channel.send_message(encode(Attach(entropy=os.urandom(64))))
    return Guest(channel)


async def guest_of(
    driver: Driver, vm: VmHandle, nursery: trio.Nursery, listener: trio.SocketListener
) -> Guest:
    """``vm``'s guest, reached as ``driver`` offers it: dialling ``listener``, or on
    the VM's channel device."""
    if driver.describe().channel is ChannelKind.DIALLED:
        return await accept_guest(nursery, listener)
    return await attach_guest(vm)


def _fixed_port_listener(name: str, port: int) -> socket.socket:
    """A listener on 127.0.0.1:``port`` inside namespace ``name``, opened from a
    fresh thread that ends right after (setns moves only the calling thread)."""
    from pyroute2.netns import setns

    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def inside() -> None:
        try:
            setns(name, flags=0)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", port))
            sock.listen(4)
            made.append(sock)
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=inside)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return made[0]


class Namespaces:
    """Network namespaces made for one test, each with a control listener; all removed after."""

    def __init__(self) -> None:
        self.names: list[str] = []

    async def create(self, *, port: int | None = None) -> tuple[str, trio.SocketListener]:
        name = f"{netns.PREFIX}qt-{secrets.token_hex(3)}"
        sock = await netns.create_with_listener(name)
        self.names.append(name)
        if port is not None:  # snapshots need the same port in every namespace
            sock.close()
            sock = await trio.to_thread.run_sync(_fixed_port_listener, name, port)
        return name, trio.SocketListener(trio.socket.from_stdlib_socket(sock))


@pytest.fixture
async def namespaces() -> AsyncIterator[Namespaces]:
    made = Namespaces()
    try:
        yield made
    finally:
        with trio.CancelScope(shield=True):
            for name in made.names:
                await netns.remove(name)


async def _reap(*vms: QemuVm) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(STEP_DEADLINE):
        for vm in vms:
            await vm.kill()


def _console_tail(path: Path) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(lines[-25:])


@needs_qemu
@pytest.mark.usefixtures("no_leftovers")
async def test_qemu_exiting_at_start_is_one_line_with_its_message(tmp_path: Path) -> None:
    image = replace(_fake_image(tmp_path), rootfs=tmp_path / "missing.ext4")
    for name in ("vmlinux", "initramfs.cpio.gz"):
        (tmp_path / name).write_bytes(b"x")
    driver = QemuDriver(image, TCG)
    spec = _spec(log_path=tmp_path / "logs" / "worker-0.log")
    with trio.fail_after(STEP_DEADLINE), pytest.raises(DriverError) as info:
        await driver.start(spec)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("worker-0: start: QEMU exited with code 1: ")
    assert "missing.ext4" in message


@needs_qemu
async def test_restore_of_a_missing_snapshot_is_one_line(tmp_path: Path) -> None:
    driver = QemuDriver(_fake_image(), TCG)
    with pytest.raises(DriverError, match="No such file") as info:
        await driver.restore(_spec(), tmp_path / "none.snap")
    assert "\n" not in str(info.value)


@pytest.mark.image
@pytest.mark.root
@needs_root
@needs_tools
async def test_probe_boot_sees_userspace_under_tcg_and_says_why_not(image: Image) -> None:
    with trio.fail_after(BOOT_DEADLINE):
        assert await probe_boot(image, QEMU, TCG, deadline=BOOT_DEADLINE) is None
        too_soon = await probe_boot(image, QEMU, TCG, deadline=0.001)
    assert too_soon == ProbeFailure("no console output within 0.001s", conclusive=False)


@asynccontextmanager
async def cpu_burners(count: int) -> AsyncIterator[None]:
    """``count`` busy-looping Python processes for the duration, killed and reaped after."""
    procs = [
        await trio.lowlevel.open_process(
            [sys.executable, "-c", "while 1: pass"], stdin=subprocess.DEVNULL
        )
        for _ in range(count)
    ]
    try:
        yield
    finally:
        with trio.CancelScope(shield=True):
            for proc in procs:
                proc.kill()
                await proc.wait()


@pytest.mark.image
@pytest.mark.root
@needs_root
@needs_tools
async def test_probe_boot_reaches_userspace_under_tcg_beside_cpu_burners(image: Image) -> None:
    """One burner per core makes the guest's PIT calibration of the TSC fail; without
    the host's TSC rate the kernel then stalls for good after "tsc: Marking TSC
    unstable due to could not calculate TSC khz"."""
    if accel_mod.host_tsc_khz() is None:
        pytest.skip("/proc/cpuinfo gives no CPU clock to tell the guest")
    async with cpu_burners(os.cpu_count() or 1):
        started = time.monotonic()
        with trio.fail_after(BOOT_DEADLINE + STEP_DEADLINE):
            failure = await probe_boot(image, QEMU, TCG, deadline=BOOT_DEADLINE)
        print(f"tcg probe beside burners: {time.monotonic() - started:.1f} s")
    assert failure is None


@pytest.mark.image
@pytest.mark.root
@needs_root
@needs_tools
async def test_choose_accel_on_this_host(image: Image, tmp_path: Path) -> None:
    cache = tmp_path / "accel.json"
    with trio.fail_after(accel_mod.PROBE_DEADLINE + STEP_DEADLINE):
        chosen = await choose_accel(image, cache_path=cache)
    print(f"accel: {chosen.name}: {chosen.reason}")
    assert chosen.reason.startswith("kvm: ") and "\n" not in chosen.reason
    if chosen.name == "tcg":
        assert chosen.reason.endswith("; using tcg")
    if accel_mod.KVM_DEVICE.exists():
        assert chosen.name in cache.read_text()


@pytest.mark.image
@pytest.mark.root
@needs_root
@needs_tools
@pytest.mark.usefixtures("no_leftovers")
async def test_cancelled_start_leaves_no_qemu(image: Image, tmp_path: Path) -> None:
    """Cancelled between spawn and hand-over, start() kills the QEMU it spawned."""
    driver = QemuDriver(image, TCG)
    spec = _spec(log_path=tmp_path / "logs" / "worker-0.log")
    scope = trio.CancelScope()
    handed: list[QemuVm] = []

    async def start() -> None:
        with scope:
            handed.append(await driver.start(spec))

    with trio.fail_after(STEP_DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(start)
            # start() is parked on QEMU (spawned, not yet answering QMP, or talking to it).
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
    assert scope.cancelled_caught and handed == []


@pytest.mark.image
@needs_tools
@pytest.mark.usefixtures("no_leftovers")
async def test_an_unfinished_snapshot_leaves_the_vm_running(image: Image, tmp_path: Path) -> None:
    """A snapshot cancelled while the VM is paused and migrating: the migration is
    cancelled, the VM runs again and nothing of the snapshot is left."""
    driver = QemuDriver(image, TCG)
    vm = await driver.start(_spec(log_path=tmp_path / "logs" / "worker-0.log"))
    target = tmp_path / "vm.snap"
    try:
        with trio.fail_after(STEP_DEADLINE):
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(vm.snapshot, target)
                    # Parked once the VM is stopped and its state is on the way.
                    await trio.testing.wait_all_tasks_blocked()
                    scope.cancel()
            async with open_qmp(vm.qmp_path) as qmp:
                status = await qmp.execute("query-status")
        assert isinstance(status, dict) and status["status"] == "running", status
        assert sorted(await trio.to_thread.run_sync(os.listdir, tmp_path)) == ["logs"]
    finally:
        with trio.CancelScope(shield=True):
            await vm.kill()


@pytest.mark.image
@pytest.mark.root
@needs_root
@needs_tools
@pytest.mark.usefixtures("no_leftovers")
async def test_cold_boot_in_a_namespace_then_graceful_stop(
    image: Image,
    accel: Accel,
    nursery: trio.Nursery,
    namespaces: Namespaces,
    tmp_path: Path,
) -> None:
    ns_name, _ = await namespaces.create()
    cg = None
    if cgroup.probe() is None:
        # QEMU holds the guest's RAM plus its own (and TCG's code cache): room above the guest.
        cg = await trio.to_thread.run_sync(cgroup.create, f"qt-{secrets.token_hex(3)}", 2048)
    log_path = tmp_path / "logs" / "worker-0.log"
    spec = _spec(
        vm_id=f"worker-0-{secrets.token_hex(3)}",
        netns=ns_name,
        cgroup=cg,
        log_path=log_path,
    )
    driver = QemuDriver(image, accel)
    started = time.monotonic()
    vm = await driver.start(spec)
    try:
        assert vm.qmp_path.exists()
        if cg is not None:
            assert vm.pid in cgroup.pids(cg)
        try:
            with trio.fail_after(BOOT_DEADLINE):
                guest = await attach_guest(vm)
                hello = await guest.recv()
        except trio.TooSlowError:
            pytest.fail(f"no Hello within {BOOT_DEADLINE:g}s; console:\n{_console_tail(log_path)}")
        print(f"cold boot to Hello ({accel.name}): {time.monotonic() - started:.2f} s")
        assert isinstance(hello, Hello)
        assert (hello.vm_id, hello.token, hello.dials) == (spec.vm_id, spec.token, 1)
        await guest.welcome()
        out, code = await guest.run(1, ["cat", "/proc/sys/kernel/random/boot_id"])
        assert code == 0 and len(out.strip()) == 36, out
        out, _ = await guest.run(2, ["hostname"])
        assert out.strip() == "worker-0"
        rss = psutil.Process(vm.pid).memory_info().rss
        print(f"QEMU RSS after boot, {MEMORY_MIB} MiB guest: {rss / 2**20:.0f} MiB")

        with trio.fail_after(STEP_DEADLINE):
            await vm.pause()
            async with open_qmp(vm.qmp_path) as qmp:
                status = await qmp.execute("query-status")
            assert isinstance(status, dict) and status["status"] == "paused"
            await vm.resume()
        out, code = await guest.run(3, ["true"])
        assert code == 0

        await guest.send(Stop(reason="test done"))
        assert isinstance(await guest.recv(), Goodbye)
        with trio.fail_after(STEP_DEADLINE):
            assert await vm.wait() == 0  # the guest powered off; QEMU exits 0
        assert "reboot: Power down" in log_path.read_text(errors="replace")
        assert not vm.qmp_path.parent.exists()
    finally:
        await _reap(vm)
        if cg is not None:
            await trio.to_thread.run_sync(cgroup.remove, cg)


@pytest.mark.image
@pytest.mark.root
@needs_root
@needs_tools
@pytest.mark.usefixtures("no_leftovers")
async def test_snapshot_then_clones_served_on_their_port_without_a_dial(
    image: Image,
    accel: Accel,
    nursery: trio.Nursery,
    namespaces: Namespaces,
    tmp_path: Path,
) -> None:
    """A template snapshotted with its host on its port; clones restored at the same
    moment each answer their new host on the same port, with the daemon the
    template started: it never dials (``Hello.dials`` stays 1). Given the same
    Welcome, they still diverge: each mixed its own host's ``Attach`` in first."""
    driver = QemuDriver(image, accel)
    template_ns, _ = await namespaces.create()
    template_spec = _spec(
        vm_id=f"template-{secrets.token_hex(3)}",
        name="template",
        netns=template_ns,
        log_path=tmp_path / "logs" / "template.log",
    )
    vms: list[QemuVm] = []
    try:
        template = await driver.start(template_spec)
        vms.append(template)
        with trio.fail_after(BOOT_DEADLINE):
            guest = await attach_guest(template)
            hello = await guest.recv()
        assert isinstance(hello, Hello) and hello.vm_id == template_spec.vm_id
        assert hello.dials == 1
        template_pid = hello.pid
        await guest.welcome(heartbeat_interval=0.2)
        assert isinstance(await guest.recv(heartbeats=True), Heartbeat)  # parked and beating

        snapshot_path = tmp_path / "template.snap"
        with trio.fail_after(STEP_DEADLINE):
            snap = await template.snapshot(snapshot_path)
        print(f"snapshot: {snap.size / 2**20:.1f} MiB in {snap.seconds:.3f} s")
        assert snap.size == snapshot_path.stat().st_size > 0
        assert info_path(snapshot_path).exists()
        with trio.fail_after(STEP_DEADLINE):
            await template.kill()

        with pytest.raises(DriverError, match="taken with memory_mib 256 \\(this VM: 512\\)"):
            await driver.restore(
                _spec(memory_mib=512, log_path=tmp_path / "logs" / "x.log"), snap.path
            )

        restored: dict[int, tuple[QemuVm, Guest, Hello, float]] = {}

        async def restore(n: int) -> None:
            ns_name, _ = await namespaces.create()
            spec = _spec(
                vm_id=f"clone-{n}-{secrets.token_hex(3)}",
                name=f"clone-{n}",
                netns=ns_name,
                log_path=tmp_path / "logs" / f"clone-{n}.log",
            )
            started = time.monotonic()
            clone = await driver.restore(spec, snap.path)
            vms.append(clone)
            guest = await attach_guest(clone)
            hello = await guest.recv()
            assert isinstance(hello, Hello)
            restored[n] = (clone, guest, hello, time.monotonic() - started)

        with trio.fail_after(STEP_DEADLINE * 2):
            async with trio.open_nursery() as restoring:  # both at the same moment
                for n in range(2):
                    restoring.start_soon(restore, n)
        clones = [restored[n] for n in sorted(restored)]
        same_welcome = os.urandom(64)
        for n, (clone, guest, hello, to_hello) in enumerate(clones):
            # A clone is its template, down to its guest daemon: the same process,
            # still on its first channel (no dial), identity from the command line.
            assert (hello.vm_id, hello.token) == (template_spec.vm_id, template_spec.token)
            assert (hello.pid, hello.dials) == (template_pid, 1)
            print(
                f"clone {n}: restore (QMP, migration, cont) {clone.restore_seconds:.3f} s,"
                f" restore to Hello {to_hello:.3f} s"
            )
            await guest.welcome(hostname=f"clone-{n}", entropy=same_welcome)

        randoms = set()
        for n, (_clone, guest, _hello, _t) in enumerate(clones):
            out, code = await guest.run(1, ["sh", "-c", "head -c 16 /dev/urandom | od -An -tx1"])
            assert code == 0 and len(out.split()) == 16
            randoms.add(out)
            # Each clone woke with the template's name and took its own from its Welcome.
            out, _ = await guest.run(3, ["hostname"])
            assert out.strip() == f"clone-{n}"
        assert len(randoms) == 2, "each clone's RNG was reseeded from its own Attach"

        # A QEMU that dies as its clone wakes: the host attaching to it learns it from
        # the port's EOF at once, not from the boot timeout.
        doomed_ns, _ = await namespaces.create()
        doomed = await driver.restore(
            _spec(
                vm_id=f"clone-2-{secrets.token_hex(3)}",
                name="clone-2",
                netns=doomed_ns,
                log_path=tmp_path / "logs" / "clone-2.log",
            ),
            snap.path,
        )
        vms.append(doomed)
        port = await doomed.open_channel()
        os.kill(doomed.pid, signal.SIGKILL)
        control = ControlSpec()
        started = time.monotonic()
        with trio.fail_after(control.boot_timeout):
            with pytest.raises(ConnectionLost, match="control (port|connection) closed"):
                await attach(
                    port, vm_id=template_spec.vm_id, token=template_spec.token, spec=control
                )
        noticed = time.monotonic() - started
        print(f"a QEMU killed as its clone woke: noticed in {noticed:.3f} s")
        assert noticed < control.boot_timeout / 4

        # kill -9 of a clone's QEMU: its host sees the port's EOF at once, and wait() the exit.
        killed, killed_guest, _, _ = clones[0]
        os.kill(killed.pid, signal.SIGKILL)
        with trio.fail_after(STEP_DEADLINE):
            with pytest.raises(ChannelClosed, match="end of stream"):
                await killed_guest.recv()
            assert await killed.wait() == -signal.SIGKILL
        assert not killed.qmp_path.parent.exists()

        # A restored clone stops gracefully like a booted VM.
        clone, guest, _, _ = clones[1]
        await guest.send(Stop(reason="test done"))
        assert isinstance(await guest.recv(), Goodbye)
        with trio.fail_after(STEP_DEADLINE):
            assert await clone.wait() == 0
    finally:
        await _reap(*vms)
