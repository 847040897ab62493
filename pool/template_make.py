"""Making one snapshot template: its files, and the VM booted, parked and snapshotted.

A template's files in the templates directory, named by the first 16 hex
digits of its key: ``<key>.snap`` and the driver's ``<key>.snap.json`` (the
device state and what it was taken with), ``<key>.json`` (``TemplateRecord``:
who the guest inside says it is), ``<key>.mem`` (its RAM) and, on an image
disk, its own root disk frozen at the snapshot: ``<key>.qcow2`` (an overlay)
or ``<key>.raw`` (a raw copy), as the driver takes disks. What is
done with them (which roles want which, retries, removal) is
``pool/templates.py``.

The template's guest is snapshotted parked (welcomed, beating) with its host
still on the control channel. On a channel device (QEMU's virtio-serial port)
that is what every clone wakes up to: its new host is already on the port,
says Attach, and the guest answers at once, without a dial.

Errors::

    TemplateError       a template could not be made (one line)
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgspec
import trio
from fireclaw.config import Role
from fireclaw.guest_daemon import protocol as p
from fireclaw.guest_daemon.channel import ChannelClosed
from fireclaw.pool import cgroup, disks, netns
from fireclaw.pool.channel import accept_dialled, attach
from fireclaw.pool.control import GuestLost
from fireclaw.pool.drivers.base import (
    CONTROL_PORT,
    WORKSPACE_BYTES,
    WORKSPACE_SERIAL,
    ChannelKind,
    Driver,
    DriverError,
    Snapshot,
    VmHandle,
    VmSpec,
    info_path,
)
from fireclaw.pool.network import GATEWAY, GUEST_CIDR, TAP, TAP_MAC, Link
from fireclaw.pool.procid import process_identity
from fireclaw.pool.runtime import SETUP_ERRORS, Runtime
from fireclaw.pool.store import VmRecord
from fireclaw.pool.teardown import release

log = logging.getLogger("fireclaw.templates")

#: The template's guest beats this often while parked, and so does every clone
#: until its new Welcome: on a dialled channel a clone finds its dead connection
#: at its first beat after restore and dials again, so this bounds
#: restore-to-connected (on a port the new host comes to the guest instead).
TEMPLATE_HEARTBEAT: Final = 0.025
#: Pausing the VM and writing its state (tens of MiB) to a local file.
SNAPSHOT_TIMEOUT: Final = 120.0
SNAP_SUFFIX: Final = ".snap"
RECORD_SUFFIX: Final = ".json"
#: The template's RAM: clones map it privately instead of reading it from the snapshot.
MEMORY_SUFFIX: Final = ".mem"


class TemplateError(Exception):
    """A template could not be made."""


class TemplateRecord(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``<key>.json``: who the guest inside the snapshot says it is."""

    key: str
    vm_id: str
    token: str
    port: int
    role: str
    made_at: float
    boot_seconds: float


_record_decoder: Final = msgspec.json.Decoder(TemplateRecord)


@dataclass(frozen=True)
class Template:
    key: str  # the full hash; files are named by ``short``
    snapshot: Path
    vm_id: str  # the template's: every clone says Hello with it
    token: str
    port: int  # every clone dials GATEWAY:port, so it listens there in each namespace
    #: The template's root disk, frozen at the snapshot: each clone's overlay sits
    #: on it, or each clone's raw disk is a copy of it (None: the template ran on
    #: the image's read-only root).
    disk: Path | None = None

    @property
    def short(self) -> str:
        return self.key[:16]


def template_key(driver: Driver, role: Role) -> str:
    """The hash of everything a clone of ``role``'s template shares with it: what
    the driver says a snapshot of it depends on, and the pool's own choices."""
    described = driver.describe()
    inputs = {
        **described.key_inputs,
        "vcpus": role.resources.vcpus,
        "memory_mib": role.resources.memory_mib,
        "control_port": CONTROL_PORT,
        "network": f"tap {TAP} {TAP_MAC} {GUEST_CIDR} via {GATEWAY}",
        "disk": f"{described.disk.value}, rw; spare {WORKSPACE_BYTES} {WORKSPACE_SERIAL}",
        "memory": "file, mapped privately by clones",
        "heartbeat": TEMPLATE_HEARTBEAT,
        "protocol": p.PROTOCOL_VERSION,
    }
    return hashlib.sha256(msgspec.json.encode(inputs, order="sorted")).hexdigest()


def _fresh_private_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))


def _write_atomic(path: Path, data: bytes) -> None:
    aside = path.with_name(f".{path.name}.partial")
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(aside, path)


class TemplateMaker:
    """Makes and finds the templates of one supervisor in ``directory``."""

    def __init__(self, rt: Runtime, driver: Driver, directory: Path) -> None:
        self.rt = rt
        self.driver = driver
        self.directory = directory
        #: How blocking file and cgroup work runs off the event loop.
        self._run_sync: Callable[..., Awaitable[Any]] = trio.to_thread.run_sync

    def _files(self, template: Template) -> list[Path]:
        """What a clone of ``template`` reads: its state, its RAM, its disk."""
        disk = [template.disk] if template.disk is not None else []
        return [template.snapshot, self._memory_path(template.key), *disk]

    def _load(self, key: str) -> Template | None:
        """The complete template ``key`` left in the directory, if there is one."""
        snap = self._snap_path(key)
        try:
            record = _record_decoder.decode(self._record_path(key).read_bytes())
        except (OSError, msgspec.DecodeError):
            return None
        disk = self._disk_path(key) if self.rt.base_disk is not None else None
        if record.key != key or not snap.is_file() or not info_path(snap).is_file():
            return None
        if disk is not None and not disk.is_file():
            return None
        if not self._memory_path(key).is_file():
            return None
        return Template(
            key=key,
            snapshot=snap,
            vm_id=record.vm_id,
            token=record.token,
            port=record.port,
            disk=disk,
        )

    async def _boot_and_snapshot(self, key: str, role: Role) -> Template:
        rt = self.rt
        short = key[:16]
        name = f"template-{short[:8]}"
        vm_id = f"{rt.instance}-tpl-{short[:8]}-{secrets.token_hex(3)}"
        token = secrets.token_urlsafe(24)
        ns_name = netns.PREFIX + vm_id
        cg = cgroup.path_for(vm_id) if rt.use_cgroups else None
        log_path = rt.state_dir / "logs" / f"{name}.log"
        handle: VmHandle | None = None
        sock: socket.socket | None = None
        link: Link | None = None
        disk = self._disk_path(key) if rt.base_disk is not None else None
        made = False
        assert rt.network is not None, "templates need the swarm's network"
        log.info("template %s for %s: booting", short, role.name)
        self._register(name, role.name, ns_name, cg, log_path, pid=0)
        started = trio.current_time()
        try:
            try:
                await self._run_sync(self._mkdir)
                # A guest on a channel device dials nothing: no listener for it.
                dialled = self.driver.describe().channel is ChannelKind.DIALLED
                sock, link = await rt.network.attach(ns_name, CONTROL_PORT, listen=dialled)
                if cg is not None:
                    limit = role.resources.memory_mib + rt.vmm_overhead_mib
                    cg = await self._run_sync(cgroup.create, vm_id, limit)
                if disk is not None:
                    assert rt.base_disk is not None
                    await disks.create_disk(
                        disk, rt.base_disk, self.driver.describe().disk, from_template=False
                    )
                # Fresh, and readable by root only: it will hold the guest's RAM.
                await self._run_sync(_fresh_private_file, self._memory_path(key))
                spec = VmSpec(
                    vm_id=vm_id,
                    name=name,
                    role=role.name,
                    vcpus=role.resources.vcpus,
                    memory_mib=role.resources.memory_mib,
                    control_url=f"ws://{GATEWAY}:{CONTROL_PORT}/",
                    token=token,
                    netns=ns_name,
                    cgroup=cg,
                    log_path=log_path,
                    tap=TAP,
                    disk=disk,
                    memory_file=self._memory_path(key),
                )
                handle = await self.driver.start(spec)
                self._register(name, role.name, ns_name, cg, log_path, pid=handle.pid)
                listener = (
                    trio.SocketListener(trio.socket.from_stdlib_socket(sock))
                    if sock is not None
                    else None
                )
                sock = None  # the listener owns it now
                try:
                    boot_seconds, taken = await self._park_and_snapshot(handle, listener, key, spec)
                finally:
                    if listener is not None:
                        await listener.aclose()
                made = True
            except SETUP_ERRORS as exc:
                raise TemplateError(_one_line(exc)) from exc
        finally:
            with trio.CancelScope(shield=True):
                # The snapshot is taken, or will never be: the VMM is killed at once.
                await release(
                    rt,
                    name,
                    handle,
                    exited=trio.Event(),
                    terminate=False,
                    sock=sock,
                    cg=cg,
                    link=link,
                )
                if not made:  # kept only with a whole snapshot
                    disks.remove(self._memory_path(key))
                    if disk is not None:
                        disks.remove(disk)
        total = trio.current_time() - started
        log.info(
            "template %s for %s: booted and parked in %.1f s, snapshot %.1f MiB in %.2f s",
            short,
            role.name,
            boot_seconds,
            taken.size / 2**20,
            taken.seconds,
        )
        rt.event(
            "template_made",
            f"template-{short}",
            role=role.name,
            boot_seconds=round(boot_seconds, 3),
            snapshot_seconds=round(taken.seconds, 3),
            seconds=round(total, 3),
            size=taken.size,
        )
        return Template(
            key=key, snapshot=taken.path, vm_id=vm_id, token=token, port=CONTROL_PORT, disk=disk
        )

    async def _park_and_snapshot(
        self,
        handle: VmHandle,
        listener: trio.SocketListener | None,
        key: str,
        spec: VmSpec,
    ) -> tuple[float, Snapshot]:
        """Wait for the template's guest to say Hello, welcome it and see its first
        heartbeat (then it is parked), and snapshot it while its connection is still
        open. Returns the seconds from the VMM's start to parked, and the snapshot."""
        started = trio.current_time()
        boot_timeout = self.rt.control.boot_timeout
        control = msgspec.structs.replace(self.rt.control, heartbeat_interval=TEMPLATE_HEARTBEAT)
        exited: list[int | None] = []
        done: list[tuple[float, Snapshot]] = []
        error = ""
        snapshotting = False
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                exited.append(await handle.wait())
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            port: trio.abc.Stream | None = None
            try:
                with trio.fail_after(boot_timeout):
                    # The snapshot is taken with the host still on the channel: a
                    # clone's guest, whose new host is there as it wakes, sees no change.
                    if listener is not None:  # the guest dials
                        session = await accept_dialled(
                            nursery, listener, vm_id=spec.vm_id, token=spec.token, spec=control
                        )
                    else:
                        port = await handle.open_channel()
                        session = await attach(
                            port, vm_id=spec.vm_id, token=spec.token, spec=control
                        )
                    beat = p.decode_guest(await session.channel.get_message())
                parked = trio.current_time() - started
                if not isinstance(beat, p.Heartbeat):
                    error = f"the template's guest sent {type(beat).__name__}, not a heartbeat"
                else:
                    record = TemplateRecord(
                        key=key,
                        vm_id=spec.vm_id,
                        token=spec.token,
                        port=CONTROL_PORT,
                        role=spec.role,
                        made_at=time.time(),
                        boot_seconds=round(parked, 3),
                    )
                    await self._run_sync(
                        _write_atomic, self._record_path(key), msgspec.json.encode(record)
                    )
                    snapshotting = True
                    with trio.fail_after(SNAPSHOT_TIMEOUT):
                        taken = await self._snapshot(handle, spec, self._snap_path(key))
                    done.append((parked, taken))
            except trio.TooSlowError:
                error = (
                    f"the snapshot took longer than {SNAPSHOT_TIMEOUT:g}s"
                    if snapshotting
                    else f"the template's guest did not connect within {boot_timeout:g}s"
                )
            except (GuestLost, p.ProtocolError, ChannelClosed, trio.BrokenResourceError) as exc:
                error = f"the template's guest: {_one_line(exc)}"
            except (DriverError, OSError) as exc:
                error = _one_line(exc)
            finally:
                if port is not None:
                    with trio.CancelScope(shield=True):
                        await port.aclose()
            nursery.cancel_scope.cancel()
        if done:
            return done[0]
        if exited and not error:
            error = f"the template VM ended while booting: {handle.exit_text()}"
        raise TemplateError(error or "the template VM ended while booting")

    async def _snapshot(self, vm: VmHandle, spec: VmSpec, path: Path) -> Snapshot:
        """Pause ``vm`` and write its state to ``path`` (and ``PATH.json``), atomically."""
        return await vm.snapshot(path)

    def _mkdir(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    def _snap_path(self, key: str) -> Path:
        return self.directory / f"{key[:16]}{SNAP_SUFFIX}"

    def _memory_path(self, key: str) -> Path:
        return self.directory / f"{key[:16]}{MEMORY_SUFFIX}"

    def _disk_path(self, key: str) -> Path:
        return self.directory / f"{key[:16]}{disks.SUFFIXES[self.driver.describe().disk]}"

    def _record_path(self, key: str) -> Path:
        return self.directory / f"{key[:16]}{RECORD_SUFFIX}"

    def _register(
        self, name: str, role: str, ns_name: str, cg: Path | None, log_path: Path, *, pid: int
    ) -> None:
        """Write-ahead, like a pool VM: a supervisor killed meanwhile reclaims it."""
        ident = process_identity(pid) if pid else None
        self.rt.store.put_vm(
            VmRecord(
                name=name,
                role=role,
                pid=pid,
                start_time=ident.start_time if ident else 0,
                boot_id=ident.boot_id if ident else "",
                spec_hash="template",
                netns=ns_name,
                cgroup=str(cg) if cg else None,
                socket=None,
                log=str(log_path),
            )
        )


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
