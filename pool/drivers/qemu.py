"""The ``qemu`` driver: each VM is one QEMU ``-M microvm`` process, driven over QMP.

The machine is ``qemu_argv``'s: the image's kernel, a root disk
(``spec.disk``, the VM's own overlay, or the image's root read-only), one
virtio-net-device, the console appended to ``spec.log_path``. QMP listens on
a unix socket in a per-VM run directory (``<log dir>/run/<vm id>/``, or a
private one under the temporary directory when that path is too long for a
socket), removed once the VM is reaped. KVM or TCG as ``fireclaw.pool.accel``
decided.

The control channel (``Channel.VIRTIO_SERIAL``): a virtio-serial port the
guest daemon opens once and serves for its whole life, on a unix socket
(``control.sock`` in the run directory) we create and connect to before QEMU
starts; QEMU inherits it and takes our connection as it starts.
``QemuVm.open_channel`` hands that connection over; its EOF is QEMU's end,
seen at once. A later supervisor (adoption) connects to the socket anew.

Networking, with ``spec.tap`` (the pool's way, see ``fireclaw.pool.network``):
the guest's eth0 is on that tap inside the VM's namespace, as
``GUEST_CIDR`` behind the gateway ``GATEWAY``, where the supervisor's
listeners (IRC, the model gateway) are. Without a tap, QEMU's user
networking (slirp) runs inside QEMU, in QEMU's namespace (``spec.netns``,
entered through ``nsenter``): the guest is 10.0.2.15/24 and 10.0.2.2 is that
namespace's loopback. Without a namespace either, slirp lets the guest reach
whatever the host reaches: only probes and tests run that way.
``spec.control_url`` is not used: the guest reaches its host through its port.

Snapshots: ``QemuVm.snapshot(path)`` pauses the VM and migrates its state to
``path`` and writes ``PATH.json`` recording what it was taken with
(``qemu_migration``). ``QemuDriver.restore`` starts a clone with
``-incoming defer``, feeds it that state and continues it.

A clone IS its template: the kernel command line, and with it the guest's
vm_id and token, are the template's. So the supervisor knows a clone by the
QEMU it started (its port), not by the vm_id in its Hello. The guest daemon
carries on reading its port, where the new host is before the guest runs
again: the host says ``Attach`` (fresh entropy, mixed in at once), the guest
answers Hello and takes the new Welcome (the current time, its name). No
dial, no dead connection to notice.

Adoption: ``QemuDriver.adopt`` takes over a QEMU a previous supervisor started
(after a crash or an upgrade of the supervisor, the VM ran on): it checks the
process is still that one (pid + start time + boot id) and watches it through
a pidfd (``adopted.AdoptedProcess``: it is not our child, its exit status is
unknowable), and checks over its QMP socket, still in its run directory, that
the guest runs. The supervisor attaches to its port anew; the guest, which
saw its old host go (EOF), takes the new one.

Errors::

    DriverError             (drivers.base) a VM could not be started or restored
    └── VmmCommandError     (drivers.base) a running VM could not be paused,
                            resumed, snapshotted or given its workspace
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Final, TypeVar

import msgspec
import trio
from fireclaw.pool import cgroup
from fireclaw.pool.accel import Accel, host_tsc_khz
from fireclaw.pool.drivers.adopted import AdoptedProcess
from fireclaw.pool.drivers.base import (
    Capability,
    ChannelKind,
    DriverError,
    DriverInfo,
    Running,
    Snapshot,
    VmmCommandError,
    VmSpec,
    info_path,
)
from fireclaw.pool.drivers.qemu_argv import (
    CONTROL_PORT_NAME,
    WS_EMPTY,
    WS_FILE,
    WS_NODE,
    control_pair,
    kernel_cmdline,
    make_run_dir,
    opened,
    qemu_argv,
    qmp_listener,
)
from fireclaw.pool.drivers.qemu_migration import (
    SnapshotInfo,
    load_snapshot_info,
    migrate_in,
    migrate_to_socket,
    query_status,
    run_state,
    undo_migration,
)
from fireclaw.pool.drivers.spawn import in_netns, open_log, open_vmm
from fireclaw.pool.drivers.vmm import VmmExited, VmmProcess
from fireclaw.pool.image import Image
from fireclaw.pool.qmp import Qmp, QmpFailure, open_qmp

T = TypeVar("T")

#: Cancelling an unfinished snapshot and resuming the VM.
_UNDO_TIMEOUT: Final = 5.0
#: ``start`` and ``restore`` give QEMU this long to answer on QMP.
STARTUP_TIMEOUT: Final = 10.0
#: The control port's unix socket, in the VM's run directory.
CHANNEL_SOCKET: Final = "control.sock"
#: Host variables QEMU may see; the rest of the supervisor's environment stays out.
_PASSED_ENV: Final = ("PATH", "LANG", "LC_ALL", "TZ")

# --- the VM ------------------------------------------------------------------------------


class QemuVm(VmmProcess):
    """One QEMU process. ``wait``/``kill`` reap it and remove its run directory."""

    vmm_name = "QEMU"

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
        channel: trio.SocketStream | None = None,
    ) -> None:
        super().__init__(proc, spec)
        #: The control port's connection made before QEMU started, until handed over.
        self._channel = channel
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
    def qmp_path(self) -> Path:
        return self._run_dir / "qmp.sock"

    @property
    def control_socket(self) -> Path:
        return self.qmp_path

    @property
    def channel_path(self) -> Path:
        """The unix socket of the guest's control port (QEMU is its server)."""
        return self._run_dir / CHANNEL_SOCKET

    async def open_channel(self) -> trio.abc.Stream:
        """The host's end of the control port: the connection made before QEMU
        started, the first time; a new one after that (QEMU takes one client at
        a time: close the last first). DriverError when QEMU does not take it."""
        channel, self._channel = self._channel, None
        if channel is not None:
            return channel
        try:
            return await trio.open_unix_socket(str(self.channel_path))
        except OSError as exc:
            raise DriverError(
                f"{self._spec.name}: control port {self.channel_path}: {exc.strerror or exc}"
            ) from exc

    async def wait(self) -> int | None:
        """As ``VmmProcess.wait``; also closes the port's connection if it was never
        handed over."""
        try:
            return await super().wait()
        finally:
            channel, self._channel = self._channel, None
            if channel is not None:
                channel.socket.close()

    def release(self) -> None:
        shutil.rmtree(self._run_dir, ignore_errors=True)

    def info(self) -> dict[str, object]:
        return {
            "driver": "qemu",
            "pid": self.pid,
            "netns": self._spec.netns,
            "accel": self._accel.name,
            "qmp": str(self.qmp_path),
            "channel": str(self.channel_path),
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
                partial(migrate_to_socket, sock_path, listener, partial_path, self._memory_file),
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
                    await self._command("resume after an unfinished snapshot", undo_migration)
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
                "blockdev-add", {"driver": "file", "node-name": WS_FILE, "filename": str(path)}
            )
            await qmp.execute(
                "blockdev-reopen",
                {"options": [{"driver": "raw", "node-name": WS_NODE, "file": WS_FILE}]},
            )
            await qmp.execute("blockdev-del", {"node-name": WS_EMPTY})

        await self._command(f"workspace {path.name}", swap)

    async def _command(self, what: str, op: Callable[[Qmp], Awaitable[T]]) -> T:
        try:
            return await self._over_qmp(op)
        except QmpFailure as exc:
            raise VmmCommandError(f"{self._spec.name}: {what}: {exc}") from exc
        except VmmExited:
            raise VmmCommandError(f"{self._spec.name}: {what}: {self.exit_text()}") from None

    async def _over_qmp(self, op: Callable[[Qmp], Awaitable[T]]) -> T:
        """``op`` in a fresh QMP session; raises VmmExited at once if QEMU exits meanwhile."""

        async def session() -> T:
            async with open_qmp(self.qmp_path) as qmp:
                return await op(qmp)

        return await self.while_running(session)

    def exit_text(self) -> str:
        """How QEMU ended, with its last error message when it left one."""
        text = super().exit_text()
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

    def describe(self) -> DriverInfo:
        """Every capability (a workspace only for a VM with its own disk); a
        template depends on the image, the accelerator and the QEMU binary."""
        missing = shutil.which(self.qemu) is None
        return DriverInfo(
            name=self.name,
            capabilities=frozenset(Capability),
            unavailable=f"{self.qemu} is not installed" if missing else None,
            key_inputs={
                "image": self.image.key,
                "accel": self.accel.name,
                "qemu": self.qemu,
                "channel": f"{ChannelKind.VIRTIO_SERIAL.value} {CONTROL_PORT_NAME}",
            },
            root_disk=self.image.rootfs,
            channel=ChannelKind.VIRTIO_SERIAL,
        )

    def cmdline(self, spec: VmSpec) -> str:
        return kernel_cmdline(
            self.image.cmdline, spec, self.accel, tsc_khz=self._tsc_khz, port=CONTROL_PORT_NAME
        )

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
        # Its command line is not known here (only a snapshot would need it), and its
        # RAM, if in a file, is not ours to snapshot.
        vm = self._vm(proc, spec, "", running.control_socket.parent, log_offset, restored=True)
        try:
            with trio.fail_after(STARTUP_TIMEOUT):
                state = await vm._over_qmp(run_state)
        except trio.TooSlowError:
            proc.close()
            raise _no_answer(spec) from None
        except (QmpFailure, VmmExited) as exc:
            proc.close()
            why = vm.exit_text() if isinstance(exc, VmmExited) else str(exc)
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

    def _vm(
        self,
        proc: trio.Process | AdoptedProcess,
        spec: VmSpec,
        cmdline: str,
        run_dir: Path,
        log_offset: int,
        *,
        restored: bool,
        channel: trio.SocketStream | None = None,
    ) -> QemuVm:
        return QemuVm(
            proc,
            spec,
            qemu=self.qemu,
            image=self.image,
            accel=self.accel,
            cmdline=cmdline,
            run_dir=run_dir,
            log_offset=log_offset,
            restored=restored,
            channel=channel,
        )

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
        run_dir = make_run_dir(spec)
        try:
            qmp_sock = qmp_listener(run_dir / "qmp.sock")
        except OSError as exc:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise DriverError(f"{spec.name}: QMP socket in {run_dir}: {exc.strerror}") from exc
        with qmp_sock:
            try:
                control_sock, channel = control_pair(run_dir / CHANNEL_SOCKET)
            except OSError as exc:
                shutil.rmtree(run_dir, ignore_errors=True)
                raise DriverError(
                    f"{spec.name}: control socket in {run_dir}: {exc.strerror}"
                ) from exc
            with control_sock, opened(incoming) as snapshot_fd:
                listeners = (qmp_sock, control_sock)
                return await self._spawn(
                    spec, cmdline, run_dir, listeners, snapshot_fd, channel, private_memory
                )

    async def _spawn(
        self,
        spec: VmSpec,
        cmdline: str,
        run_dir: Path,
        listeners: tuple[socket.socket, socket.socket],
        snapshot_fd: int | None,
        channel: socket.socket,
        private_memory: Path | None,
    ) -> QemuVm:
        """Start QEMU with ``listeners`` (QMP's and the control port's sockets) and the
        snapshot to load (None: a boot); ``channel``, our connection queued on
        the control port's socket, is ours to close whatever happens.

        Our copy of the control port's socket is closed once QEMU has it: from
        then on QEMU's end is the only end, and its exit closes ``channel`` at
        once. QMP's stays open until the caller is done starting QEMU: a QMP
        client then waits on it, and a QEMU that exits at start is seen as an
        exit (``VmmExited``), not as a reset QMP connection."""
        qmp_fd, control_fd = (sock.fileno() for sock in listeners)
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
            control_fd=control_fd,
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
            channel.close()
            shutil.rmtree(run_dir, ignore_errors=True)
            raise DriverError(f"{spec.name}: log {spec.log_path}: {exc.strerror}") from exc
        try:
            log_offset = os.fstat(log_fd).st_size
            passed = (qmp_fd, control_fd) + (() if snapshot_fd is None else (snapshot_fd,))
            proc = await open_vmm(
                in_netns(argv, spec.netns), log_fd=log_fd, env=env, pass_fds=passed
            )
            listeners[1].close()
        except OSError as exc:
            channel.close()
            shutil.rmtree(run_dir, ignore_errors=True)
            raise DriverError(f"starting {spec.name}: {exc.strerror or exc}") from exc
        finally:
            os.close(log_fd)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(channel))
        vm = self._vm(proc, spec, cmdline, run_dir, log_offset, restored=incoming, channel=stream)
        try:
            if spec.cgroup is not None:
                await trio.to_thread.run_sync(cgroup.join, spec.cgroup, proc.pid)
            with trio.CancelScope(deadline=trio.current_time() + STARTUP_TIMEOUT) as startup:
                if snapshot_fd is None:
                    await vm._over_qmp(query_status)
                else:
                    restore = partial(migrate_in, snapshot_fd, private_memory is not None, startup)
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
            if isinstance(exc, VmmExited):
                raise DriverError(f"{spec.name}: {what}: {vm.exit_text()}") from None
            if isinstance(exc, trio.TooSlowError):
                raise _no_answer(spec) from None
            if isinstance(exc, QmpFailure):
                raise DriverError(f"{spec.name}: {what}: {exc}") from exc
            raise
        return vm


def _no_answer(spec: VmSpec) -> DriverError:
    return DriverError(f"{spec.name}: QEMU did not answer on QMP within {STARTUP_TIMEOUT:g}s")
