"""The ``qemu`` driver: each VM is one QEMU ``-M microvm`` process, driven over QMP.

The machine is ``qemu_argv``'s: the image's kernel, a root disk
(``spec.disk``, the VM's own overlay, or the image's root read-only), one
virtio-net-device, the console appended to ``spec.log_path``. QMP listens on
a unix socket in a per-VM run directory (``<log dir>/run/<vm id>/``, or a
private one under the temporary directory when that path is too long for a
socket), removed once the VM is reaped. KVM or TCG as ``fireclaw.pool.accel``
decided. The VM, once started, is a ``QemuVm`` (``qemu_vm``).

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
from functools import partial
from pathlib import Path
from typing import Final

import trio
from fireclaw.pool import cgroup
from fireclaw.pool.accel import Accel, host_tsc_khz
from fireclaw.pool.drivers.adopted import AdoptedProcess
from fireclaw.pool.drivers.base import (
    Capability,
    ChannelKind,
    DiskFormat,
    DriverError,
    DriverInfo,
    Running,
    VmSpec,
)
from fireclaw.pool.drivers.qemu_argv import (
    CHANNEL_SOCKET,
    CONTROL_PORT_NAME,
    QMP_SOCKET,
    control_pair,
    kernel_cmdline,
    make_run_dir,
    opened,
    qemu_argv,
    qmp_listener,
)
from fireclaw.pool.drivers.qemu_migration import (
    load_snapshot_info,
    migrate_in,
    query_status,
    run_state,
)
from fireclaw.pool.drivers.qemu_vm import QemuVm
from fireclaw.pool.drivers.spawn import in_netns, open_log, open_vmm
from fireclaw.pool.drivers.vmm import VmmExited
from fireclaw.pool.image import Image
from fireclaw.pool.qmp import QmpFailure
from fireclaw.pool.steps import mark

#: ``start`` and ``restore`` give QEMU this long to answer on QMP.
STARTUP_TIMEOUT: Final = 10.0
#: Host variables QEMU may see; the rest of the supervisor's environment stays out.
_PASSED_ENV: Final = ("PATH", "LANG", "LC_ALL", "TZ")


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
            disk=DiskFormat.QCOW2_OVERLAY,
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
        # A stat, read on the loop as the snapshot's .json above is: a thread hop
        # would cost a restore more than the call itself.
        if memory is not None and not memory.is_file():
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
            qmp_sock = qmp_listener(run_dir / QMP_SOCKET)
        except OSError as exc:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise DriverError(
                f"{spec.name}: QMP socket in {run_dir}: {exc.strerror or exc}"
            ) from exc
        with qmp_sock:
            try:
                control_sock, channel = control_pair(run_dir / CHANNEL_SOCKET)
            except OSError as exc:
                shutil.rmtree(run_dir, ignore_errors=True)
                raise DriverError(
                    f"{spec.name}: control socket in {run_dir}: {exc.strerror or exc}"
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
            mark("spawned")
        except OSError as exc:
            channel.close()
            shutil.rmtree(run_dir, ignore_errors=True)
            raise DriverError(f"starting {spec.name}: {exc.strerror or exc}") from exc
        finally:
            os.close(log_fd)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(channel))
        vm = self._vm(proc, spec, cmdline, run_dir, log_offset, restored=incoming, channel=stream)
        try:
            # Into its cgroup while QEMU starts, not before QMP is asked: the move can
            # wait out the kernel's cgroup lock, and QEMU takes longer to answer.
            joining = _Joining(spec.cgroup, proc.pid) if spec.cgroup is not None else None
            with trio.CancelScope(deadline=trio.current_time() + STARTUP_TIMEOUT) as startup:
                if snapshot_fd is None:
                    await vm._over_qmp(query_status)
                else:
                    restore = partial(migrate_in, snapshot_fd, private_memory is not None, startup)
                    vm.restore_seconds = await vm._over_qmp(restore)
            if startup.cancelled_caught:
                raise trio.TooSlowError
            if joining is not None:
                await joining.wait()
                mark("cgroup joined")
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


class _Joining:
    """``cgroup.join(path, pid)`` under way in a thread of its own, the caller going
    on meanwhile; ``wait`` for its end (CgroupError if it failed). Not awaited,
    it ends by itself."""

    def __init__(self, path: Path, pid: int) -> None:
        self._done = trio.Event()
        self._error: cgroup.CgroupError | None = None
        token = trio.lowlevel.current_trio_token()

        def join() -> None:
            try:
                cgroup.join(path, pid)
            except cgroup.CgroupError as exc:
                self._error = exc

        def deliver(_: object) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._done.set)

        trio.lowlevel.start_thread_soon(join, deliver)

    async def wait(self) -> None:
        await self._done.wait()
        if self._error is not None:
            raise self._error


def _no_answer(spec: VmSpec) -> DriverError:
    return DriverError(f"{spec.name}: QEMU did not answer on QMP within {STARTUP_TIMEOUT:g}s")
