"""The supervisor process: ``fireclaw-swarm up``.

::

    trio.run(Supervisor.serve)               pidfile lock held for the whole life
    └─ root nursery
       ├─ signals      SIGHUP -> reload (coalesced), SIGTERM/SIGINT -> graceful stop
       ├─ api          unix-socket HTTP API at <state_dir>/api.sock
       ├─ http         dashboard, /metrics and /v1 on http.listen, when configured
       ├─ reloader     applies config changes one at a time
       ├─ services     the managed ngircd and the managed model server, when configured
       ├─ budgets      re-evaluates the token budgets when a period begins
       └─ role group   one per role: warm pool, claimed VMs, task queue

The supervisor never exits because children crash, nor because the state
disk is full (or read-only, or failing): tasks are then refused with 507, task
moves wait (``pool/durable.py``), audit events and registry rows are
dropped and counted, and ``status`` and the sd_notify status line say so. It
exits 0 after a graceful stop, 78 on a bad config at start, 1 when another
instance holds the lock or the state cannot be opened (``up.run_up``).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import time
from pathlib import Path
from typing import Final

import msgspec
import trio
from fireclaw.config import Config
from fireclaw.config.cluster import ClusterFlags, fleet_nick
from fireclaw.pool import cgroup, netns
from fireclaw.pool.drivers import BackendUnavailable, Capability, NotReady, choose, open_backend
from fireclaw.pool.gateway_core import Upstream
from fireclaw.pool.group import Adoptee, RoleGroup
from fireclaw.pool.network import Link, Network, NetworkError
from fireclaw.pool.runtime import IrcRoute, Runtime, instance_id
from fireclaw.pool.templates import Templates
from fireclaw.supervisor import leftovers, sdnotify
from fireclaw.supervisor.adoption import Adoption
from fireclaw.supervisor.api import serve_api
from fireclaw.supervisor.budget import Budgets, period_bounds
from fireclaw.supervisor.cluster import ClusterSide
from fireclaw.supervisor.controller import MAX_AGENT_NAME, SupervisorController
from fireclaw.supervisor.fleet_side import FleetSide
from fireclaw.supervisor.harness_checks import (
    HarnessUnavailable,
    check_image_clis,
    check_role_secrets,
    needed_clis,
    read_role_secrets,
)
from fireclaw.supervisor.irc_credentials import read_irc_credentials
from fireclaw.supervisor.ircd import IrcdError, ManagedIrcd
from fireclaw.supervisor.model_side import ModelSide
from fireclaw.supervisor.modelserver import ManagedModelServer, ModelServerError
from fireclaw.supervisor.overseer import Overseer
from fireclaw.supervisor.reload import Reloads
from fireclaw.supervisor.secretfile import SecretFileError
from fireclaw.supervisor.state import Store
from fireclaw.supervisor.web import HttpServerError, serve_http

log = logging.getLogger("fireclaw.supervisor")

LOCK_NAME: Final = leftovers.LOCK_NAME
DB_NAME: Final = leftovers.DB_NAME
API_NAME: Final = "api.sock"
#: Guest images (built or found by the qemu backend) and snapshot templates.
IMAGES_NAME: Final = "images"
TEMPLATES_NAME: Final = "templates"
#: Each VM's own overlay disk, gone with the VM.
DISKS_NAME: Final = leftovers.DISKS_NAME
#: Named agents' workspace disks, kept.
WORKSPACES_NAME: Final = "workspaces"


class Supervisor(SupervisorController, Reloads, Adoption, ModelSide, ClusterSide, FleetSide):
    """The supervisor's process tree: it starts, holds and stops the API, the
    services and the role groups. Its commands (``controller.py``), reload
    (``reload.py``), adoption and reclaim at start (``adoption.py``), model
    side (``model_side.py``) and cluster side (``cluster.py``) are parts of the
    same object, a module each.
    """

    def __init__(
        self,
        config: Config,
        state_dir: Path,
        store: Store,
        *,
        cluster_flags: ClusterFlags | None = None,
    ) -> None:
        self.config = config
        #: ``up --cluster``: kept in place of the file's cluster section at each reload.
        self.cluster_flags = cluster_flags
        self.state_dir = state_dir
        self.store = store
        self.groups: dict[str, RoleGroup] = {}
        self.stopping = False
        self.last_reload_error: str | None = None
        self.startup_error: str | None = None  # why serve() ended before it was ready
        self.ircd: ManagedIrcd | None = None
        #: VMs left running by a previous supervisor, by name, until their group takes them.
        self._adoptees: dict[str, Adoptee] = {}
        self.modelserver: ManagedModelServer | None = None
        #: The coding-agent CLIs the guest image has; None: no image (process backend).
        self.image_clis: tuple[str, ...] | None = None
        self.budgets = Budgets(config.budget, store, on_event=self._on_event)
        self._upstream: Upstream | None = None  # an external model server
        self.overseer: Overseer | None = None
        self.http_url: str | None = None  # where the dashboard listens, once it does
        self._reload_wanted = trio.Event()
        self._reload_done = trio.Event()
        self._reload_result: dict[str, object] = {}
        self._root: trio.Nursery | None = None
        self.draining = False  # read from the hosts table before the groups start
        self._drained_said = False
        self._placing: set[str] = set()
        self._watchers: list[trio.MemorySendChannel[tuple[str, str, dict[str, object]]]] = []
        #: Claimed tasks of VMs gone with a previous supervisor, not yet requeued
        #: because the state disk refused it at start: requeued once it takes writes.
        self._orphans: set[str] | None = None
        store.health.on_change = self._state_changed
        ns_why = netns.probe()
        cg_why = cgroup.probe()
        self._netns_why = ns_why
        # Which VMM runs the VMs is decided now; making it ready (the guest image,
        # the accelerator probe) waits for serve(), before any VM starts.
        self.backend_choice = choose(
            config.backend, images=state_dir / IMAGES_NAME, netns_why=ns_why
        )
        self.backend_reason = self.backend_choice.reason
        self.isolation = {
            "netns": ns_why is None,
            "netns_why": ns_why or "one network namespace per VM",
            "cgroups": cg_why is None,
            "cgroups_why": cg_why or "one memory cgroup per VM",
        }
        self.rt = Runtime(
            driver=NotReady(),
            store=store,
            state_dir=state_dir,
            control=config.control,
            stop=config.stop,
            isolate_net=ns_why is None,
            use_cgroups=cg_why is None,
            on_event=self._on_event,
            instance=instance_id(state_dir),
        )

    def _on_event(self, kind: str, subject: str, detail: dict[str, object]) -> None:
        self.store.event(kind, subject, **detail)
        self.rt.bump()  # status watchers wake on any event, not only VM state changes
        for watcher in list(self._watchers):
            try:
                watcher.send_nowait((kind, subject, detail))
            except trio.WouldBlock:
                pass  # a slow watcher misses events rather than stalling the fleet
            except trio.BrokenResourceError:
                self._watchers.remove(watcher)

    def event(self, kind: str, subject: str, **detail: object) -> None:
        """Record an event and pass it to the watchers."""
        self._on_event(kind, subject, detail)

    def _state_changed(self) -> None:
        """The state disk stopped or started taking writes: say so at once."""
        self.rt.bump()
        sdnotify.status(self._status_line())

    def watch(self) -> trio.MemoryReceiveChannel[tuple[str, str, dict[str, object]]]:
        """A feed of events as they happen (the overseer announces from it)."""
        send, receive = trio.open_memory_channel[tuple[str, str, dict[str, object]]](256)
        self._watchers.append(send)
        return receive

    # --- life ------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        wanted = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)
        with trio.open_signal_receiver(*wanted) as signals:
            self._adoptees = self.plan_adoption()
            self.reclaim()
            async with trio.open_nursery() as root:
                self._root = root
                await root.start(serve_api, self.state_dir / API_NAME, self)
                try:
                    if self.config.http is not None:
                        self.http_url = await root.start(
                            serve_http, self, self.config.http, self.state_dir
                        )
                    await self._setup_backend(root)
                    await self._start_irc(root)
                    await self._start_models(root)
                    self._check_harnesses(self.config)
                except BackendUnavailable as exc:
                    self.startup_error = f"backend {self.backend_choice.name}: {exc}"
                    log.error("%s", self.startup_error)
                    root.cancel_scope.cancel()
                    return
                except (
                    IrcdError,
                    ModelServerError,
                    SecretFileError,
                    HttpServerError,
                    HarnessUnavailable,
                ) as exc:
                    self.startup_error = str(exc)
                    log.error("%s", exc)
                    root.cancel_scope.cancel()
                    return
                if self.config.cluster is not None:
                    # A drained host starts drained: no warm VMs, no claims.
                    self.draining = self._told_to_drain()
                for role in self.config.roles.values():
                    await self._start_group(role.name)
                root.start_soon(self._reloader)
                if self._orphans is not None:
                    root.start_soon(self._requeue_orphans_later, self._orphans)
                self.bring_up_placed()
                root.start_soon(self._watchdog)
                if self.config.cluster is not None:
                    root.start_soon(self._hear_tasks)
                    root.start_soon(self._heartbeats)
                self.event("started", "supervisor", pid=os.getpid(), backend=self.backend_reason)
                log.info("ready: backend %s; roles %s", self.backend_reason, ", ".join(self.groups))
                sdnotify.ready(self._status_line())
                task_status.started()
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        self.request_reload()
                    elif signum == signal.SIGUSR2:
                        if not self.stopping:
                            self.hand_over()
                    elif not self.stopping:
                        log.info("%s: stopping the fleet", signal.Signals(signum).name)
                        root.start_soon(self.shutdown)
                    elif signum == signal.SIGINT:
                        log.warning("second SIGINT: stopping now")
                        self.rt.graceful = False
                        root.cancel_scope.cancel()
        log.info("stopped")

    async def _setup_backend(self, root: trio.Nursery) -> None:
        """Make the chosen VMM backend ready before any VM starts.

        For qemu: build the guest image into ``<state_dir>/images`` or find it
        there (a first build takes about a minute; its steps are logged), pick
        KVM or TCG (a boot probe, cached) and create the driver. Then, as the
        driver describes itself: for real VMs the swarm's network and disks,
        workspaces where it can attach them, and the snapshot templates the
        warm pools restore from where it can snapshot. Raises
        BackendUnavailable (one line) when a configured backend cannot run."""
        choice = self.backend_choice
        if choice.name != "process":
            log.info("backend: %s; setting it up", choice.reason)
            sdnotify.status(f"setting up the {choice.name} backend")
            # A first image build is long: keep a service manager from giving up on us.
            sdnotify.extend_timeout(600)
        backend = await open_backend(
            choice,
            images=self.state_dir / IMAGES_NAME,
            netns_why=self._netns_why,
            progress=lambda line: log.info("%s", line),
            clis=needed_clis(self.config),
        )
        self.image_clis = backend.clis
        self.rt.driver = backend.driver
        self.rt.vmm_overhead_mib = backend.memory_overhead_mib
        self.backend_reason = backend.reason
        described = backend.driver.describe()
        if described.root_disk is not None:  # real VMs: a network, disks of their own
            spec = self.config.network
            network = Network(
                instance=self.rt.instance,
                subnet=ipaddress.IPv4Network(spec.subnet),
                egress=spec.egress,
            )
            links = [
                Link(ns_name=a.record.netns, veth=a.record.veth, address=a.record.address)
                for a in self._adoptees.values()
                if a.record.netns and a.record.veth and a.record.address
            ]
            try:
                await network.open(links)
            except NetworkError as exc:
                with trio.CancelScope(shield=True):
                    await network.close()  # whatever part of it was made
                raise BackendUnavailable(f"network: {exc}") from exc
            root.start_soon(_hold_network, network, self.rt)
            self.rt.network = network
            self.rt.disks_dir = self.state_dir / DISKS_NAME
            self.rt.base_disk = described.root_disk
            if described.can(Capability.WORKSPACE):
                self.rt.workspaces_dir = self.state_dir / WORKSPACES_NAME
            if described.can(Capability.SNAPSHOT):
                templates = Templates(self.rt, backend.driver, self.state_dir / TEMPLATES_NAME)
                keep = {templates.key_for(role) for role in self.config.roles.values()}
                await root.start(templates.run, keep)
                self.rt.templates = templates
        log.info("backend: %s", self.backend_reason)

    def harness_problem(self, config: Config) -> str | None:
        """One line naming what the config's CLI harnesses lack here (a CLI the
        guest image does not have, a secret that cannot be read); None if nothing."""
        return check_image_clis(config, self.image_clis) or check_role_secrets(config)

    def _check_harnesses(self, config: Config) -> None:
        problem = self.harness_problem(config)
        if problem is not None:
            raise HarnessUnavailable(problem)

    async def _start_irc(self, root: trio.Nursery) -> None:
        """Bring up the IRC side: the managed server if the config asks for one."""
        spec = self.config.irc
        if not spec.enabled:
            return
        address = spec.endpoint
        credentials = await trio.to_thread.run_sync(read_irc_credentials, spec)
        cluster = self.config.cluster
        if spec.is_managed:
            self.ircd = ManagedIrcd(
                spec,
                self.state_dir,
                on_event=self._on_event,
                registry=self.store,
                password=credentials.password,
                link=None if cluster is None else cluster.irc,
                host=self.store.host,
            )
            address = await root.start(self.ircd.run)
        self.rt.irc = IrcRoute(
            upstream=address,
            agents_channel=spec.agents_channel,
            password=credentials.password,
            cooldown=spec.agent_cooldown,
        )
        if cluster is not None:
            # Each host runs an overseer on the fleet's one network: one nick each.
            longest = spec.managed.max_nick_length if spec.is_managed else MAX_AGENT_NAME
            nick = fleet_nick(spec.overseer_nick, self.store.host, longest)
            spec = msgspec.structs.replace(spec, overseer_nick=nick)
        self.overseer = Overseer(self, spec, address, credentials, leads=cluster is None)
        root.start_soon(self.overseer.run)
        if cluster is not None:
            root.start_soon(self._lead_overseers, self.overseer)

    async def _start_group(self, name: str) -> RoleGroup:
        assert self._root is not None
        role = self.config.roles[name]
        adopt = [a for a in self._adoptees.values() if a.record.role == name]
        group = RoleGroup(
            role,
            self.rt,
            max_attempts=self.config.task_max_attempts,
            scale=self.store.scales().get(name),
            adopt=adopt,
            secrets=read_role_secrets,
            period=lambda: period_bounds(self.budgets.spec.period, time.time()),
        )
        for adoptee in adopt:
            del self._adoptees[adoptee.record.name]
        group.draining = self.draining
        self.groups[name] = group
        await self._root.start(self._run_group, group)
        group.tasks_queued()  # tasks left from before a restart
        return group

    async def _run_group(self, group: RoleGroup, *, task_status: trio.TaskStatus[None]) -> None:
        try:
            await group.run(task_status=task_status)
        finally:
            if self.groups.get(group.name) is group:
                del self.groups[group.name]

    async def _watchdog(self) -> None:
        """Ping systemd's watchdog (when it is on) and refresh the status line.

        It runs on the same event loop as everything else, so a stuck loop stops the
        pings and systemd restarts the service."""
        interval = sdnotify.watchdog_interval()
        period = interval / 2 if interval else 30.0
        while True:
            if interval:
                sdnotify.watchdog()
            sdnotify.status(self._status_line())
            await trio.sleep(period)

    async def shutdown(self) -> None:
        """Stop every VM gracefully within the fleet deadline, then end the root nursery."""
        self.stopping = True
        sdnotify.stopping()
        deadline = self.config.stop.fleet_deadline
        sdnotify.extend_timeout(deadline + 5)
        with trio.move_on_after(deadline) as scope:
            async with trio.open_nursery() as nursery:
                for group in list(self.groups.values()):
                    nursery.start_soon(group.stop_all, "supervisor stopping")
        if scope.cancelled_caught:
            log.warning("fleet did not stop within %gs: killing the rest", deadline)
            self.rt.graceful = False
        self.event("stopped", "supervisor")
        if self._root is not None:
            self._root.cancel_scope.cancel()

    async def down(self, leave_vms: bool = False) -> dict[str, object]:
        if leave_vms and self.rt.driver.outlives_supervisor:
            if not self.stopping and self._root is not None:
                # From a task of its own: this answer goes out before the API does.
                self._root.start_soon(self._hand_over_soon)
            return {"stopping": True, "leaving_vms": True}
        if not self.stopping and self._root is not None:
            self._root.start_soon(self.shutdown)
        return {"stopping": True, "leaving_vms": False}

    async def _hand_over_soon(self) -> None:
        await trio.lowlevel.checkpoint()
        if not self.stopping:
            self.hand_over()

    def hand_over(self) -> None:
        """Exit now, leaving the VMs running for the next supervisor on this state
        dir to adopt (SIGUSR2, ``down --leave-vms``, ``up --handover``): an upgrade
        without stopping the fleet. Their tasks stay claimed by them, their
        namespaces, bridge, rules, cgroups and disks stay; the managed services,
        the API socket and every listener go. With a backend whose VMs cannot
        outlive the supervisor (``process``) this is a graceful stop."""
        if not self.rt.driver.outlives_supervisor:
            log.info(
                "handover: %s VMs cannot outlive the supervisor; stopping them", self.rt.driver.name
            )
            if self._root is not None:
                self._root.start_soon(self.shutdown)
            return
        self.stopping = True
        self.rt.leaving = True
        sdnotify.stopping()
        running = sum(1 for g in self.groups.values() for c in g.children.values() if c.pid)
        self.event("handing_over", "supervisor", vms=running)
        log.info("handing over: leaving %d VMs running for the next supervisor", running)
        if self._root is not None:
            self._root.cancel_scope.cancel()


async def _hold_network(network: Network, rt: Runtime) -> None:
    """Hold the swarm's (open) bridge and rules until cancelled, then remove them;
    in a handover they stay, with the VMs left running on them."""
    try:
        await trio.sleep_forever()
    finally:
        if not rt.leaving:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await network.close()
