"""How one QEMU ``-M microvm`` process is set up: its command line and the kernel's
(pure functions), its run directory and the QMP socket it inherits.

The machine: the image's PVH vmlinux and initramfs; a root disk (the VM's own
qcow2 overlay over the image, mounted read-write; or the image's root
filesystem itself, shared READ-ONLY) as a virtio-blk-device, and with its own
disk a spare one a named agent's workspace is later swapped under; one
virtio-net-device, on a tap or on QEMU's user network; the serial console
and QEMU's own messages appended to the VM's log; QMP on a socket QEMU
inherits; the guest daemon's control port, a virtio-serial port named
``CONTROL_PORT_NAME`` on a unix socket QEMU inherits too, whose one client is
the supervisor. See ``fireclaw.pool.drivers.qemu`` for how the networks are
reached.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit, urlunsplit

from fireclaw.pool.accel import Accel, accel_argv
from fireclaw.pool.drivers.base import WORKSPACE_BYTES, WORKSPACE_SERIAL, DriverError, VmSpec
from fireclaw.pool.image import Image
from fireclaw.pool.network import GATEWAY, GUEST_CIDR

#: QEMU's block nodes of the spare disk: empty, its format node, a workspace file.
WS_EMPTY: Final = "ws-empty"
WS_NODE: Final = "ws"
WS_FILE: Final = "ws-file"
GUEST_ADDR: Final = "10.0.2.15/24"
#: The guest's name for its namespace's loopback.
HOST_ALIAS: Final = "10.0.2.2"
NETWORK: Final = "10.0.2.0/24"
MACHINE: Final = "microvm,x-option-roms=off,rtc=on"
#: The virtio-serial port the guest daemon serves (``fireclaw.port=`` tells it which).
CONTROL_PORT_NAME: Final = "fireclaw.control"
_LOOPBACK: Final = frozenset({"127.0.0.1", "localhost"})
_HOSTNAME: Final = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_UNIX_PATH_MAX: Final = 107
#: The sockets a VM's run directory holds: QMP's, the control port's, a snapshot's stream.
QMP_SOCKET: Final = "qmp.sock"
CHANNEL_SOCKET: Final = "control.sock"
MIGRATE_SOCKET: Final = "migrate.sock"
RUN_DIR_SOCKETS: Final = (QMP_SOCKET, CHANNEL_SOCKET, MIGRATE_SOCKET)


def guest_control_url(url: str, *, tap: bool = False) -> str:
    """``url`` as the guest reaches it: on a tap, as is (it must name ``GATEWAY``);
    on user networking, 127.0.0.1 becomes 10.0.2.2."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise DriverError(f"control url {url!r}: {exc}") from None
    if tap:
        if parts.scheme not in ("ws", "wss") or parts.hostname != GATEWAY or port is None:
            raise DriverError(f"control url {url!r}: a guest on a tap dials ws://{GATEWAY}:PORT/")
        return urlunsplit((parts.scheme, f"{GATEWAY}:{port}", parts.path or "/", "", ""))
    if parts.scheme not in ("ws", "wss") or parts.hostname not in _LOOPBACK or port is None:
        raise DriverError(
            f"control url {url!r}: the qemu driver needs ws://127.0.0.1:PORT/"
            f" (the guest reaches its namespace's loopback as {HOST_ALIAS})"
        )
    return urlunsplit((parts.scheme, f"{HOST_ALIAS}:{port}", parts.path or "/", "", ""))


def kernel_cmdline(
    base: str, spec: VmSpec, accel: Accel, *, tsc_khz: int | None, port: str | None = None
) -> str:
    """The image's command line plus what the guest's init and daemon read: the
    control ``port`` the daemon serves, or (None) the URL it dials."""
    tap = spec.tap is not None
    control = (
        f"fireclaw.port={port}"
        if port is not None
        else f"fireclaw.url={guest_control_url(spec.control_url, tap=tap)}"
    )
    words = [
        control,
        f"fireclaw.vm_id={spec.vm_id}",
        f"fireclaw.token={spec.token}",
        f"fireclaw.ip={GUEST_CIDR if tap else GUEST_ADDR}",
        f"fireclaw.gw={GATEWAY if tap else HOST_ALIAS}",
    ]
    if spec.disk is not None:
        words.append("rw")  # the VM's own overlay: the initramfs mounts it writable
    # Warnings and errors still reach the console (the VM's log); the kernel's
    # notices, its echo of this command line and the guest's token with it, do not.
    words.append("loglevel=4")
    if _HOSTNAME.fullmatch(spec.name):
        words.append(f"fireclaw.hostname={spec.name}")
    if accel.name == "tcg" and tsc_khz:
        # The TCG guest's TSC runs at the host's rate; saying so spares the kernel a
        # PIT calibration that can fail on a loaded host and stall the boot.
        words.append(f"tsc_early_khz={tsc_khz}")
    for word in words:
        if any(c.isspace() or c == '"' for c in word):
            raise DriverError(f"{spec.name}: {word.partition('=')[0]} cannot hold blanks or quotes")
    return " ".join([base, *words])


def _opt(value: object) -> str:
    """A value inside a QEMU ``key=value,...`` option: commas are doubled."""
    return str(value).replace(",", ",,")


def qemu_argv(
    qemu: str,
    image: Image,
    accel: Accel,
    *,
    vcpus: int,
    memory_mib: int,
    cmdline: str,
    log_path: Path,
    qmp_fd: int,
    control_fd: int,
    incoming: bool = False,
    tap: str | None = None,
    disk: Path | None = None,
    memory_file: Path | None = None,
    memory_shared: bool = True,
) -> list[str]:
    """QEMU's arguments for one VM; ``incoming`` waits for migrated state over QMP.

    ``qmp_fd``: a unix socket already listening (``qmp_listener``), inherited
    under that number: QMP clients connect at once, without waiting for QEMU
    to create it. ``control_fd``: the same for the control port, whose client
    is already queued on it: QEMU takes it as it starts (``wait=on``), so the
    port has its host from the first instruction the guest runs (a restored
    clone's never sees its host go).

    ``tap``: attach the guest to that tap (None: user networking). ``disk``: the
    VM's writable qcow2 root (None: the image's root, read-only).
    ``memory_file``: the guest's RAM, mapped shared (a template) or privately
    (``memory_shared=False``: a clone of it)."""
    machine, memory = MACHINE, []
    if memory_file is not None:
        machine += ",memory-backend=mem"
        share = "on" if memory_shared else "off"
        memory = [
            "-object",
            f"memory-backend-file,id=mem,size={memory_mib}M,mem-path={_opt(memory_file)},"
            f"share={share}",
        ]
    if disk is not None:
        root = f"file={_opt(disk)},if=none,format=qcow2,id=root,discard=unmap"
    else:
        root = f"file={_opt(image.rootfs)},if=none,format=raw,readonly=on,id=root"
    # A VM with its own disk also has a spare one, empty until a named agent's
    # workspace is swapped in under it (``QemuVm.attach_workspace``): a restored
    # clone must have the devices its template had, and virtio-mmio has no hotplug.
    spare = (
        [
            "-blockdev",
            f"driver=null-co,node-name={WS_EMPTY},size={WORKSPACE_BYTES},read-zeroes=on",
            "-blockdev", f"driver=raw,node-name={WS_NODE},file={WS_EMPTY}",
            "-device", f"virtio-blk-device,drive={WS_NODE},serial={WORKSPACE_SERIAL}",
        ]
        if disk is not None
        else []
    )  # fmt: skip
    if tap is not None:
        net = f"tap,id=n0,ifname={_opt(tap)},script=no,downscript=no"
    else:
        net = f"user,id=n0,net={NETWORK},host={HOST_ALIAS}"
    argv = [
        qemu, *accel_argv(accel),
        "-M", machine, "-m", str(memory_mib), "-smp", str(vcpus), *memory,
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-chardev", f"file,id=console,path={_opt(log_path)},append=on",
        "-serial", "chardev:console",
        "-chardev", f"socket,id=qmp,fd={qmp_fd},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev", f"socket,id=control,fd={control_fd},server=on,wait=on",
        "-device", "virtio-serial-device,max_ports=2",
        "-device", f"virtserialport,chardev=control,name={CONTROL_PORT_NAME}",
        "-kernel", str(image.vmlinux), "-initrd", str(image.initramfs), "-append", cmdline,
        "-drive", root,
        "-device", "virtio-blk-device,drive=root",
        *spare,
        "-netdev", net,
        "-device", "virtio-net-device,netdev=n0",
    ]  # fmt: skip
    if incoming:
        argv += ["-incoming", "defer"]
    return argv


def qmp_listener(path: Path) -> socket.socket:
    """A unix socket listening at ``path``, for QEMU to inherit as a server (its
    QMP, or the control port's socket)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(8)
    except OSError:
        sock.close()
        raise
    return sock


def control_pair(path: Path) -> tuple[socket.socket, socket.socket]:
    """A unix socket listening at ``path`` for QEMU to inherit as the control port's
    server, and our client connection already queued on it (a connect to a
    listening unix socket completes at once; QEMU accepts it as it starts)."""
    listener = qmp_listener(path)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        client.connect(str(path))
    except OSError:
        client.close()
        listener.close()
        raise
    return listener, client


@contextlib.contextmanager
def opened(path: Path | None) -> Iterator[int | None]:
    """``path`` open for reading (None: nothing), closed on the way out."""
    if path is None:
        yield None
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise DriverError(f"snapshot {path}: {exc.strerror}") from exc
    try:
        yield fd
    finally:
        os.close(fd)


def make_run_dir(spec: VmSpec) -> Path:
    """A fresh private directory for the VM's sockets."""
    run_dir = spec.log_path.absolute().parent / "run" / spec.vm_id
    if any(len(os.fsencode(run_dir / name)) > _UNIX_PATH_MAX for name in RUN_DIR_SOCKETS):
        return Path(tempfile.mkdtemp(prefix=f"fireclaw-{spec.vm_id[:32]}-"))
    try:
        shutil.rmtree(run_dir, ignore_errors=True)  # a leftover of a crashed supervisor
        run_dir.mkdir(parents=True, mode=0o700)
    except OSError as exc:
        raise DriverError(f"{spec.name}: run directory {run_dir}: {exc.strerror}") from exc
    return run_dir
