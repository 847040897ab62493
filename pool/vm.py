"""One VM child: a named slot that runs VM incarnations and restarts them per policy.

A child is one trio task. Each incarnation creates its resources (a control
listener, inside a fresh network namespace when isolation is on, with a tap
and a veth on the swarm's bridge for real VMs; a cgroup when available; its
own overlay disk for real VMs), starts the VMM through the driver (a cold
boot, or a restore from its role's snapshot template when the runtime has
templates), waits for the guest's Hello and serves the control session until
the VM ends. Inside the VM's namespace it also opens the IRC forwarder and
the model gateway (``pool/gateway.py``), whose calls it attributes to
``who``. The audit trail of the agent's work is the child's events: each model
call through its gateway (``model_call``), each tool run its guest reports
(``tool_ran``), each turn an operator cancels (``turn_cancelled``), all under
the identity the supervisor gave the VM. Whatever happens, a shielded, bounded
teardown stops the VMM (TERM, then KILL) and releases every resource the
incarnation created. A
named agent's VM also gets the agent's workspace disk before each promotion.

A child may begin with a VM a previous supervisor left running (``adopt``, its
registry row): that incarnation takes the running VMM and its resources over
instead of making new ones, listens again where its guest dials, and takes
its guest back as it is (an agent still promoted, a task still held) when
the guest's Hello says so. A VM that cannot be adopted is reclaimed like a
crashed one.

A claimed child serves one piece of work (a run, a task) and is then retired;
it is never restarted. A claimed child with an ``agent`` identity is a named,
long-lived agent: restarted per the role's policy like a pool child, and
promoted again under the same name each time its guest says hello. A pool
child is restarted per the role's policy, with backoff, until its circuit
breaker opens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import random
import secrets
import shutil
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec
import trio
import trio_websocket
from fireclaw.config import ControlSpec, StopSpec
from fireclaw.guest_daemon import protocol as p
from fireclaw.pool import cgroup, disks, netns, workspaces
from fireclaw.pool.backoff import ExitClass, RestartTracker, classify_exit
from fireclaw.pool.control import ControlSession, GuestLost, GuestViolation, HeartbeatMissed
from fireclaw.pool.drivers.base import (
    WORKSPACE_BYTES,
    Capability,
    Driver,
    DriverError,
    Running,
    VmHandle,
    VmSpec,
)
from fireclaw.pool.forward import forward
from fireclaw.pool.gateway import serve_gateway
from fireclaw.pool.gateway_core import Meter, ModelRoute, Who
from fireclaw.pool.lifecycle import Event, Lifecycle, State
from fireclaw.pool.network import GATEWAY, TAP, Link, Network, NetworkError
from fireclaw.pool.procid import ProcessIdentity, process_identity, still_running
from fireclaw.pool.store import CallRecord, StateStore, VmRecord

if TYPE_CHECKING:
    from fireclaw.pool.group import RoleGroup
    from fireclaw.pool.templates import Template, Templates

log = logging.getLogger("fireclaw.vm")


#: What making a VM's resources and starting its VMM may raise: the VM did not start.
SETUP_ERRORS: Final = (
    DriverError,
    netns.NetnsError,
    NetworkError,
    disks.DiskError,
    cgroup.CgroupError,
    OSError,
)


#: The model gateway's port inside each VM's own namespace.
GATEWAY_PORT: Final = 4000


@dataclass(frozen=True)
class IrcRoute:
    """The IRC server named agents join, and the terms they join it on."""

    upstream: tuple[str, int]  # as the supervisor reaches it
    agents_channel: str
    password: str | None = field(default=None, repr=False)  # the server's: kept out of logs
    cooldown: float = 10.0


def instance_id(state_dir: Path) -> str:
    """A short id of the supervisor owning ``state_dir``.

    It is part of every VM id, so every namespace, cgroup and guest process a
    swarm creates names the swarm it belongs to, even with several on one host."""
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:6]


@dataclass(kw_only=True)
class Runtime:
    """What every VM of the swarm shares; owned by the supervisor."""

    driver: Driver
    store: StateStore
    state_dir: Path
    control: ControlSpec
    stop: StopSpec
    isolate_net: bool
    use_cgroups: bool
    instance: str = "fc"  # instance_id(state_dir): the prefix of every VM id
    graceful: bool = True  # False after a second SIGINT: kill at once
    #: The supervisor is handing its VMs over to the next one on this state dir:
    #: a VM that can outlive it is left running, with its resources and registry row.
    leaving: bool = False
    irc: IrcRoute | None = None  # None: agents stay off IRC
    models: ModelRoute | None = None  # None: no model gateways
    #: Snapshot templates to restore pool VMs from (a driver that can snapshot);
    #: None: every VM cold-boots.
    templates: Templates | None = None
    #: Memory the VMM needs above the guest's RAM, added to each VM's cgroup limit.
    vmm_overhead_mib: int = 0
    #: The swarm's bridge (real VMs, as root): each VM's namespace gets a tap and a veth,
    #: and the supervisor's listeners there are on the tap's address.
    network: Network | None = None
    #: Where each VM's own overlay disk goes, and the image it sits on (real VMs).
    disks_dir: Path | None = None
    base_disk: Path | None = None
    #: Named agents' workspace images (a driver that can attach them); None: none.
    workspaces_dir: Path | None = None
    uniform: Callable[[float, float], float] = random.uniform  # backoff jitter
    #: VMs booting at once. Boots compete for CPU: unbounded, 200 of them all finish
    #: together after a long wait; bounded, VMs become ready one after another.
    boots: trio.CapacityLimiter = field(
        default_factory=lambda: trio.CapacityLimiter(2 * (os.cpu_count() or 1))
    )
    on_event: Callable[[str, str, dict[str, object]], None] = field(default=lambda k, s, d: None)
    #: Bumped on every state change of any VM, so watchers can wait for "something changed".
    version: int = 0
    _change: trio.Event = field(default_factory=trio.Event)

    def event(self, kind: str, subject: str, **detail: object) -> None:
        self.on_event(kind, subject, detail)

    def bump(self) -> None:
        self.version += 1
        self._change.set()
        self._change = trio.Event()

    @property
    def listen_host(self) -> str:
        """Where the supervisor's listeners in a VM's namespace are bound, and where
        its guest reaches them: the tap's address for real VMs, else loopback."""
        return GATEWAY if self.network is not None else "127.0.0.1"

    async def wait_change(self, since: int) -> None:
        """Return once ``version`` is past ``since``."""
        while self.version <= since:
            await self._change.wait()


@dataclass(frozen=True)
class AuditedMeter:
    """A gateway's meter that also writes each finished call into the event log:
    whose it was (as the supervisor knows it), the tokens, the time, the outcome."""

    meter: Meter
    rt: Runtime

    def refusal(self, role: str) -> str | None:
        return self.meter.refusal(role)

    def record(self, call: CallRecord) -> None:
        self.meter.record(call)
        self.rt.event(
            "model_call",
            call.agent or call.vm,
            agent=call.agent,
            role=call.role,
            vm=call.vm,
            task=call.task,
            model=call.model,
            prompt_tokens=call.prompt_tokens,
            completion_tokens=call.completion_tokens,
            duration=call.duration,
            outcome=call.outcome,
        )

    async def wait_changed(self) -> None:
        await self.meter.wait_changed()


@dataclass
class AgentIdentity:
    """Who a named agent is; it keeps this across restarts of its VM."""

    name: str
    model: str | None = None  # None: the role's
    persona: str | None = None


@dataclass
class Outcome:
    """How an incarnation ended."""

    code: int | None = None  # the VMM's exit code, None when unknown or killed by us
    reason: str = ""
    broke_protocol: bool = False


class Child:
    def __init__(
        self,
        name: str,
        group: RoleGroup,
        runtime: Runtime,
        *,
        now: float,
        adopt: VmRecord | None = None,
    ) -> None:
        self.name = name
        self.group = group
        self.rt = runtime
        self.lifecycle = Lifecycle(now)
        self.tracker = RestartTracker(group.role.restart, uniform=runtime.uniform)
        self.claimed = False  # handed out by the pool: no longer one of its idle VMs
        self.agent: AgentIdentity | None = None  # set: a named agent, restarted as itself
        self.stopping = False
        self.session: ControlSession | None = None
        self.handle: VmHandle | None = None
        self.restarts = 0
        self.reason = ""  # why it last crashed or failed
        self.promoted_as: str | None = None
        self.irc_endpoint: tuple[str, int] | None = None  # the IRC server, as the guest reaches it
        #: Its model gateway, as the guest reaches it (``http://host:port/v1``).
        self.model_endpoint: tuple[str, int] | None = None
        #: Whose model calls its gateway carries: promotion and task code keep it current.
        self.who = Who(vm=name, role=group.name)
        self.started_as = ""  # "restored <template>" or "booted": how the current VM began
        self.ready_seconds: float | None = None  # VMM start (or restore) to guest connected
        self.vmm_seconds = 0.0  # of a restore: until the clone runs
        self._scope = trio.CancelScope()
        self._reset = trio.Event()
        self._exited = trio.Event()  # the current incarnation's VMM has exited
        self._booting = False  # holds a token of the runtime's boot limiter
        self._workspace_in: VmHandle | None = None  # the VM a workspace was attached to
        #: A running VM a previous supervisor left, to adopt as the first incarnation.
        self._adopt = adopt
        self._row: VmRecord | None = None  # the current incarnation's registry row
        if adopt is not None:
            self.claimed = adopt.claimed
        self.done = trio.Event()  # the child task has finished

    @property
    def state(self) -> State:
        return self.lifecycle.state

    @property
    def pid(self) -> int | None:
        return self.handle.pid if self.handle is not None else None

    def _fire(self, event: Event) -> None:
        self.lifecycle.fire(event, trio.current_time())
        self.group.changed()

    # --- the child task ----------------------------------------------------------

    async def run(self) -> None:
        try:
            with self._scope:
                while True:
                    outcome = await self._incarnate()
                    if not self._ended_in_crash():
                        return
                    if self.state is not State.CRASHED:  # _teardown said so already
                        self._fire(Event.CRASH)
                    if not await self._after_crash(outcome):
                        return
        finally:
            self.session = None
            if self.lifecycle.can(Event.STOP):
                self.lifecycle.fire(Event.STOP, trio.current_time())
            if self.lifecycle.can(Event.EXIT):
                self.lifecycle.fire(Event.EXIT, trio.current_time())
            self.done.set()
            self.group.child_done(self)

    def _ended_in_crash(self) -> bool:
        """Whether the incarnation that just ended crashed: it was not stopped, and
        it was not a claimed VM whose run is over."""
        return not (self.stopping or (self.claimed and self.agent is None))

    async def _after_crash(self, outcome: Outcome) -> bool:
        """Decide and wait out the restart; False when the child should end."""
        self.reason = outcome.reason
        policy = self.group.role.restart
        exit_class = (
            ExitClass.FAILURE if outcome.broke_protocol else classify_exit(outcome.code, policy)
        )
        decision = self.tracker.exited(trio.current_time(), exit_class)
        self.rt.event(
            "crashed",
            self.name,
            role=self.group.name,
            reason=outcome.reason,
            exit_code=outcome.code,
            cause=exit_class.value,
            restart=decision.restart,
            delay=round(decision.delay, 3),
            failed=decision.failed,
        )
        log.warning("%s crashed: %s", self.name, outcome.reason)
        if not decision.restart:
            self.reason = f"{outcome.reason}; not restarted: {decision.reason}"
            self._fire(Event.GIVE_UP)
            self.rt.event("failed", self.name, role=self.group.name, reason=self.reason)
            log.error("%s failed: %s", self.name, self.reason)
            await self._reset.wait()
            self._reset = trio.Event()
            self.tracker.reset()
            self._fire(Event.RESET)
            return True
        self.restarts += 1
        self.rt.store.record_restart(
            self.name,
            self.group.name,
            reason=outcome.reason,
            exit_code=outcome.code,
            delay=decision.delay,
        )
        if decision.delay > 0:
            self._fire(Event.RETRY)
            with trio.move_on_after(decision.delay):
                await self._reset.wait()  # a reset or reload cuts the wait short
            self._reset = trio.Event()
        while self.group.degraded and not self.group.stopping:
            await self.group.wait_changed()  # a degraded role pauses its restarts
        self._fire(Event.RESTART)
        return True

    def claim(self) -> None:
        """Hand this idle child out of the pool (the registry says so: a VM that
        served a run is not taken back as an idle one)."""
        self.claimed = True
        self._fire(Event.CLAIM)
        if self._row is not None:
            self._register()

    def reset(self) -> None:
        """Clear a failed child, or cut a backoff wait short."""
        self.tracker.reset()
        self._reset.set()

    async def stop(self, reason: str, *, graceful: bool = True) -> None:
        """Stop this child (ask the guest, then TERM, then KILL) and wait for it to end."""
        self.stopping = True
        if self.lifecycle.can(Event.STOP):
            self._fire(Event.STOP)
        session = self.session
        if graceful and self.rt.graceful and session is not None and self.handle is not None:
            await session.ask_stop(reason)
            with trio.move_on_after(self.rt.stop.grace_period):
                await self._exited.wait()
        self._scope.cancel()
        await self.done.wait()

    def cancel(self) -> None:
        self.stopping = True
        self._scope.cancel()

    # --- one incarnation ------------------------------------------------------------

    async def _incarnate(self) -> Outcome:
        adopt, self._adopt = self._adopt, None
        if adopt is not None:
            return await self._incarnate_adopted(adopt)
        templates = self.rt.templates
        template = None
        if templates is not None and self.rt.isolate_net:
            template = await templates.get(self.group.role)  # None: cold boot
        try:
            return await self._incarnate_from(template)
        finally:
            if templates is not None and template is not None:
                templates.release(template)

    async def _incarnate_from(self, template: Template | None) -> Outcome:
        """One VM: cold-booted, or restored from ``template``."""
        role = self.group.role
        vm_id = f"{self.rt.instance}-{self.name}-{secrets.token_hex(3)}"
        token = secrets.token_urlsafe(24)
        # A clone says Hello with its template's vm_id and token, the same in every
        # clone: which VM dialled is known by the namespace it dialled from (one VM
        # and one listener per namespace), and the token still proves it is ours.
        expect_id, expect_token = (template.vm_id, template.token) if template else (vm_id, token)
        outcome = Outcome()
        self._exited = trio.Event()
        self._workspace_in = None
        ns_name = netns.PREFIX + vm_id if self.rt.isolate_net else None
        cg = cgroup.path_for(vm_id) if self.rt.use_cgroups else None
        rt = self.rt
        disk = (
            rt.disks_dir / f"{vm_id}{disks.SUFFIX}"
            if rt.disks_dir is not None and rt.base_disk is not None
            else None
        )
        listener_sock: socket.socket | None = None
        link: Link | None = None
        await rt.boots.acquire_on_behalf_of(self)
        self._booting = True
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
                port = template.port if template is not None else 0
                if rt.network is not None and ns_name is not None:
                    listener_sock, link = await rt.network.attach(ns_name, port)
                    self._register(veth=link.veth, address=link.address)
                elif ns_name is not None:
                    listener_sock = await netns.create_with_listener(ns_name)
                else:
                    listener_sock = _loopback_listener()
                if cg is not None:
                    limit = role.resources.memory_mib + rt.vmm_overhead_mib
                    cg = await trio.to_thread.run_sync(cgroup.create, vm_id, limit)
                if disk is not None:
                    assert rt.base_disk is not None
                    if template is not None and template.disk is not None:
                        await disks.create_overlay(disk, template.disk, "qcow2")
                    else:
                        await disks.create_overlay(disk, rt.base_disk, "raw")
                port = listener_sock.getsockname()[1]
                spec = self._spec(vm_id, ns_name, cg, disk, link, port=port, token=token)
                self.ready_seconds = None
                started = trio.current_time()
                if template is not None:
                    assert self.rt.templates is not None
                    try:
                        self.handle = await self.rt.templates.restore(spec, template)
                    except DriverError as exc:
                        self.rt.templates.broken(template, str(exc))
                        raise
                    self.started_as = f"restored {template.short}"
                    self.vmm_seconds = trio.current_time() - started
                else:
                    self.handle = await self.rt.driver.start(spec)
                    self.started_as = "booted"
                self.group.changed()  # a new pid to show
            except SETUP_ERRORS as exc:
                outcome.reason = f"could not start: {exc}"
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
            await self._serve_vm(sock, ns_name, expect_id, expect_token, outcome, started, template)
            return outcome
        finally:
            self._boot_done()
            with trio.CancelScope(shield=True):
                await self._teardown(outcome, ns_name, cg, listener_sock, link, disk)

    async def _incarnate_adopted(self, rec: VmRecord) -> Outcome:
        """The VM ``rec`` names, left running by a previous supervisor, taken over.

        Its VMM, namespace, tap, veth, cgroup, overlay and workspace are kept;
        the control listener (and the IRC forwarder) are opened again in its
        namespace on the same address and port, where its guest dials again, and
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
                if ns_name is None or rec.socket is None or not rec.port or not rec.guest_token:
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

    @property
    def _log_path(self) -> Path:
        return self.rt.state_dir / "logs" / f"{self.name}.log"

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

    async def _serve_vm(
        self,
        sock: socket.socket,
        ns_name: str | None,
        expect_id: str,
        expect_token: str,
        outcome: Outcome,
        started: float,
        template: Template | None,
        *,
        irc_port: int = 0,
        adopted: bool = False,
    ) -> None:
        """Serve the running VM through ``sock``, its control listener (owned
        from here), until it ends; the IRC forwarder runs beside it."""
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        async with trio.open_nursery() as ws_nursery, listener:
            self.irc_endpoint = await self._open_irc_route(ws_nursery, ns_name, irc_port)
            self.model_endpoint = await self._open_model_gateway(ws_nursery, ns_name)
            if self.irc_endpoint is not None and ns_name is not None:
                self._register(irc_port=self.irc_endpoint[1])
            await self._serve(
                ws_nursery, listener, expect_id, expect_token, outcome, started, template, adopted
            )
            ws_nursery.cancel_scope.cancel()

    async def _open_irc_route(
        self, nursery: trio.Nursery, ns_name: str | None, port: int = 0
    ) -> tuple[str, int] | None:
        """Give the VM a way to the IRC server: a forwarder inside its namespace,
        on ``port`` (an adopted VM's agent dials the one it had; 0: a free one)."""
        route = self.rt.irc
        if route is None:
            return None
        if ns_name is None:
            return route.upstream  # not isolated: the guest dials the server itself
        try:
            sock = await netns.open_listener(ns_name, self.rt.listen_host, port)
        except netns.NetnsError as exc:
            log.warning("%s: no IRC for this VM: %s", self.name, exc)
            return None
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        nursery.start_soon(partial(forward, listener, route.upstream, label=self.name))
        return (self.rt.listen_host, sock.getsockname()[1])

    async def _open_model_gateway(
        self, nursery: trio.Nursery, ns_name: str | None
    ) -> tuple[str, int] | None:
        """Give the VM its model gateway: a listener inside its namespace (on loopback
        when not isolated) that only this VM can reach, served for ``self.who``.

        In a namespace it takes ``GATEWAY_PORT``, the same in every VM, so a clone
        restored from a snapshot finds it where its template did."""
        route = self.rt.models
        if route is None:
            return None
        try:
            if ns_name is not None:
                sock = await netns.open_listener(ns_name, self.rt.listen_host, GATEWAY_PORT)
            else:
                sock = _loopback_listener()
        except (netns.NetnsError, OSError) as exc:
            log.warning("%s: no model gateway for this VM: %s", self.name, exc)
            return None
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        audited = dataclasses.replace(route, meter=AuditedMeter(route.meter, self.rt))
        nursery.start_soon(serve_gateway, listener, self.who, audited)
        return (self.rt.listen_host, sock.getsockname()[1])

    def _boot_done(self) -> None:
        if self._booting:
            self._booting = False
            self.rt.boots.release_on_behalf_of(self)

    async def _serve(
        self,
        ws_nursery: trio.Nursery,
        listener: trio.SocketListener,
        vm_id: str,
        token: str,
        outcome: Outcome,
        started: float,
        template: Template | None,
        adopted: bool = False,
    ) -> None:
        assert self.handle is not None
        handle = self.handle
        async with trio.open_nursery() as nursery:

            async def watch_vmm() -> None:
                code = await handle.wait()
                outcome.code = code
                if not outcome.broke_protocol:
                    # The cause, whichever was noticed first: the lost connection or this.
                    outcome.reason = (
                        f"VMM exited with code {code}"
                        if code is not None
                        else "VMM exited (its exit status is unknowable: it was adopted)"
                    )
                self._exited.set()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_vmm)
            try:
                with trio.fail_after(self.rt.control.boot_timeout):
                    session = await self._accept(ws_nursery, listener, vm_id, token)
                await listener.aclose()  # one connection per VM: nobody else may dial in
                session.on_tool_ran = self._tool_ran
                self.session = session
                self.ready_seconds = trio.current_time() - started
                if template is not None:
                    self.rt.event(
                        "restored",
                        self.name,
                        role=self.group.name,
                        template=template.short,
                        seconds=round(self.ready_seconds, 3),
                        # of which: the VMM up with the state loaded and running
                        vmm_seconds=round(self.vmm_seconds, 3),
                    )
                self._boot_done()
                self.tracker.ready(trio.current_time())
                self._fire(Event.READY)
                resumed = adopted and self._take_back(session.hello.resume)
                if adopted:
                    resume = session.hello.resume
                    self.rt.event(
                        "adopted",
                        self.name,
                        role=self.group.name,
                        pid=handle.pid,
                        agent=self.promoted_as,
                        tasks=list(resume.tasks) if resume is not None else [],
                        seconds=round(self.ready_seconds, 3),
                    )
                    log.info("%s adopted (pid %d)", self.name, handle.pid)
                if self.agent is not None and not resumed:
                    nursery.start_soon(self._promote_again, outcome, nursery.cancel_scope)
                await session.serve()
            except trio.TooSlowError:
                outcome.reason = f"guest did not connect within {self.rt.control.boot_timeout:g}s"
            except GuestLost as exc:
                outcome.reason = exc.reason
                outcome.broke_protocol = isinstance(exc, GuestViolation | HeartbeatMissed)
                if not outcome.broke_protocol:
                    # The guest is going away by itself: learn how it exited.
                    with trio.move_on_after(1.0):
                        await self._exited.wait()
            except p.ProtocolError as exc:
                outcome.reason = str(exc)
                outcome.broke_protocol = True
            nursery.cancel_scope.cancel()

    def _take_back(self, resume: p.Resume | None) -> bool:
        """An adopted guest that says it is still at work as this child's agent (a
        named one, or its task runner) is taken as it is: promoted, not promoted
        again. True if it was."""
        who = self.agent.name if self.agent is not None else self.name
        if not self.claimed or resume is None or resume.agent != who:
            return False
        self._fire(Event.PROMOTE)
        self.promoted_as = who
        self._fire(Event.PROMOTED)
        return True

    async def _accept(
        self, ws_nursery: trio.Nursery, listener: trio.SocketListener, vm_id: str, token: str
    ) -> ControlSession:
        stream = await listener.accept()
        try:
            request = await trio_websocket.wrap_server_stream(
                ws_nursery, stream, max_message_size=self.rt.control.max_message_bytes
            )
            ws = await request.accept()
        except (trio_websocket.HandshakeError, trio.BrokenResourceError, OSError) as exc:
            await stream.aclose()
            raise GuestViolation(f"bad WebSocket handshake: {exc}") from None
        except trio_websocket.ConnectionClosed as exc:
            raise GuestViolation(f"connection closed during the handshake: {exc}") from None
        return await ControlSession.handshake(
            ws, vm_id=vm_id, token=token, spec=self.rt.control, hostname=self.name
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
        stop = self.rt.stop
        with trio.move_on_after(stop.term_timeout + 10):
            if handle is not None:
                if not self._exited.is_set() and self.rt.graceful:
                    handle.terminate()
                    with trio.move_on_after(stop.term_timeout):
                        await handle.wait()
                await handle.kill()  # also takes whatever the guest left behind
                self._exited.set()
            if sock is not None:
                sock.close()
            if cg is not None:
                with contextlib.suppress(cgroup.CgroupError):
                    await trio.to_thread.run_sync(cgroup.remove, cg)
            if link is not None and self.rt.network is not None:
                with contextlib.suppress(netns.NetnsError):
                    await self.rt.network.detach(link)
            elif ns_name is not None:
                with contextlib.suppress(netns.NetnsError):
                    await netns.remove(ns_name)
            if disk is not None:
                disks.remove(disk)
            self.rt.store.drop_vm(self.name)

    def _left_running(self, handle: VmHandle | None) -> bool:
        """Whether a handover leaves this incarnation's VM running (see ``leaving``)."""
        return (
            self.rt.leaving
            and self.rt.driver.outlives_supervisor
            and handle is not None
            and not self._exited.is_set()
            and self._row is not None
            and self._row.pid == handle.pid
        )

    def _register(self, **changes: Any) -> None:
        """Write the current incarnation's registry row: ``changes``, and what the
        child does now (claimed, as which agent, with its workspace attached)."""
        assert self._row is not None
        attached = self.handle is not None and self._workspace_in is self.handle
        self._row = msgspec.structs.replace(
            self._row,
            claimed=self.claimed,
            agent=self.agent.name if self.agent is not None else None,
            workspace=attached,
            **changes,
        )
        self.rt.store.put_vm(self._row)

    async def _promote_again(self, outcome: Outcome, scope: trio.CancelScope) -> None:
        """A named agent's VM came back: make it that agent again."""
        try:
            await self.promote(self.group.promotion_for(self))
        except GuestLost as exc:
            outcome.reason = f"promotion failed: {exc.reason}"
            outcome.broke_protocol = isinstance(exc, GuestViolation)
            scope.cancel()
        else:
            self.rt.event("agent_back", self.name, agent=self.promoted_as, role=self.group.name)

    # --- work ---------------------------------------------------------------------

    async def promote(self, msg: p.Promote) -> None:
        if self.session is None:
            raise GuestLost(f"{self.name} has no guest connected")
        self._fire(Event.PROMOTE)
        if await self._attach_workspace():
            msg = msgspec.structs.replace(msg, workspace=True)
        self.who.agent, self.who.model = msg.name, msg.model
        await self.session.promote(msg)
        self.promoted_as = msg.name
        self._fire(Event.PROMOTED)
        self._register()  # a later supervisor adopts it as this agent

    async def cancel_turn(self, reason: str) -> None:
        """End the current turn(s) of this VM's agent (``Cancel``), and record it.

        GuestLost if no guest is connected."""
        if self.session is None:
            raise GuestLost(f"{self.name} has no guest connected")
        await self.session.cancel(reason)
        self.rt.event(
            "turn_cancelled",
            self.promoted_as or self.name,
            agent=self.promoted_as,
            role=self.group.name,
            vm=self.name,
            task=self.who.task,
            reason=reason,
        )

    def _tool_ran(self, msg: p.ToolRan) -> None:
        """One tool run of the agent, for the audit trail. Who ran it is this VM's
        agent; only what ran and how comes from the guest (checked by the session)."""
        self.rt.event(
            "tool_ran",
            self.promoted_as or self.name,
            agent=self.promoted_as,
            role=self.group.name,
            vm=self.name,
            task=msg.task_id or None,
            tool=msg.tool,
            arguments=msg.arguments,
            exit_code=msg.code,
            duration=round(msg.duration, 3),
            output=msg.output,
            truncated=msg.truncated,
        )

    async def _attach_workspace(self) -> bool:
        """Give a named agent's VM its workspace disk (once per VM); True if it has it.

        Without one (a driver that cannot attach one, or it could not be
        attached) the agent works without: that is logged and evented, not fatal."""
        agent, handle, directory = self.agent, self.handle, self.rt.workspaces_dir
        if agent is None or directory is None or handle is None:
            return False
        if not self.rt.driver.describe().can(Capability.WORKSPACE):
            return False
        if self._workspace_in is handle:
            return True
        try:
            path = await workspaces.ensure(directory, agent.name, WORKSPACE_BYTES)
            await handle.attach_workspace(path)
        except (workspaces.WorkspaceError, DriverError) as exc:
            log.warning("%s: no workspace for %s: %s", self.name, agent.name, exc)
            self.rt.event("workspace_failed", agent.name, vm=self.name, reason=str(exc))
            return False
        self._workspace_in = handle
        return True

    def snapshot(self) -> dict[str, object]:
        return {
            "name": self.name,
            "role": self.group.name,
            "state": self.state.value,
            "pid": self.pid,
            "restarts": self.restarts,
            "for": round(trio.current_time() - self.lifecycle.since, 1),
            "agent": self.agent.name if self.agent is not None else self.promoted_as,
            "model_endpoint": (
                "http://{}:{}/v1".format(*self.model_endpoint) if self.model_endpoint else None
            ),
            "reason": self.reason,
            "started_as": self.started_as,
            "ready_seconds": (
                round(self.ready_seconds, 3) if self.ready_seconds is not None else None
            ),
        }


def kill_recorded(rec: VmRecord) -> None:
    """Kill the VMM ``rec`` names if it is still that process (never a pid alone), and
    what runs in its cgroup, and remove its run directory; namespaces, cgroups and
    disks are left to the caller (a teardown, or a restarted supervisor's reclaim)."""
    ident = ProcessIdentity(pid=rec.pid, start_time=rec.start_time, boot_id=rec.boot_id)
    if rec.start_time and still_running(ident):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(rec.pid, signal.SIGKILL)
    if rec.cgroup:
        with contextlib.suppress(cgroup.CgroupError):
            cgroup.kill_all(Path(rec.cgroup))
    if rec.socket:
        shutil.rmtree(Path(rec.socket).parent, ignore_errors=True)


def _loopback_listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(4)
    except OSError:
        sock.close()
        raise
    return sock
