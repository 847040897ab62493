"""One incarnation of a VM child: its resources made, its VMM cold-booted,
restored from a snapshot template or adopted, served, and torn down."""

from __future__ import annotations

import logging
import secrets
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import trio
from fireclaw.guest_daemon.channel import FramedChannel
from fireclaw.pool import cgroup, disks, netns, steps
from fireclaw.pool.control import GuestLost
from fireclaw.pool.drivers.base import ChannelKind, DriverError, Running, VmHandle, VmSpec
from fireclaw.pool.lifecycle import Event
from fireclaw.pool.network import TAP, Link
from fireclaw.pool.procid import process_identity
from fireclaw.pool.runtime import SETUP_ERRORS
from fireclaw.pool.store import VmRecord
from fireclaw.pool.teardown import kill_recorded, release
from fireclaw.pool.vm_base import Outcome
from fireclaw.pool.vm_serve import ChildServing, loopback_listener

if TYPE_CHECKING:
    from fireclaw.pool.template_make import Template

log = logging.getLogger("fireclaw.vm")


class ChildIncarnation(ChildServing):
    """A child's VMs, one incarnation at a time."""

    async def _incarnate(self) -> Outcome:
        adopt, self._adopt = self._adopt, None
        if adopt is not None:
            return await self._incarnate_adopted(adopt)
        templates = self.rt.templates
        template = None
        if templates is not None and self.rt.isolate_net:
            template = await templates.get(self.group.role)  # None: cold boot
        self._template_settled = False
        try:
            return await self._incarnate_from(template)
        finally:
            if templates is not None and template is not None:
                templates.release(template, settled=self._template_settled)

    async def _incarnate_from(self, template: Template | None) -> Outcome:
        """One VM: cold-booted, or restored from ``template``."""
        with steps.tracing():
            return await self._incarnate_traced(template)

    async def _incarnate_traced(self, template: Template | None) -> Outcome:
        role = self.group.role
        outcome = Outcome()
        self._exited = trio.Event()
        self._workspace_in = None
        rt = self.rt
        listener_sock: socket.socket | None = None
        link: Link | None = None
        attached: FramedChannel | None = None  # the VM's control port, Attach said on it
        await rt.boots.acquire_on_behalf_of(self)
        steps.mark("boot slot")
        self._booting = True
        # Taken with no checkpoint before the registry names it: from here it is
        # this incarnation's, released by its teardown like what it makes itself.
        spare = self.group.spare.take()
        vm_id = f"{rt.instance}-{self.name}-{secrets.token_hex(3)}"
        if spare is not None:
            vm_id = spare.vm_id
        token = secrets.token_urlsafe(24)
        # A clone says Hello with its template's vm_id and token, the same in every
        # clone: which VM dialled is known by the namespace it dialled from (one VM
        # and one listener per namespace), and the token still proves it is ours.
        expect_id, expect_token = (template.vm_id, template.token) if template else (vm_id, token)
        ns_name = netns.PREFIX + vm_id if rt.isolate_net else None
        cg = cgroup.path_for(vm_id) if rt.use_cgroups else None
        disk_format = rt.driver.describe().disk
        disk = (
            rt.disks_dir / f"{vm_id}{disks.SUFFIXES[disk_format]}"
            if rt.disks_dir is not None and rt.base_disk is not None
            else None
        )
        # Write-ahead: the registry names what this incarnation will create before it
        # exists, so a supervisor killed at any point leaves nothing unaccounted for.
        self._row = VmRecord(
            name=self.name,
            role=role.name,
            pid=0,
            start_time=0,
            boot_id="",
            spec_hash=self.group.spec_hash,
            netns=ns_name,
            cgroup=str(cg) if cg else None,
            log=str(self._log_path),
            vm_id=vm_id,
            disk=str(disk) if disk else None,
            guest_id=expect_id,
            guest_token=expect_token,
        )
        self._register()
        try:
            try:
                # A clone dials the port baked into its template, in every namespace.
                # A guest on a channel device dials nothing: no listener for it.
                port = template.port if template is not None else 0
                dialled = rt.driver.describe().channel is ChannelKind.DIALLED
                if spare is not None:  # made ahead (``pool.spare``)
                    link = spare.link
                    self._register(veth=link.veth, address=link.address)
                    steps.mark("namespace")
                elif rt.network is not None and ns_name is not None:
                    listener_sock, link = await rt.network.attach(ns_name, port, listen=dialled)
                    self._register(veth=link.veth, address=link.address)
                    steps.mark("namespace")
                elif ns_name is not None and dialled:
                    listener_sock = await netns.create_with_listener(ns_name)
                elif ns_name is not None:
                    await netns.create(ns_name)
                elif dialled:
                    listener_sock = loopback_listener()
                limit = role.resources.memory_mib + rt.vmm_overhead_mib
                if cg is not None and (spare is None or spare.limit_mib != limit):
                    cg = await trio.to_thread.run_sync(cgroup.create, vm_id, limit)
                    steps.mark("cgroup")
                if disk is not None:
                    # Made before the VM is in the pool: a claim never waits for a disk.
                    assert rt.base_disk is not None
                    if template is not None and template.disk is not None:
                        await disks.create_disk(
                            disk, template.disk, disk_format, from_template=True
                        )
                    else:
                        await disks.create_disk(
                            disk, rt.base_disk, disk_format, from_template=False
                        )
                    steps.mark("overlay")
                port = listener_sock.getsockname()[1] if listener_sock is not None else 0
                spec = self._spec(vm_id, ns_name, cg, disk, link, port=port, token=token)
                self.ready_seconds = None
                started = trio.current_time()
                steps.mark("vmm start")
                if template is not None:
                    assert self.rt.templates is not None
                    self._template_settled = True  # restore settles it, whatever happens
                    self.handle = await self.rt.templates.restore(spec, template)
                    self.started_as = f"restored {template.short}"
                    self.vmm_seconds = trio.current_time() - started
                else:
                    self.handle = await self.rt.driver.start(spec)
                    self.started_as = "booted"
                self.group.changed()  # a new pid to show
                attached = await self._say_attach()
                steps.mark("attach said")
            except SETUP_ERRORS as exc:
                outcome.reason = f"could not start: {exc}"
                return outcome
            except GuestLost as exc:
                outcome.reason = exc.reason
                return outcome
            ident = process_identity(self.handle.pid)
            control = self.handle.control_socket
            self._register(
                pid=self.handle.pid,
                start_time=ident.start_time if ident else 0,
                boot_id=ident.boot_id if ident else "",
                socket=str(control) if control is not None else None,
                port=port,
                started_as=self.started_as,
            )
            sock, listener_sock = listener_sock, None  # the listener owns it now
            await self._serve_vm(
                sock, ns_name, expect_id, expect_token, outcome, started, template, port=attached
            )
            return outcome
        finally:
            if attached is not None:
                with trio.CancelScope(shield=True):
                    await attached.aclose()
            self._boot_done()
            with trio.CancelScope(shield=True):
                await self._teardown(outcome, ns_name, cg, listener_sock, link, disk)

    async def _incarnate_adopted(self, rec: VmRecord) -> Outcome:
        """The VM ``rec`` names, left running by a previous supervisor, taken over.

        Its VMM, namespace, tap, veth, cgroup, overlay and workspace are kept;
        the IRC forwarder is opened again in its namespace on the same address
        and port, and so is the control listener where its guest dials (a guest
        on a channel device is attached to anew instead), and
        its guest must say Hello as it did (a clone: its template's id and
        token) within ``boot_timeout``. When any of it fails the VM is reclaimed
        as a crashed one: killed, its resources released; the child goes on per
        policy."""
        rt = self.rt
        outcome = Outcome()
        self._exited = trio.Event()
        self._row = rec
        ns_name = rec.netns
        cg = Path(rec.cgroup) if rec.cgroup else None
        disk = Path(rec.disk) if rec.disk else None
        link = (
            Link(ns_name=ns_name, veth=rec.veth, address=rec.address)
            if ns_name is not None and rec.veth is not None and rec.address is not None
            else None
        )
        listener_sock: socket.socket | None = None
        started = trio.current_time()
        try:
            try:
                dialled = rt.driver.describe().channel is ChannelKind.DIALLED
                if (
                    ns_name is None
                    or rec.socket is None
                    or (dialled and not rec.port)
                    or not rec.guest_token
                ):
                    raise DriverError("its registry row lacks what adoption needs")
                spec = self._spec(rec.vm_id, ns_name, cg, disk, link, port=rec.port, token="")
                running = Running(
                    pid=rec.pid,
                    start_time=rec.start_time,
                    boot_id=rec.boot_id,
                    control_socket=Path(rec.socket),
                    started_as=rec.started_as,
                )
                self.handle = await rt.driver.adopt(spec, running)
                if dialled:
                    listener_sock = await netns.open_listener(ns_name, rt.listen_host, rec.port)
            except SETUP_ERRORS as exc:
                outcome.reason = f"could not adopt: {exc}"
                if self.handle is None:
                    await trio.to_thread.run_sync(kill_recorded, rec)
                self.rt.event("adopt_failed", self.name, role=self.group.name, reason=str(exc))
                log.warning("%s (pid %d) not adopted: %s", self.name, rec.pid, exc)
                return outcome
            self.started_as = rec.started_as
            self._workspace_in = self.handle if rec.workspace else None
            self.group.changed()
            sock, listener_sock = listener_sock, None
            await self._serve_vm(
                sock,
                ns_name,
                rec.guest_id,
                rec.guest_token,
                outcome,
                started,
                None,
                irc_port=rec.irc_port,
                adopted=True,
            )
            return outcome
        finally:
            with trio.CancelScope(shield=True):
                await self._teardown(outcome, ns_name, cg, listener_sock, link, disk)

    def _spec(
        self,
        vm_id: str,
        ns_name: str | None,
        cg: Path | None,
        disk: Path | None,
        link: Link | None,
        *,
        port: int,
        token: str,
    ) -> VmSpec:
        role = self.group.role
        return VmSpec(
            vm_id=vm_id,
            name=self.name,
            role=role.name,
            vcpus=role.resources.vcpus,
            memory_mib=role.resources.memory_mib,
            control_url=f"ws://{self.rt.listen_host}:{port}/",
            token=token,
            netns=ns_name,
            cgroup=cg,
            log_path=self._log_path,
            guest_command=role.guest_command,
            tap=TAP if link is not None else None,
            disk=disk,
        )

    async def _teardown(
        self,
        outcome: Outcome,
        ns_name: str | None,
        cg: Path | None,
        sock: socket.socket | None,
        link: Link | None,
        disk: Path | None,
    ) -> None:
        self.session = None
        handle, self.handle = self.handle, None
        if self._ended_in_crash() and self.lifecycle.can(Event.CRASH):
            # Said at once: while the teardown below runs, the child has no VM and
            # must not be shown (or counted) as idle or active.
            self._fire(Event.CRASH)
        if self._left_running(handle):
            # Handed over: only this supervisor's end goes; the VM, its namespace,
            # cgroup, disks and registry row stay for the next one to adopt.
            if sock is not None:
                sock.close()
            log.info("%s left running for the next supervisor", self.name)
            return
        await release(
            self.rt,
            self.name,
            handle,
            exited=self._exited,
            terminate=self.rt.graceful,
            sock=sock,
            cg=cg,
            link=link,
            ns_name=ns_name,
            disk=disk,
        )

    def _left_running(self, handle: VmHandle | None) -> bool:
        """Whether a handover leaves this incarnation's VM running (``Runtime.leaving``)."""
        return (
            self.rt.leaving
            and self.rt.driver.outlives_supervisor
            and handle is not None
            and not self._exited.is_set()
            and self._row is not None
            and self._row.pid == handle.pid
        )
