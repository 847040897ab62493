"""Snapshot templates: a parked, paused VM per shape, cloned into the warm pool.

A role's template is keyed by ``template_key``: a hash of the image key, the
accelerator, vcpus, memory, its network, disks and RAM file, and what the
guest sees of the control channel (the fixed control port, the heartbeat it
was welcomed with, the protocol version). The first VM of a role that asks
for it makes it, once, in the background: a VM is cold-booted in a network
namespace of its own (``fireclaw.pool.network``: a tap, a veth) with its
control listener on ``GATEWAY:CONTROL_PORT`` (or, on a channel device, the
host on its port), on its own overlay disk
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

The files of one template, and making one, are ``pool/template_make.py``.

Errors::

    TemplateError       a template could not be made (one line; template_make.py)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio
from fireclaw.config import Backoff, Role
from fireclaw.pool import disks
from fireclaw.pool.backoff import backoff_delay
from fireclaw.pool.drivers.base import Driver, DriverError, VmHandle, VmSpec
from fireclaw.pool.template_make import (
    Template,
    TemplateError,
    TemplateMaker,
    template_key,
)

if TYPE_CHECKING:
    from fireclaw.pool.runtime import Runtime

log = logging.getLogger("fireclaw.templates")

#: After a failed attempt the next waits ``uniform(0, min(RETRY_MAX, RETRY_BASE * 2**n))``
#: seconds, ``n`` the failures in a row before it: a boot that timed out is worth another
#: try, but not a VM booting all the time when it never works.
RETRY_BASE: Final = 5.0
RETRY_MAX: Final = 300.0
RETRY: Final = Backoff(base=RETRY_BASE, max=RETRY_MAX)


@dataclass
class _Entry:
    key: str
    ready: trio.Event = field(default_factory=trio.Event)  # the first attempt has ended
    template: Template | None = None
    error: str | None = None  # why the last attempt failed
    making: bool = True  # an attempt is under way
    users: int = 0  # clones restored from it that are still running
    pending: int = 0  # of those, the ones still setting up or restoring: they need its files
    broken: str | None = None  # why a clone could not be restored from it
    retired: trio.Event = field(default_factory=trio.Event)  # broken, and its files gone
    failures: int = 0  # failed attempts in a row
    retry_at: float | None = None  # trio time of the next attempt, while waiting for it
    dropped: trio.Event = field(default_factory=trio.Event)  # by _prune: no more attempts


def retry_delay(failures: int, uniform: Callable[[float, float], float]) -> float:
    """Seconds to wait before the next attempt after ``failures`` (1 or more)
    failed ones in a row: full jitter over ``RETRY_BASE * 2**(failures - 1)``,
    capped at ``RETRY_MAX``."""
    return backoff_delay(RETRY, max(failures - 1, 0), uniform)


class Templates(TemplateMaker):
    """The templates of one supervisor, in ``directory``. Start ``run`` first."""

    def __init__(self, rt: Runtime, driver: Driver, directory: Path) -> None:
        super().__init__(rt, driver, directory)
        self._entries: dict[str, _Entry] = {}
        self._wanted: dict[str, str] = {}  # role -> the key it asked for last
        self._nursery: trio.Nursery | None = None

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
        key = self._wanted[role.name] = self.key_for(role)
        entry = self._entries.get(key)
        while entry is not None and entry.broken is not None:
            await entry.retired.wait()  # made again once no clone needs its files
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
        entry.pending += 1
        return entry.template

    def release(self, template: Template, *, settled: bool = True) -> None:
        """A clone of ``template`` has ended; ``settled``: it got as far as its restore
        (else it still counted as needing the files)."""
        entry = self._entries.get(template.key)
        if entry is not None and entry.template is template:
            entry.users -= 1
            if not settled:
                self._settle(entry)
            self._prune()

    def broken(self, template: Template, reason: str) -> None:
        """A clone could not be restored from ``template``: make it again on the next ask.

        Its files go once no other clone is still setting up or restoring from it
        (another role's clone may be, when roles share a key); a clone that runs no
        longer needs them (its VMM has read the whole state before the clone runs).
        Until then, asking for this key waits."""
        entry = self._entries.get(template.key)
        if entry is None or entry.template is not template or entry.broken is not None:
            return  # dropped already, and perhaps made again since
        entry.broken = reason
        log.warning("template %s dropped: %s", template.short, reason)
        self.rt.event("template_dropped", f"template-{template.short}", reason=reason)
        self._retire_if_settled(entry)
        self.rt.bump()

    def _settle(self, entry: _Entry) -> None:
        entry.pending -= 1
        self._retire_if_settled(entry)

    def _retire_if_settled(self, entry: _Entry) -> None:
        if entry.broken is None or entry.pending > 0 or entry.retired.is_set():
            return
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        assert entry.template is not None
        self._remove_files(entry.template.short)
        entry.retired.set()

    def describe(self, role: Role) -> str:
        """One line for ``status``: how this role's VMs start."""
        key = self._wanted.get(role.name)
        entry = self._entries.get(key) if key is not None else None
        if entry is None:
            return "snapshot template: not made yet"
        if entry.making and entry.error is None:
            return f"snapshot template {key[:16] if key else ''}: being made"
        if entry.broken is not None:
            return f"snapshot template {key[:16] if key else ''}: dropped, made again once unused"
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
        """Restore a clone of ``template`` (which ``get`` gave it); a restore that
        fails drops the template (``broken``). Either way the clone no longer
        needs the template's files: ``release`` it with ``settled=True``."""
        entry = self._entries.get(template.key)
        try:
            return await self.driver.restore(spec, template.snapshot)
        except DriverError as exc:
            self.broken(template, str(exc))
            raise
        finally:
            if entry is not None and entry.template is template:
                self._settle(entry)

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
            made = await self._boot_and_snapshot(key, role)
            await self._run_sync(disks.preread, self._files(made))
            return made
        log.info("template %s for %s: reusing %s", found.short, role.name, found.snapshot)
        self.rt.event("template_reused", f"template-{found.short}", role=role.name)
        # Every clone reads these: from the page cache, not the disk, from the first on.
        await self._run_sync(disks.preread, self._files(found))
        return found

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
        # Every file named by the key: the pool's (record, RAM, root disk) and
        # whatever the driver wrote beside its snapshot (``PATH.json``, its own
        # memory file).
        for path in self.directory.glob(f"{short}.*"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        # The blank its clones' overlays were copied from (``disks.blank_path``).
        for blank in self.directory.glob(f".{short}{disks.SUFFIX}{disks.BLANK_INFIX}*"):
            with contextlib.suppress(FileNotFoundError):
                blank.unlink()

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
