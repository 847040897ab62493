"""The ``qemu`` driver: each VM is one QEMU ``-M microvm`` process, driven over QMP.

The machine: the image's PVH vmlinux and initramfs; a root disk (the VM's own
qcow2 overlay over the image, ``spec.disk``, mounted read-write; or the
image's root filesystem itself, shared READ-ONLY) as a virtio-blk-device;
one virtio-net-device; the serial console and QEMU's own messages appended
to ``spec.log_path``; QMP on a unix socket in a per-VM run directory
(``<log dir>/run/<vm id>/``, or a private one under the temporary directory
when that path is too long for a socket), removed once the VM is reaped. KVM
or TCG as ``fireclaw.pool.accel`` decided.

Networking, with ``spec.tap`` (the pool's way, see ``fireclaw.pool.network``):
the guest's eth0 is on that tap inside the VM's namespace, as
``GUEST_CIDR`` behind the gateway ``GATEWAY``, where the supervisor's
listeners are; ``spec.control_url`` names ``GATEWAY`` and the guest dials it
as is. Without a tap, QEMU's user networking (slirp) runs inside QEMU, in
QEMU's namespace (``spec.netns``, entered through ``nsenter``): the guest is
10.0.2.15/24 and 10.0.2.2 is that namespace's loopback, so
``spec.control_url`` must name 127.0.0.1 (the guest is given the same URL
with 10.0.2.2). Without a namespace either, slirp lets the guest reach
whatever the host reaches: only probes and tests run that way.

Snapshots: ``QemuVm.snapshot(path)`` pauses the VM and migrates its state to
``path`` (QEMU 7.2 has no ``file:`` migration, so ``exec:cat > PATH``), and
writes ``PATH.json`` recording what it was taken with. ``QemuDriver.restore``
starts a clone with ``-incoming defer``, feeds it that state and continues it.

A clone IS its template: the kernel command line, and with it the guest's
vm_id, token and control URL, are the template's. So the supervisor knows a
clone by the namespace it runs in (one VM and one control listener per
namespace), not by the vm_id in its Hello; and it must listen on the same
fixed port in every namespace (``CONTROL_PORT`` unless it picks another for
all of them), so that the URL baked into the template works in each clone.
The guest daemon finds its old connection dead (its next heartbeat is
answered with a reset), dials the same URL again, says Hello and takes the new
Welcome: fresh entropy, the current time.

Adoption: ``QemuDriver.adopt`` takes over a QEMU a previous supervisor started
(after a crash or an upgrade of the supervisor, the VM ran on): it checks the
process is still that one (pid + start time + boot id) and watches it through
a pidfd (``adopted.AdoptedProcess``: it is not our child, its exit status is
unknowable), and checks over its QMP socket, still in its run directory, that
the guest runs. Its guest dials the same URL again, like a restored clone,
and the supervisor listens there again.

Errors::

    DriverError             (drivers.base) a VM could not be started or restored
    └── VmmCommandError     a running VM could not be paused, resumed or snapshotted
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import signal
import socket
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Final, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import msgspec
import trio
from fireclaw.pool import cgroup
from fireclaw.pool.accel import Accel, accel_argv, host_tsc_khz
from fireclaw.pool.drivers.adopted import AdoptedProcess
from fireclaw.pool.drivers.base import DriverError, Running, VmSpec
from fireclaw.pool.drivers.spawn import in_netns, open_log, open_vmm
from fireclaw.pool.image import Image
from fireclaw.pool.network import GATEWAY, GUEST_CIDR
from fireclaw.pool.qmp import Qmp, QmpError, QmpFailure, open_qmp

T = TypeVar("T")

#: A named agent's workspace disk: its size (every one, and the spare disk it
#: replaces), and the serial the guest finds it by.
WORKSPACE_BYTES: Final = 256 << 20
WORKSPACE_SERIAL: Final = "fc-workspace"
_WS_EMPTY: Final = "ws-empty"
_WS_NODE: Final = "ws"
_WS_FILE: Final = "ws-file"
#: The control port to use in every namespace when VMs are restored from snapshots.
CONTROL_PORT: Final = 7000
GUEST_ADDR: Final = "10.0.2.15/24"
#: The guest's name for its namespace's loopback.
HOST_ALIAS: Final = "10.0.2.2"
NETWORK: Final = "10.0.2.0/24"
#: Cancelling an unfinished snapshot and resuming the VM.
_UNDO_TIMEOUT: Final = 5.0
#: ``start`` and ``restore`` give QEMU this long to answer on QMP.
STARTUP_TIMEOUT: Final = 10.0
MACHINE: Final = "microvm,x-option-roms=off,rtc=on"
SNAPSHOT_INFO_SUFFIX: Final = ".json"

#: Host variables QEMU may see; the rest of the supervisor's environment stays out.
_PASSED_ENV: Final = ("PATH", "LANG", "LC_ALL", "TZ")
_UNIX_PATH_MAX: Final = 107
#: Migration of a paused VM to a local file: no reason to throttle it (QEMU's default
#: is 128 MiB/s).
_MIGRATE_BANDWIDTH: Final = 64 << 30
_MIGRATION_ENDED: Final = frozenset({"completed", "failed", "cancelled"})
_HOSTNAME: Final = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_LOOPBACK: Final = frozenset({"127.0.0.1", "localhost"})


class VmmCommandError(DriverError):
    """A running VM could not be paused, resumed or snapshotted."""


@dataclass(frozen=True)
class Snapshot:
    path: Path
    size: int  # bytes of migration state
    seconds: float  # pause + migration, wall time


class SnapshotInfo(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``PATH.json`` beside a snapshot: what a clone must be started with."""

    image_key: str
    accel: Literal["kvm", "tcg"]
    memory_mib: int
    vcpus: int
    cmdline: str
    qemu_version: tuple[int, int, int]
    size: int
    seconds: float
    tap: str | None = None  # the tap the guest was on (None: user networking)
    disk: bool = False  # on its own overlay: a clone's overlay must sit on that one
    memory_file: str | None = None  # the RAM, not in the snapshot: clones map it privately


_info_decoder: Final = msgspec.json.Decoder(SnapshotInfo)


def info_path(snapshot: Path) -> Path:
    return snapshot.with_name(snapshot.name + SNAPSHOT_INFO_SUFFIX)


def load_snapshot_info(snapshot: Path) -> SnapshotInfo:
    """What ``snapshot`` was taken with; DriverError if it or its ``.json`` is missing."""
    if not snapshot.is_absolute():  # QEMU's helper runs in another directory
        raise DriverError(f"snapshot path {snapshot} is not absolute")
    where = info_path(snapshot)
    try:
        info = _info_decoder.decode(where.read_bytes())
    except OSError as exc:
        raise DriverError(f"snapshot {snapshot}: {exc.strerror} ({where})") from exc
    except msgspec.DecodeError as exc:
        raise DriverError(f"snapshot {snapshot}: unreadable {where}: {exc}") from exc
    if not snapshot.is_file():
        raise DriverError(f"snapshot {snapshot}: no such file")
    return info


# --- the command line (pure) -------------------------------------------------------------


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


def kernel_cmdline(base: str, spec: VmSpec, accel: Accel, *, tsc_khz: int | None) -> str:
    """The image's command line plus what the guest's init and daemon read."""
    tap = spec.tap is not None
    words = [
        f"fireclaw.url={guest_control_url(spec.control_url, tap=tap)}",
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
    incoming: bool = False,
    tap: str | None = None,
    disk: Path | None = None,
    memory_file: Path | None = None,
    memory_shared: bool = True,
) -> list[str]:
    """QEMU's arguments for one VM; ``incoming`` waits for migrated state over QMP.

    ``qmp_fd``: a unix socket already listening (``qmp_listener``), inherited
    under that number: QMP clients connect at once, without waiting for QEMU
    to create it.

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
            f"driver=null-co,node-name={_WS_EMPTY},size={WORKSPACE_BYTES},read-zeroes=on",
            "-blockdev", f"driver=raw,node-name={_WS_NODE},file={_WS_EMPTY}",
            "-device", f"virtio-blk-device,drive={_WS_NODE},serial={WORKSPACE_SERIAL}",
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


# --- QMP conversations -------------------------------------------------------------------


async def _events_on(qmp: Qmp) -> None:
    await qmp.execute(
        "migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]}
    )


async def _migration_done(qmp: Qmp) -> None:
    event = await qmp.wait_event("MIGRATION", lambda e: e.data.get("status") in _MIGRATION_ENDED)
    status = event.data.get("status")
    if status != "completed":
        found = await qmp.execute("query-migrate")
        desc = found.get("error-desc") if isinstance(found, dict) else None
        raise QmpError("MigrationFailed", str(desc or f"migration {status}"), command="migrate")


async def _ignore_shared(qmp: Qmp) -> None:
    """Leave shared (file-backed) RAM out of the migration: it is the file itself."""
    await qmp.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": "x-ignore-shared", "state": True}]},
    )


async def _migrate_to_socket(
    sock_path: Path,
    listener: trio.socket.SocketType,
    target: Path,
    memory_file: Path | None,
    qmp: Qmp,
) -> tuple[int, int, int]:
    await qmp.execute("stop")
    await _events_on(qmp)
    if memory_file is not None:
        await _ignore_shared(qmp)
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": _MIGRATE_BANDWIDTH})
    await qmp.execute("migrate", {"uri": f"unix:{sock_path}"})
    failed: list[str] = []
    error: QmpFailure | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_receive_state, listener, target, failed)
        try:
            await _migration_done(qmp)
        except QmpFailure as exc:  # carried out by hand: the nursery would wrap it
            error = exc
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    if failed:
        raise OSError(failed[0])
    if memory_file is not None:
        # The RAM is the file: on disk before the snapshot is called whole.
        await trio.to_thread.run_sync(_fsync_path, memory_file)
    return qmp.greeting.version


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def _receive_state(listener: trio.socket.SocketType, target: Path, failed: list[str]) -> None:
    """Accept QEMU's one migration connection and write what it sends to ``target``
    until it closes the connection; then sync the file. Errors go to ``failed``."""
    try:
        conn, _ = await listener.accept()
        stream = trio.SocketStream(conn)
        # Guest memory (the token included): readable by root only.
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        async with stream, await trio.open_file(fd, "wb") as out:
            while chunk := await stream.receive_some(1 << 20):
                await out.write(chunk)
            await out.flush()
            await trio.to_thread.run_sync(os.fsync, out.fileno())
    except (OSError, trio.BrokenResourceError) as exc:
        failed.append(f"writing {target.name}: {exc}")


async def _undo_migration(qmp: Qmp) -> None:
    """Cancel a migration under way, if any, and let the guest run again."""
    with contextlib.suppress(QmpError):
        await qmp.execute("migrate_cancel")
    await qmp.execute("cont")


async def _migrate_in(
    source_fd: int, ignore_shared: bool, startup: trio.CancelScope, qmp: Qmp
) -> float:
    """Load the snapshot QEMU inherited as ``source_fd`` (no shell, no ``cat``), then
    run; in the same QMP session as the check that QEMU is up, which lifts the
    ``startup`` deadline. Returns the seconds the restore took after that."""
    await _query_status(qmp)
    startup.deadline = math.inf
    started = trio.current_time()
    await _events_on(qmp)
    if ignore_shared:
        await _ignore_shared(qmp)
    await qmp.execute("migrate-incoming", {"uri": f"fd:{source_fd}"})
    await _migration_done(qmp)
    await qmp.execute("cont")
    return trio.current_time() - started


async def _query_status(qmp: Qmp) -> None:
    await qmp.execute("query-status")


async def _run_state(qmp: Qmp) -> str:
    """QEMU's run state: ``running``, ``paused``, ``inmigrate``, ..."""
    found = await qmp.execute("query-status")
    status = found.get("status") if isinstance(found, dict) else None
    return str(status)


class _Exited(Exception):
    """QEMU exited while we were talking to it."""


# --- the VM ------------------------------------------------------------------------------


class QemuVm:
    """One QEMU process. ``wait``/``kill`` reap it and remove its run directory."""

    def __init__(
        self,
        proc: trio.Process | AdoptedProcess,
        spec: VmSpec,
        *,
        qemu: str,
        image: Image,
        accel: Accel,
        cmdline: str,
        run_dir: Path,
        log_offset: int,
        restored: bool = False,
    ) -> None:
        self._proc = proc
        self._spec = spec
        self._qemu = qemu
        self._image = image
        self._accel = accel
        self._cmdline = cmdline
        self._run_dir = run_dir
        self._log_offset = log_offset
        #: The RAM's file when it is shared (a template): snapshots leave RAM out.
        self._memory_file = spec.memory_file if not restored else None
        self.restored_from: Path | None = None
        self.restore_seconds: float | None = None

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def qmp_path(self) -> Path:
        return self._run_dir / "qmp.sock"

    @property
    def adopted(self) -> bool:
        """Started by a previous supervisor: not our child."""
        return isinstance(self._proc, AdoptedProcess)

    def _gone(self) -> bool:
        if isinstance(self._proc, AdoptedProcess):
            return self._proc.exited
        return self._proc.returncode is not None

    async def wait(self) -> int | None:
        code = await self._proc.wait()
        if isinstance(self._proc, AdoptedProcess):
            self._proc.close()
        self._remove_run_dir()
        return code

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    async def kill(self) -> None:
        if not self._gone():
            # The signal from the event loop: trio's process handle (its returncode,
            # its pidfd) is not to be touched from a worker thread.
            self._signal(signal.SIGKILL)
            if self._spec.cgroup is not None:
                await trio.to_thread.run_sync(cgroup.kill_all, self._spec.cgroup)
        await self.wait()

    def _signal(self, sig: signal.Signals) -> None:
        if isinstance(self._proc, AdoptedProcess):
            # Through its pidfd: never a later process given the same pid. QEMU starts
            # no processes of its own; the cgroup takes any that are there.
            self._proc.send_signal(sig)
        elif self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, sig)

    def _remove_run_dir(self) -> None:
        shutil.rmtree(self._run_dir, ignore_errors=True)

    def info(self) -> dict[str, object]:
        return {
            "driver": "qemu",
            "pid": self._proc.pid,
            "netns": self._spec.netns,
            "accel": self._accel.name,
            "qmp": str(self.qmp_path),
            "restored_from": str(self.restored_from) if self.restored_from else None,
            "restore_seconds": self.restore_seconds,
            "adopted": self.adopted,
        }

    # --- QMP ---------------------------------------------------------------------

    async def pause(self) -> None:
        await self._command("pause", lambda qmp: qmp.execute("stop"))

    async def resume(self) -> None:
        await self._command("resume", lambda qmp: qmp.execute("cont"))

    async def snapshot(self, path: Path) -> Snapshot:
        """Pause the VM and write its state to ``path``, absolute (and ``PATH.json``).

        The state is migrated over a unix socket we accept on, so the file is
        known to be whole when QEMU closes the connection after the migration
        completed. (With an ``exec:cat > FILE`` target, QEMU announces completion
        before it closes the pipe, and signals the ``cat`` if it has not exited
        by then: the file may be short.) The file is written aside and renamed.

        The VM stays paused afterwards: ``resume()`` it or kill it. Bound the
        wait with a cancel scope; a snapshot not finished (failed or cancelled)
        is not left behind, its migration is cancelled and the VM runs again.
        """
        if not path.is_absolute():
            raise VmmCommandError(f"{self._spec.name}: snapshot path {path} is not absolute")
        partial_path = path.with_name(f".{path.name}.partial")
        sock_path = self.qmp_path.with_name("migrate.sock")  # in the VM's own run directory
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        started = trio.current_time()
        try:
            await listener.bind(str(sock_path))
            listener.listen(1)
            version = await self._command(
                "snapshot",
                partial(_migrate_to_socket, sock_path, listener, partial_path, self._memory_file),
            )
            seconds = trio.current_time() - started
            size = partial_path.stat().st_size
            info = SnapshotInfo(
                image_key=self._image.key,
                accel=self._accel.name,
                memory_mib=self._spec.memory_mib,
                vcpus=self._spec.vcpus,
                cmdline=self._cmdline,
                qemu_version=version,
                size=size,
                seconds=round(seconds, 3),
                tap=self._spec.tap,
                disk=self._spec.disk is not None,
                memory_file=str(self._memory_file) if self._memory_file else None,
            )
            info_path(path).write_bytes(msgspec.json.encode(info))
            os.replace(partial_path, path)
        except BaseException as exc:
            with trio.CancelScope(shield=True), trio.move_on_after(_UNDO_TIMEOUT):
                with contextlib.suppress(VmmCommandError):
                    await self._command("resume after an unfinished snapshot", _undo_migration)
            if isinstance(exc, OSError):
                raise VmmCommandError(
                    f"{self._spec.name}: snapshot {path}: {exc.strerror}"
                ) from exc
            raise
        finally:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                sock_path.unlink()
            with contextlib.suppress(FileNotFoundError):
                partial_path.unlink()
        return Snapshot(path=path, size=size, seconds=seconds)

    async def attach_workspace(self, path: Path) -> None:
        """Put the image at ``path`` (absolute, ``WORKSPACE_BYTES`` long) under the
        VM's spare disk, in place of its emptiness; once per VM.

        QEMU locks the file, so one workspace is never in two VMs at once."""
        if self._spec.disk is None:
            raise VmmCommandError(f"{self._spec.name}: this VM has no spare disk")

        async def swap(qmp: Qmp) -> None:
            await qmp.execute(
                "blockdev-add", {"driver": "file", "node-name": _WS_FILE, "filename": str(path)}
            )
            await qmp.execute(
                "blockdev-reopen",
                {"options": [{"driver": "raw", "node-name": _WS_NODE, "file": _WS_FILE}]},
            )
            await qmp.execute("blockdev-del", {"node-name": _WS_EMPTY})

        await self._command(f"workspace {path.name}", swap)

    async def _command(self, what: str, op: Callable[[Qmp], Awaitable[T]]) -> T:
        try:
            return await self._over_qmp(op)
        except QmpFailure as exc:
            raise VmmCommandError(f"{self._spec.name}: {what}: {exc}") from exc
        except _Exited:
            raise VmmCommandError(f"{self._spec.name}: {what}: {self.exit_text()}") from None

    async def _over_qmp(self, op: Callable[[Qmp], Awaitable[T]]) -> T:
        """``op`` in a fresh QMP session; raises _Exited at once if QEMU exits meanwhile."""

        async def session() -> T:
            async with open_qmp(self.qmp_path) as qmp:
                return await op(qmp)

        return await self._while_running(session)

    async def _while_running(self, fn: Callable[[], Awaitable[T]]) -> T:
        result: list[T] = []
        error: QmpFailure | None = None
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                await self._proc.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            try:
                result.append(await fn())
            except QmpFailure as exc:
                error = exc
            nursery.cancel_scope.cancel()
        if result:
            return result[0]
        if self._gone():
            raise _Exited
        assert error is not None  # an outside cancel propagates out of the nursery instead
        raise error

    def exit_text(self) -> str:
        """How QEMU ended, with its last error message when it left one."""
        code = self._proc.returncode
        if code is not None:
            text = f"QEMU exited with code {code}"
        elif self._gone():
            text = "QEMU exited (its exit status is unknowable: it was adopted)"
        else:
            text = "QEMU is running"
        message = self.last_error()
        return f"{text}: {message}" if message else text

    def last_error(self) -> str:
        """QEMU's last ``qemu-system-...: message`` line in this VM's log, or ''."""
        prefix = f"{Path(self._qemu).name}: "
        try:
            with open(self._spec.log_path, "rb") as log:
                size = log.seek(0, os.SEEK_END)
                start = max(self._log_offset, size - 65536)
                log.seek(start)
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        found = [line.strip() for line in text.splitlines() if prefix in line]
        if not found:
            return ""
        return found[-1].partition(prefix)[2][:200]


# --- the driver --------------------------------------------------------------------------


class QemuDriver:
    """Starts VMs (cold boot or restore from a snapshot) under QEMU ``-M microvm``."""

    name = "qemu"
    outlives_supervisor = True

    def __init__(self, image: Image, accel: Accel, *, qemu: str = "qemu-system-x86_64") -> None:
        self.image = image
        self.accel = accel
        self.qemu = qemu
        self._tsc_khz = host_tsc_khz()

    def cmdline(self, spec: VmSpec) -> str:
        return kernel_cmdline(self.image.cmdline, spec, self.accel, tsc_khz=self._tsc_khz)

    async def start(self, spec: VmSpec) -> QemuVm:
        """Boot a VM; returns once QEMU answers on QMP (the guest is still booting)."""
        return await self._launch(spec, self.cmdline(spec), incoming=None)

    async def adopt(self, spec: VmSpec, running: Running) -> QemuVm:
        """Take over the QEMU ``running`` names, a VM of ``spec`` a previous
        supervisor started; returns once QMP says its guest runs.

        Nothing of the VM is changed: on DriverError (it is gone, it is another
        process, QMP does not answer, the guest is paused or still migrating)
        the caller reclaims it."""
        proc = AdoptedProcess.open(running)
        try:
            log_offset = spec.log_path.stat().st_size
        except OSError:
            log_offset = 0
        vm = QemuVm(
            proc,
            spec,
            qemu=self.qemu,
            image=self.image,
            accel=self.accel,
            cmdline="",  # not known here; only a snapshot would need it
            run_dir=running.control_socket.parent,
            log_offset=log_offset,
            restored=True,  # its RAM, if in a file, is not ours to snapshot
        )
        try:
            with trio.fail_after(STARTUP_TIMEOUT):
                state = await vm._over_qmp(_run_state)
        except trio.TooSlowError:
            proc.close()
            raise DriverError(
                f"{spec.name}: QEMU did not answer on QMP within {STARTUP_TIMEOUT:g}s"
            ) from None
        except (QmpFailure, _Exited) as exc:
            proc.close()
            why = vm.exit_text() if isinstance(exc, _Exited) else str(exc)
            raise DriverError(f"{spec.name}: adopt: {why}") from exc
        except BaseException:
            proc.close()
            raise
        if state != "running":
            proc.close()
            raise DriverError(f"{spec.name}: adopt: the VM is {state}, not running")
        return vm

    async def restore(self, spec: VmSpec, snapshot: Path) -> QemuVm:
        """Start a clone of the VM ``snapshot`` (absolute) was taken of; returns once it runs.

        The clone keeps the template's kernel command line: its guest says Hello
        with the TEMPLATE's vm_id and token, to the template's URL. So
        ``spec.control_url`` and ``spec.token`` are not used; the caller knows
        the clone by ``spec.netns`` and must listen there on the port the
        template's URL names (the same fixed port in every namespace, e.g.
        ``CONTROL_PORT``). ``spec.memory_mib``, ``spec.vcpus`` and ``spec.tap``
        must be the template's; ``spec.disk`` is the clone's own overlay ON the
        template's (the guest's page cache in the snapshot matches that disk).
        """
        info = load_snapshot_info(snapshot)
        mismatch = [
            f"{what} {theirs} (this VM: {ours})"
            for what, theirs, ours in (
                ("image", info.image_key[:16], self.image.key[:16]),
                ("accel", info.accel, self.accel.name),
                ("memory_mib", info.memory_mib, spec.memory_mib),
                ("vcpus", info.vcpus, spec.vcpus),
                ("tap", info.tap, spec.tap),
                ("own disk", info.disk, spec.disk is not None),
            )
            if theirs != ours
        ]
        if mismatch:
            raise DriverError(f"snapshot {snapshot} was taken with " + ", ".join(mismatch))
        memory = Path(info.memory_file) if info.memory_file is not None else None
        if memory is not None and not await trio.to_thread.run_sync(memory.is_file):
            raise DriverError(f"snapshot {snapshot}: its memory file {memory} is gone")
        vm = await self._launch(spec, info.cmdline, incoming=snapshot, private_memory=memory)
        vm.restored_from = snapshot
        return vm

    async def _launch(
        self,
        spec: VmSpec,
        cmdline: str,
        *,
        incoming: Path | None,
        private_memory: Path | None = None,
    ) -> QemuVm:
        """Start QEMU for ``spec``: a boot, or a restore of ``incoming`` (whose RAM is
        ``private_memory``, mapped privately, when the snapshot left it out)."""
        run_dir = _make_run_dir(spec)
        try:
            qmp_sock = qmp_listener(run_dir / "qmp.sock")
        except OSError as exc:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise DriverError(f"{spec.name}: QMP socket in {run_dir}: {exc.strerror}") from exc
        with qmp_sock, _opened(incoming) as snapshot_fd:
            return await self._spawn(
                spec, cmdline, run_dir, qmp_sock.fileno(), snapshot_fd, private_memory
            )

    async def _spawn(
        self,
        spec: VmSpec,
        cmdline: str,
        run_dir: Path,
        qmp_fd: int,
        snapshot_fd: int | None,
        private_memory: Path | None,
    ) -> QemuVm:
        incoming = snapshot_fd is not None
        argv = qemu_argv(
            self.qemu,
            self.image,
            self.accel,
            vcpus=spec.vcpus,
            memory_mib=spec.memory_mib,
            cmdline=cmdline,
            log_path=spec.log_path.absolute(),
            qmp_fd=qmp_fd,
            incoming=incoming,
            tap=spec.tap,
            disk=spec.disk,
            memory_file=private_memory or spec.memory_file,
            memory_shared=private_memory is None,
        )
        env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
        try:
            spec.log_path.parent.mkdir(parents=True, exist_ok=True)
            log_fd = open_log(spec.log_path)
        except OSError as exc:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise DriverError(f"{spec.name}: log {spec.log_path}: {exc.strerror}") from exc
        try:
            log_offset = os.fstat(log_fd).st_size
            passed = (qmp_fd,) if snapshot_fd is None else (qmp_fd, snapshot_fd)
            proc = await open_vmm(
                in_netns(argv, spec.netns), log_fd=log_fd, env=env, pass_fds=passed
            )
        except OSError as exc:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise DriverError(f"starting {spec.name}: {exc.strerror or exc}") from exc
        finally:
            os.close(log_fd)
        vm = QemuVm(
            proc,
            spec,
            qemu=self.qemu,
            image=self.image,
            accel=self.accel,
            cmdline=cmdline,
            run_dir=run_dir,
            log_offset=log_offset,
            restored=incoming,
        )
        try:
            if spec.cgroup is not None:
                await trio.to_thread.run_sync(cgroup.join, spec.cgroup, proc.pid)
            with trio.CancelScope(deadline=trio.current_time() + STARTUP_TIMEOUT) as startup:
                if snapshot_fd is None:
                    await vm._over_qmp(_query_status)
                else:
                    restore = partial(_migrate_in, snapshot_fd, private_memory is not None, startup)
                    vm.restore_seconds = await vm._over_qmp(restore)
            if startup.cancelled_caught:
                raise trio.TooSlowError
        except BaseException as exc:
            # Failed or cancelled between spawn and hand-over: nobody else knows this
            # process yet, so it is ours to kill.
            with trio.CancelScope(shield=True):
                await vm.kill()
            what = "restore" if incoming else "start"
            if isinstance(exc, cgroup.CgroupError):
                raise DriverError(str(exc)) from exc
            if isinstance(exc, _Exited):
                raise DriverError(f"{spec.name}: {what}: {vm.exit_text()}") from None
            if isinstance(exc, trio.TooSlowError):
                raise DriverError(
                    f"{spec.name}: QEMU did not answer on QMP within {STARTUP_TIMEOUT:g}s"
                ) from None
            if isinstance(exc, QmpFailure):
                raise DriverError(f"{spec.name}: {what}: {exc}") from exc
            raise
        return vm


def qmp_listener(path: Path) -> socket.socket:
    """A unix socket listening at ``path``, for QEMU to inherit as its QMP server."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(8)
    except OSError:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def _opened(path: Path | None) -> Iterator[int | None]:
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


def _make_run_dir(spec: VmSpec) -> Path:
    """A fresh private directory for the VM's sockets."""
    run_dir = spec.log_path.absolute().parent / "run" / spec.vm_id
    if len(os.fsencode(run_dir / "qmp.sock")) > _UNIX_PATH_MAX:
        return Path(tempfile.mkdtemp(prefix=f"fireclaw-{spec.vm_id[:32]}-"))
    try:
        shutil.rmtree(run_dir, ignore_errors=True)  # a leftover of a crashed supervisor
        run_dir.mkdir(parents=True, mode=0o700)
    except OSError as exc:
        raise DriverError(f"{spec.name}: run directory {run_dir}: {exc.strerror}") from exc
    return run_dir
