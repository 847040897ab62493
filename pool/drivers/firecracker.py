"""The ``firecracker`` driver: each VM is one Firecracker process under the jailer.

The VMM is started by ``jailer`` in a chroot of its own, in the VM's network
namespace, in the pool's cgroup for the VM, as an unprivileged uid of its own
(``firecracker_jail``). It is then configured over its API socket
(``firecracker_http``), each call built and kept in order by the sans-I/O
``firecracker_api``:

- boot: machine-config, boot-source (the image's vmlinux and initramfs, the
  kernel command line the guest daemon reads, as for QEMU), the root drive,
  eth0 on ``spec.tap``, the entropy device, MMDS config and the VM's metadata
  (vm id, name, role: no secret), then InstanceStart;
- snapshot: pause, snapshot/create into the jail, the two files moved out
  beside ``PATH.json``; the VM stays paused;
- restore: a fresh process, snapshot/load with ``network_overrides`` (eth0 on
  this clone's tap), the clone's own metadata in MMDS, resume.

A clone IS its template, as under QEMU: same command line, same token, same
control URL. The supervisor knows it by the namespace it runs in, and its
guest daemon, finding its connection dead, dials again and takes a fresh
Welcome over the control channel. MMDS says which VM it is to anything in the
guest that asks (http://169.254.169.254/fireclaw).

What the image must provide: an uncompressed ELF vmlinux whose virtio_mmio
driver is built in with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y (Firecracker
names its devices on the kernel command line); Debian's cloud kernel has
virtio_mmio as a module and is refused (``firecracker_host``).

This driver is checked against Firecracker's API specification (v1.16.1) by
contract tests, with a fake ``firecracker`` serving a spec-checking API; it
has not been run against a real Firecracker (none is installable where its
tests run, and that KVM boots no stock guest kernel).

Errors::

    DriverError             (drivers.base) a VM could not be started or restored
    ├── VmmCommandError     (drivers.base) a running VM could not be paused, resumed
    │                       or snapshotted
    └── Unsupported         (drivers.base) a workspace: no spare drive to swap yet
"""

from __future__ import annotations

import contextlib
import os
import shutil
from functools import partial
from pathlib import Path
from typing import Final

import msgspec
import trio
from fireclaw.pool.accel import Accel
from fireclaw.pool.drivers import firecracker_api as api
from fireclaw.pool.drivers import firecracker_jail as jail_files
from fireclaw.pool.drivers.adopted import AdoptedProcess
from fireclaw.pool.drivers.base import (
    Capability,
    DiskFormat,
    DriverError,
    DriverInfo,
    Running,
    Snapshot,
    VmmCommandError,
    VmSpec,
    info_path,
    load_info,
    unsupported,
)
from fireclaw.pool.drivers.firecracker_http import ApiClient
from fireclaw.pool.drivers.firecracker_jail import Jail, jailer_argv
from fireclaw.pool.drivers.qemu_argv import kernel_cmdline
from fireclaw.pool.drivers.spawn import open_log, open_vmm
from fireclaw.pool.drivers.vmm import VmmExited, VmmProcess
from fireclaw.pool.image import Image

#: ``start`` and ``restore`` give Firecracker this long to answer on its API socket.
STARTUP_TIMEOUT: Final = 10.0
IFACE: Final = "eth0"
ROOT_DRIVE: Final = "rootfs"
#: Firecracker's recommended words: reboot through the keyboard controller (the VMM
#: exits), no PCI probing (its devices are virtio-mmio).
_FIRECRACKER_ARGS: Final = "reboot=k pci=off"
_PASSED_ENV: Final = ("PATH", "LANG", "LC_ALL", "TZ")
#: Resuming the VM after a snapshot that did not finish.
_UNDO_TIMEOUT: Final = 5.0
#: Firecracker runs only under KVM: the guest's command line is built as for a KVM guest.
_KVM: Final = Accel("kvm", "firecracker runs under KVM")
_LACKING: Final = {
    Capability.WORKSPACE: "its VMs have no spare drive a workspace could be swapped under"
}


class SnapshotInfo(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``PATH.json`` beside a Firecracker snapshot: what a clone must match."""

    driver: str
    image_key: str
    memory_mib: int
    vcpus: int
    tap: str
    disk: bool
    memory: str  # the guest memory file, beside the snapshot


_info_decoder: Final = msgspec.json.Decoder(SnapshotInfo)


# --- the VM ------------------------------------------------------------------------------


class FirecrackerVm(VmmProcess):
    """One Firecracker process. ``wait``/``kill`` reap it and remove its jail."""

    vmm_name = "Firecracker"

    def __init__(
        self, proc: trio.Process | AdoptedProcess, spec: VmSpec, jail: Jail, client: ApiClient
    ) -> None:
        super().__init__(proc, spec)
        self.jail = jail
        self.client = client
        self.image_key = ""
        self.restored_from: Path | None = None

    @property
    def control_socket(self) -> Path:
        return self.client.socket_path

    def release(self) -> None:
        jail_files.remove(self.jail)

    def exit_text(self) -> str:
        return f"{super().exit_text()} (its log: {self._spec.log_path})"

    def info(self) -> dict[str, object]:
        return {
            "driver": "firecracker",
            "pid": self.pid,
            "netns": self._spec.netns,
            "jail": str(self.jail.root),
            "uid": self.jail.uid,
            "api": str(self.client.socket_path),
            "restored_from": str(self.restored_from) if self.restored_from else None,
            "adopted": self.adopted,
        }

    async def command(self, what: str, request: api.Request) -> bytes:
        """``request`` on the running VM; VmmCommandError (one line) if refused."""
        try:
            return await self.client.call(request)
        except api.ApiError as exc:
            raise VmmCommandError(f"{self._spec.name}: {what}: {exc}") from exc

    async def pause(self) -> None:
        await self.command("pause", api.pause())

    async def resume(self) -> None:
        await self.command("resume", api.resume())

    async def attach_workspace(self, path: Path) -> None:
        raise unsupported("firecracker", Capability.WORKSPACE, _LACKING[Capability.WORKSPACE])

    async def ask_to_stop(self) -> None:
        """Ctrl+Alt+Del to the guest: it shuts down, and Firecracker exits."""
        await self.command("stop", api.send_ctrl_alt_del())

    async def snapshot(self, path: Path) -> Snapshot:
        """Pause the VM and write its state to ``path`` (absolute), its memory to
        ``PATH.mem`` and what it was taken with to ``PATH.json``; the VM stays paused.

        Both files are made root's and readable by the jails' group: every clone
        of this template reads them (its memory privately mapped). ``path`` is
        written last, so a snapshot that exists is whole. A snapshot not finished
        leaves none of its files behind, and the VM runs again."""
        if not path.is_absolute():
            raise VmmCommandError(f"{self._spec.name}: snapshot path {path} is not absolute")
        memory = path.with_name(path.name + ".mem")
        info = SnapshotInfo(
            driver="firecracker",
            image_key=self.image_key,
            memory_mib=self._spec.memory_mib,
            vcpus=self._spec.vcpus,
            tap=self._spec.tap or "",
            disk=self._spec.disk is not None,
            memory=memory.name,
        )
        body = api.SnapshotCreateParams(
            snapshot_path=jail_files.VMSTATE, mem_file_path=jail_files.MEMORY, snapshot_type="Full"
        )

        made: list[Path] = []  # what this snapshot wrote outside the jail

        def move_out() -> int:
            taken = self.jail.inside(jail_files.MEMORY)
            jail_files.share(taken)
            made.append(memory)
            shutil.move(taken, memory)
            made.append(info_path(path))
            info_path(path).write_bytes(msgspec.json.encode(info))
            state = self.jail.inside(jail_files.VMSTATE)
            jail_files.share(state)
            made.append(path)
            shutil.move(state, path)  # last: a snapshot file that exists is whole
            return path.stat().st_size + memory.stat().st_size

        def forget() -> None:
            for done in made:
                done.unlink(missing_ok=True)

        started = trio.current_time()
        try:
            if self.client.api.phase is api.Phase.RUNNING:
                await self.pause()
            await self.command("snapshot", api.snapshot_create(body))
            size = await trio.to_thread.run_sync(move_out)
        except BaseException as exc:
            with trio.CancelScope(shield=True), trio.move_on_after(_UNDO_TIMEOUT):
                await trio.to_thread.run_sync(forget)
                if self.client.api.phase is api.Phase.PAUSED:
                    with contextlib.suppress(VmmCommandError):
                        await self.resume()
            if isinstance(exc, OSError):
                raise VmmCommandError(
                    f"{self._spec.name}: snapshot {path}: {exc.strerror}"
                ) from exc
            raise
        return Snapshot(path=path, size=size, seconds=trio.current_time() - started)


# --- the driver --------------------------------------------------------------------------


class FirecrackerDriver:
    """Starts VMs (boot or snapshot restore) under Firecracker and its jailer."""

    name = "firecracker"
    #: Each VMM is its own session, outside the supervisor: the next one adopts it.
    outlives_supervisor = True

    def __init__(
        self, image: Image, *, firecracker: str, jailer: str, chroot_base: Path | None = None
    ) -> None:
        self.image = image
        self.firecracker = firecracker
        self.jailer = jailer
        self._chroot_base = chroot_base

    def describe(self) -> DriverInfo:
        """Snapshots and pause, no workspaces, a raw disk per VM; unavailable where
        the binaries, KVM or root are missing or the image's kernel cannot boot
        under Firecracker (whether this host's KVM boots it at all is
        ``open_driver``'s slower probe)."""
        from fireclaw.pool.drivers.firecracker_host import why_image_unfit, why_not_here

        found = why_not_here(shutil.which(self.firecracker), shutil.which(self.jailer))
        return DriverInfo(
            name=self.name,
            capabilities=frozenset({Capability.SNAPSHOT, Capability.PAUSE}),
            lacking=_LACKING,
            unavailable=found or why_image_unfit(self.image),
            key_inputs={"image": self.image.key, "firecracker": self.firecracker},
            root_disk=self.image.rootfs,
            # Firecracker opens raw files only, and a snapshot names the disk files
            # it was taken with: each VM's disk is a raw copy at the jail's DISK.
            disk=DiskFormat.RAW_COPY,
        )

    def jail_for(self, spec: VmSpec) -> Jail:
        base = self._chroot_base or spec.log_path.absolute().parent / "run" / spec.vm_id
        return Jail.for_spec(spec, base, self.firecracker)

    def boot_calls(self, spec: VmSpec) -> list[api.Request]:
        """The configuration of a booting VM, InstanceStart last."""
        if spec.tap is None:
            raise DriverError(f"{spec.name}: a Firecracker VM needs a tap (it has no user network)")
        cmdline = kernel_cmdline(self.image.cmdline, spec, _KVM, tsc_khz=None)
        root = api.Drive(
            drive_id=ROOT_DRIVE,
            # The image's initramfs mounts the root by the command line's root=; not
            # Firecracker's root device, which would add its own root= to it.
            is_root_device=False,
            path_on_host=jail_files.DISK if spec.disk is not None else jail_files.ROOTFS,
            is_read_only=spec.disk is None,
        )
        return [
            api.machine_config(
                api.MachineConfiguration(vcpu_count=spec.vcpus, mem_size_mib=spec.memory_mib)
            ),
            api.boot_source(
                api.BootSource(
                    kernel_image_path=jail_files.KERNEL,
                    initrd_path=jail_files.INITRD,
                    boot_args=f"{cmdline} {_FIRECRACKER_ARGS}",
                )
            ),
            api.drive(root),
            api.network_interface(api.NetworkInterface(iface_id=IFACE, host_dev_name=spec.tap)),
            api.entropy(api.EntropyDevice()),
            api.mmds_config(api.MmdsConfig(network_interfaces=(IFACE,), version="V2")),
            api.mmds(_metadata(spec)),
            api.instance_start(),
        ]

    async def start(self, spec: VmSpec) -> FirecrackerVm:
        """Boot a VM; returns once Firecracker took InstanceStart (the guest boots)."""
        try:
            calls = self.boot_calls(spec)
        except api.ApiError as exc:
            raise DriverError(f"{spec.name}: {exc}") from None
        shared = {jail_files.KERNEL: self.image.vmlinux, jail_files.INITRD: self.image.initramfs}
        own: dict[str, Path] = {}
        if spec.disk is not None:
            own[jail_files.DISK] = spec.disk
        else:
            shared[jail_files.ROOTFS] = self.image.rootfs
        return await self._launch(spec, shared, own, calls, restored_from=None)

    async def restore(self, spec: VmSpec, snapshot: Path) -> FirecrackerVm:
        """Start a clone of the VM ``snapshot`` (absolute) was taken of; returns once
        it runs. ``spec.memory_mib``, ``vcpus`` and whether it has its own disk must
        be the template's; ``spec.disk`` is then a copy of the template's disk as it
        was at the snapshot. The clone's eth0 is put on ``spec.tap``."""
        info = _load_info(snapshot)
        mismatch = [
            f"{what} {theirs} (this VM: {ours})"
            for what, theirs, ours in (
                ("image", info.image_key[:16], self.image.key[:16]),
                ("memory_mib", info.memory_mib, spec.memory_mib),
                ("vcpus", info.vcpus, spec.vcpus),
                ("own disk", info.disk, spec.disk is not None),
            )
            if theirs != ours
        ]
        if mismatch:
            raise DriverError(f"snapshot {snapshot} was taken with " + ", ".join(mismatch))
        if spec.tap is None:
            raise DriverError(f"{spec.name}: a Firecracker VM needs a tap (it has no user network)")
        shared = {
            jail_files.VMSTATE: snapshot,
            jail_files.MEMORY: snapshot.with_name(info.memory),
        }
        own: dict[str, Path] = {}
        if spec.disk is not None:
            own[jail_files.DISK] = spec.disk
        else:
            shared[jail_files.ROOTFS] = self.image.rootfs
        load = api.SnapshotLoadParams(
            snapshot_path=jail_files.VMSTATE,
            mem_backend=api.MemoryBackend(backend_type="File", backend_path=jail_files.MEMORY),
            network_overrides=(api.NetworkOverride(iface_id=IFACE, host_dev_name=spec.tap),),
            resume_vm=False,
        )
        calls = [api.snapshot_load(load), api.mmds(_metadata(spec)), api.resume()]
        return await self._launch(spec, shared, own, calls, restored_from=snapshot)

    async def adopt(self, spec: VmSpec, running: Running) -> FirecrackerVm:
        """Take over the Firecracker ``running`` names (its API socket is
        ``running.control_socket``); returns once it says its guest runs."""
        proc = AdoptedProcess.open(running)
        jail = self.jail_for(spec)
        client = ApiClient(running.control_socket, api.Phase.RUNNING)
        vm = FirecrackerVm(proc, spec, jail, client)
        try:
            with trio.fail_after(STARTUP_TIMEOUT):
                found = api.instance_info(await client.call(api.describe()))
        except (trio.TooSlowError, api.ApiError) as exc:
            proc.close()
            why = "no answer" if isinstance(exc, trio.TooSlowError) else str(exc)
            raise DriverError(f"{spec.name}: adopt: {why}") from None
        except BaseException:
            proc.close()
            raise
        if found.state != "Running":
            proc.close()
            raise DriverError(f"{spec.name}: adopt: the VM is {found.state}, not running")
        vm.image_key = self.image.key
        return vm

    async def _launch(
        self,
        spec: VmSpec,
        shared: dict[str, Path],
        own: dict[str, Path],
        calls: list[api.Request],
        *,
        restored_from: Path | None,
    ) -> FirecrackerVm:
        jail = self.jail_for(spec)
        argv = jailer_argv(
            self.jailer,
            self.firecracker,
            jail,
            netns=spec.netns,
            cgroup=spec.cgroup,
            memory_mib=spec.memory_mib,
        )
        await trio.to_thread.run_sync(jail_files.make, jail, shared, own)
        env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
        try:
            if spec.tap is not None and spec.netns is not None:
                # The pool's tap, in the VM's own namespace (without one, a tap the
                # caller made must already be the jailed uid's).
                await trio.to_thread.run_sync(
                    jail_files.hand_tap, spec.tap, spec.netns, jail.uid, jail.gid
                )
            log_fd = open_log(spec.log_path)
        except BaseException as exc:
            await trio.to_thread.run_sync(jail_files.remove, jail)
            if isinstance(exc, OSError):
                where = exc.filename or spec.tap
                raise DriverError(f"{spec.name}: {where}: {exc.strerror}") from exc
            raise
        try:
            proc = await open_vmm(argv, log_fd=log_fd, env=env)
        except OSError as exc:
            await trio.to_thread.run_sync(jail_files.remove, jail)
            raise DriverError(f"starting {spec.name}: {exc.strerror or exc}") from exc
        finally:
            os.close(log_fd)
        vm = FirecrackerVm(proc, spec, jail, ApiClient(jail.api_socket))
        vm.image_key = self.image.key
        vm.restored_from = restored_from
        try:
            with trio.fail_after(STARTUP_TIMEOUT):
                for request in calls:
                    await vm.while_running(partial(vm.client.call, request))
        except BaseException as exc:
            # Failed or cancelled before the hand-over: nobody else knows this VMM yet.
            with trio.CancelScope(shield=True):
                await vm.kill()
            what = "restore" if restored_from is not None else "start"
            if isinstance(exc, trio.TooSlowError):
                raise DriverError(
                    f"{spec.name}: Firecracker did not answer within {STARTUP_TIMEOUT:g}s"
                ) from None
            if isinstance(exc, VmmExited):
                raise DriverError(f"{spec.name}: {what}: {vm.exit_text()}") from None
            if isinstance(exc, api.ApiError):
                raise DriverError(f"{spec.name}: {what}: {exc}") from exc
            raise
        return vm


def _metadata(spec: VmSpec) -> dict[str, object]:
    """What MMDS tells the guest about itself: who it is, never its token."""
    return {"fireclaw": {"vm_id": spec.vm_id, "name": spec.name, "role": spec.role}}


def _load_info(snapshot: Path) -> SnapshotInfo:
    info = load_info(snapshot, _info_decoder)
    if info.driver != "firecracker" or "/" in info.memory:
        raise DriverError(f"snapshot {snapshot} is not a Firecracker snapshot")
    return info
