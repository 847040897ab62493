"""Snapshot templates: a parked, paused VM per shape, cloned into the warm pool.

A role's template is keyed by ``template_key``: a hash of the image key, the
accelerator, vcpus, memory, its network, disks and RAM file, and what the
guest sees of the control channel (the fixed control port, the heartbeat it
was welcomed with, the protocol version). The first VM of a role that asks
for it makes it, once, in the background: a VM is cold-booted in a network
namespace of its own (``fireclaw.pool.network``: a tap, a veth) with its
control listener on ``GATEWAY:CONTROL_PORT``, on its own overlay disk
(``<key>.qcow2``) and with its RAM in a file (``<key>.mem``); its guest daemon
says Hello, takes a Welcome and beats (parked: imports done, nothing to do),
and the VM is paused and its device state migrated to ``<dir>/<key>.snap``.
Beside it: the driver's ``<key>.snap.json`` (what the snapshot was taken with)
and our ``<key>.json``, the guest's vm_id and token, written first, so that a
``.snap`` under its final name (the driver writes it aside and renames it)
always comes with both. The template VM is then killed; its overlay and RAM
file stay frozen. Later VMs, and later supervisors, restore clones from
those files: each clone's overlay sits on the template's, and it maps the
RAM file privately.

A template that cannot be made is remembered with its reason: that role's VMs
cold-boot instead, and ``describe`` says so. It is tried again after a delay
(full jitter, doubling from ``RETRY_BASE`` up to ``RETRY_MAX``), one attempt at a
time, until it is made or no role wants that key any more. A template whose
restore fails is dropped and made again on the next ask. Files of templates
nobody wants any more (no role asks for that key, no clone restored from it
runs) are removed.

Errors::

    TemplateError       a template could not be made (one line)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec
import trio
import trio_websocket
from fireclaw.config import Role
from fireclaw.guest_daemon import protocol as p
from fireclaw.pool import cgroup, disks, netns
from fireclaw.pool.backoff import MAX_EXPONENT
from fireclaw.pool.control import ControlSession, GuestLost
from fireclaw.pool.drivers.base import (
    CONTROL_PORT,
    WORKSPACE_BYTES,
    WORKSPACE_SERIAL,
    Driver,
    DriverError,
    Snapshot,
    VmHandle,
    VmSpec,
    info_path,
)
from fireclaw.pool.network import GATEWAY, GUEST_CIDR, TAP, TAP_MAC, Link
from fireclaw.pool.procid import process_identity
from fireclaw.pool.store import VmRecord
from fireclaw.pool.vm import SETUP_ERRORS

if TYPE_CHECKING:
    from fireclaw.pool.vm import Runtime

log = logging.getLogger("fireclaw.templates")

#: The template's guest beats this often while parked, and so does every clone
#: until its new Welcome: a clone finds its dead connection at its first beat
#: after restore and dials again, so this bounds restore-to-connected.
TEMPLATE_HEARTBEAT: Final = 0.025
#: Pausing the VM and writing its state (tens of MiB) to a local file.
SNAPSHOT_TIMEOUT: Final = 120.0
SNAP_SUFFIX: Final = ".snap"
RECORD_SUFFIX: Final = ".json"
#: The template's RAM: clones map it privately instead of reading it from the snapshot.
MEMORY_SUFFIX: Final = ".mem"
#: After a failed attempt the next waits ``uniform(0, min(RETRY_MAX, RETRY_BASE * 2**n))``
#: seconds, ``n`` the failures in a row before it: a boot that timed out is worth another
#: try, but not a VM booting all the time when it never works.
RETRY_BASE: Final = 5.0
RETRY_MAX: Final = 300.0


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
    #: The template's root overlay, frozen at the snapshot: each clone's overlay sits
    #: on it (None: the template ran on the image's read-only root).
    disk: Path | None = None

    @property
    def short(self) -> str:
        return self.key[:16]


@dataclass
class _Entry:
    key: str
    ready: trio.Event = field(default_factory=trio.Event)  # the first attempt has ended
    template: Template | None = None
    error: str | None = None  # why the last attempt failed
    making: bool = True  # an attempt is under way
    users: int = 0  # clones restored from it that are still running
    failures: int = 0  # failed attempts in a row
    retry_at: float | None = None  # trio time of the next attempt, while waiting for it
    dropped: trio.Event = field(default_factory=trio.Event)  # by _prune: no more attempts


def retry_delay(failures: int, uniform: Callable[[float, float], float]) -> float:
    """Seconds to wait before the next attempt after ``failures`` (1 or more)
    failed ones in a row: full jitter over ``RETRY_BASE * 2**(failures - 1)``,
    capped at ``RETRY_MAX``."""
    exponent = min(max(failures - 1, 0), MAX_EXPONENT)
    return uniform(0.0, min(RETRY_MAX, RETRY_BASE * 2.0**exponent))


def template_key(driver: Driver, role: Role) -> str:
    """The hash of everything a clone of ``role``'s template shares with it: what
    the driver says a snapshot of it depends on, and the pool's own choices."""
    inputs = {
        **driver.describe().key_inputs,
        "vcpus": role.resources.vcpus,
        "memory_mib": role.resources.memory_mib,
        "control_port": CONTROL_PORT,
        "network": f"tap {TAP} {TAP_MAC} {GUEST_CIDR} via {GATEWAY}",
        "disk": f"qcow2 overlay, rw; spare {WORKSPACE_BYTES} {WORKSPACE_SERIAL}",
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


class Templates:
    """The templates of one supervisor, in ``directory``. Start ``run`` first."""

    def __init__(self, rt: Runtime, driver: Driver, directory: Path) -> None:
        self.rt = rt
        self.driver = driver
        self.directory = directory
        self._entries: dict[str, _Entry] = {}
        self._wanted: dict[str, str] = {}  # role -> the key it asked for last
        self._nursery: trio.Nursery | None = None
        #: How blocking file and cgroup work runs off the event loop.
        self._run_sync: Callable[..., Awaitable[Any]] = trio.to_thread.run_sync

    def key_for(self, role: Role) -> str:
        return template_key(self.driver, role)

    async def run(
        self, keep: set[str], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Hold the nursery templates are made in; first remove the files of every
        template whose key is not in ``keep``."""
        await self._run_sync(self._remove_all_but, {k[:16] for k in keep})
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # --- what the pool asks ---------------------------------------------------------

    async def get(self, role: Role) -> Template | None:
        """``role``'s template, made first if need be; None if its first attempt
        failed and it is not made yet (the VM then cold-boots; later attempts are
        not waited for). Give it back with ``release`` once the clone ends."""
        key = self.key_for(role)
        self._wanted[role.name] = key
        entry = self._entries.get(key)
        if entry is None:
            assert self._nursery is not None, "Templates.run is not running"
            entry = self._entries[key] = _Entry(key)
            self._nursery.start_soon(self._make, entry, role)
            self._prune()  # the key this role asked for before may be unwanted now
        await entry.ready.wait()
        if entry.template is None:
            return None
        entry.users += 1
        return entry.template

    def release(self, template: Template) -> None:
        entry = self._entries.get(template.key)
        if entry is not None and entry.template is template:
            entry.users -= 1
            self._prune()

    def broken(self, template: Template, reason: str) -> None:
        """A clone could not be restored from ``template``: make it again on the next ask.

        Its files go at once: a clone that runs no longer needs them (its VMM has
        read the whole state before the clone runs)."""
        entry = self._entries.get(template.key)
        if entry is None or entry.template is not template:
            return  # dropped already, and perhaps made again since
        del self._entries[template.key]
        log.warning("template %s dropped: %s", template.short, reason)
        self.rt.event("template_dropped", f"template-{template.short}", reason=reason)
        self._remove_files(template.short)
        self.rt.bump()

    def describe(self, role: Role) -> str:
        """One line for ``status``: how this role's VMs start."""
        key = self._wanted.get(role.name)
        entry = self._entries.get(key) if key is not None else None
        if entry is None:
            return "snapshot template: not made yet"
        if entry.making and entry.error is None:
            return f"snapshot template {key[:16] if key else ''}: being made"
        if entry.template is None:
            if entry.making:
                retry = "; retrying now"
            elif entry.retry_at is not None:
                retry = f"; retrying in {max(0.0, entry.retry_at - trio.current_time()):.0f}s"
            else:
                retry = ""
            return f"cold boot (no snapshot template: {entry.error}{retry})"
        return f"restored from snapshot template {entry.template.short}"

    def forget(self, role_name: str) -> None:
        """``role_name`` is gone (removed on reload): its template is no longer
        wanted for it, so it is not tried again, and its files go once unused."""
        if self._wanted.pop(role_name, None) is not None:
            self._prune()

    async def restore(self, spec: VmSpec, template: Template) -> VmHandle:
        return await self.driver.restore(spec, template.snapshot)

    # --- making one ---------------------------------------------------------------

    async def _make(self, entry: _Entry, role: Role) -> None:
        """Make ``entry``'s template, one attempt at a time, with a backoff delay
        after each failure, until it is made or ``_prune`` drops the entry."""
        subject = f"template-{entry.key[:16]}"
        try:
            while True:
                try:
                    entry.template = await self._find_or_boot(entry.key, role)
                    entry.error = None
                    return
                except TemplateError as exc:
                    entry.error = str(exc)
                    entry.failures += 1
                entry.making = False
                entry.ready.set()  # the role's VMs cold-boot meanwhile
                self._prune()  # nobody may want this key any more: then no retry
                if entry.dropped.is_set():
                    log.warning("template for %s: %s; not wanted any more", role.name, entry.error)
                    self.rt.event(
                        "template_failed",
                        subject,
                        role=role.name,
                        reason=entry.error,
                        attempt=entry.failures,
                    )
                    return
                delay = retry_delay(entry.failures, self.rt.uniform)
                log.warning(
                    "template for %s: %s; its VMs cold-boot, retrying in %.1f s",
                    role.name,
                    entry.error,
                    delay,
                )
                self.rt.event(
                    "template_failed",
                    subject,
                    role=role.name,
                    reason=entry.error,
                    attempt=entry.failures,
                    retry_in=round(delay, 3),
                )
                entry.retry_at = trio.current_time() + delay
                self.rt.bump()
                with trio.move_on_after(delay):
                    await entry.dropped.wait()
                entry.retry_at = None
                if entry.dropped.is_set():
                    return
                entry.making = True
                log.info("template for %s: attempt %d", role.name, entry.failures + 1)
                self.rt.event(
                    "template_retry",
                    subject,
                    role=role.name,
                    attempt=entry.failures + 1,
                    delay=round(delay, 3),
                )
                self.rt.bump()
        finally:
            if entry.template is None and entry.error is None:
                entry.error = "cancelled"
            entry.retry_at = None
            entry.making = False
            entry.ready.set()
            self.rt.bump()

    async def _find_or_boot(self, key: str, role: Role) -> Template:
        """The template ``key`` left in the directory, or else a new one. Raises
        ``TemplateError``."""
        found: Template | None = await self._run_sync(self._load, key)
        if found is None:
            return await self._boot_and_snapshot(key, role)
        log.info("template %s for %s: reusing %s", found.short, role.name, found.snapshot)
        self.rt.event("template_reused", f"template-{found.short}", role=role.name)
        return found

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
                sock, link = await rt.network.attach(ns_name, CONTROL_PORT)
                if cg is not None:
                    limit = role.resources.memory_mib + rt.vmm_overhead_mib
                    cg = await self._run_sync(cgroup.create, vm_id, limit)
                if disk is not None:
                    assert rt.base_disk is not None
                    await disks.create_overlay(disk, rt.base_disk, "raw")
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
                listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
                sock = None  # the listener owns it now
                async with listener:
                    boot_seconds, taken = await self._park_and_snapshot(handle, listener, key, spec)
                made = True
            except SETUP_ERRORS as exc:
                raise TemplateError(_one_line(exc)) from exc
        finally:
            with trio.CancelScope(shield=True):
                await self._teardown(name, handle, sock, cg, link)
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
        listener: trio.SocketListener,
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
            try:
                with trio.fail_after(boot_timeout):
                    stream = await listener.accept()
                    request = await trio_websocket.wrap_server_stream(
                        nursery, stream, max_message_size=control.max_message_bytes
                    )
                    ws = await request.accept()
                    await ControlSession.handshake(
                        ws, vm_id=spec.vm_id, token=spec.token, spec=control
                    )
                    beat = p.decode_guest(await ws.get_message())
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
            except (
                GuestLost,
                p.ProtocolError,
                trio_websocket.HandshakeError,
                trio_websocket.ConnectionClosed,
                trio.BrokenResourceError,
            ) as exc:
                error = f"the template's guest: {_one_line(exc)}"
            except (DriverError, OSError) as exc:
                error = _one_line(exc)
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
        return self.directory / f"{key[:16]}{disks.SUFFIX}"

    def _record_path(self, key: str) -> Path:
        return self.directory / f"{key[:16]}{RECORD_SUFFIX}"

    async def _teardown(
        self,
        name: str,
        handle: VmHandle | None,
        sock: socket.socket | None,
        cg: Path | None,
        link: Link | None,
    ) -> None:
        with trio.move_on_after(self.rt.stop.term_timeout + 10):
            if handle is not None:
                await handle.kill()  # the snapshot is taken, or will never be
            if sock is not None:
                sock.close()
            if cg is not None:
                with contextlib.suppress(cgroup.CgroupError):
                    await self._run_sync(cgroup.remove, cg)
            if link is not None and self.rt.network is not None:
                with contextlib.suppress(netns.NetnsError):
                    await self.rt.network.detach(link)
            self.rt.store.drop_vm(name)

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

    # --- removing the unwanted ------------------------------------------------------

    def _prune(self) -> None:
        wanted = set(self._wanted.values())
        for key, entry in list(self._entries.items()):
            if key in wanted or entry.users > 0 or entry.making:
                continue  # an attempt under way checks again once it has failed
            del self._entries[key]
            entry.dropped.set()  # a failed one waiting for its next attempt stops there
            if entry.template is not None:
                log.info("template %s is no longer used: removing it", entry.template.short)
                self._remove_files(entry.template.short)

    def _remove_files(self, short: str) -> None:
        for suffix in (
            SNAP_SUFFIX,
            SNAP_SUFFIX + ".json",
            RECORD_SUFFIX,
            disks.SUFFIX,
            MEMORY_SUFFIX,
        ):
            with contextlib.suppress(FileNotFoundError):
                (self.directory / f"{short}{suffix}").unlink()

    def _remove_all_but(self, keep: set[str]) -> None:
        """Remove every template file whose key is not in ``keep``, and every file
        written aside (``.NAME.partial``) that a killed supervisor left."""
        try:
            found = list(self.directory.iterdir())
        except OSError:
            return  # no directory yet (or not a usable one: making a template says so)
        for path in found:
            short = path.name.split(".", 1)[0]
            if path.name.startswith(".") or short not in keep:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
