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
moves wait (``supervisor/durable.py``), audit events and registry rows are
dropped and counted, and ``status`` and the sd_notify status line say so. It
exits 0 after a graceful stop, 78 on a bad config at start, 1 when another
instance holds the lock or the state cannot be opened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
import re
import signal
import sys
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Final

import trio
from fireclaw.config import EX_CONFIG, Config, ConfigError, diff_config, load_config, role_hash
from fireclaw.config.model import parse_base_url
from fireclaw.guest_daemon import protocol as p
from fireclaw.pool import cgroup, netns
from fireclaw.pool.control import GuestLost
from fireclaw.pool.drivers import BackendUnavailable, NotReady, choose, open_backend
from fireclaw.pool.drivers.qemu import QemuDriver
from fireclaw.pool.durable import until_written
from fireclaw.pool.gateway import Limits, ModelRoute, Upstream, UpstreamError, fetch_models
from fireclaw.pool.group import Adoptee, PoolError, RoleGroup
from fireclaw.pool.network import Link, Network, NetworkError, bridge_name, table_name
from fireclaw.pool.procid import ProcessIdentity, still_running
from fireclaw.pool.templates import Templates
from fireclaw.pool.vm import AgentIdentity, Child, IrcRoute, Runtime, instance_id, kill_recorded
from fireclaw.supervisor import ballast, leftovers, sdnotify, services
from fireclaw.supervisor.api import ControllerError, Emit, serve_api
from fireclaw.supervisor.budget import Budgets
from fireclaw.supervisor.irc_credentials import read_irc_credentials
from fireclaw.supervisor.ircd import IrcdError, ManagedIrcd
from fireclaw.supervisor.modelserver import ManagedModelServer, ModelServerError
from fireclaw.supervisor.overseer import Overseer
from fireclaw.supervisor.pidfile import AlreadyRunning, PidLock
from fireclaw.supervisor.secretfile import SecretFileError
from fireclaw.supervisor.state import AgentRecord, StateError, StateUnwritable, Store, TaskRow
from fireclaw.supervisor.web import HttpServerError, serve_http

log = logging.getLogger("fireclaw.supervisor")

LOCK_NAME: Final = leftovers.LOCK_NAME
#: IRC nicks, as the guest protocol accepts them.
_AGENT_NAME: Final = re.compile(r"[A-Za-z\[\]\\`_^{|}][A-Za-z0-9\[\]\\`_^{|}-]{0,29}")
DB_NAME: Final = leftovers.DB_NAME
#: Seconds the model server has to list its models at start, reload or invoke.
MODELS_TIMEOUT: Final = 30.0
API_NAME: Final = "api.sock"
#: Guest images (built or found by the qemu backend) and snapshot templates.
IMAGES_NAME: Final = "images"
TEMPLATES_NAME: Final = "templates"
#: Each VM's own overlay disk, gone with the VM.
DISKS_NAME: Final = leftovers.DISKS_NAME
#: Named agents' workspace disks, kept.
WORKSPACES_NAME: Final = "workspaces"
#: ``up --handover`` waits for the old supervisor's lock this long past its fleet deadline.
HANDOVER_MARGIN: Final = 30.0


class Supervisor:
    def __init__(self, config: Config, state_dir: Path, store: Store) -> None:
        self.config = config
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
        self.budgets = Budgets(config.budget, store, on_event=self._on_event)
        self._upstream: Upstream | None = None  # an external model server
        self.overseer: Overseer | None = None
        self.http_url: str | None = None  # where the dashboard listens, once it does
        self._reload_wanted = trio.Event()
        self._reload_done = trio.Event()
        self._reload_result: dict[str, object] = {}
        self._root: trio.Nursery | None = None
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
                except BackendUnavailable as exc:
                    self.startup_error = f"backend {self.backend_choice.name}: {exc}"
                    log.error("%s", self.startup_error)
                    root.cancel_scope.cancel()
                    return
                except (IrcdError, ModelServerError, SecretFileError, HttpServerError) as exc:
                    self.startup_error = str(exc)
                    log.error("%s", exc)
                    root.cancel_scope.cancel()
                    return
                for role in self.config.roles.values():
                    await self._start_group(role.name)
                root.start_soon(self._reloader)
                if self._orphans is not None:
                    root.start_soon(self._requeue_orphans_later, self._orphans)
                for rec in self.store.agents():
                    root.start_soon(self._restore_agent, rec)
                root.start_soon(self._watchdog)
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

    def plan_adoption(self) -> dict[str, Adoptee]:
        """The VMs a previous supervisor left that are adopted rather than reclaimed.

        One is when it still runs (pid + start time + boot id), its role is in
        the config with the same spec hash, its registry row has what adoption
        needs (a row of an older schema has not), its address is in the
        configured subnet, and it was either idle, a named agent that still
        exists, or a task runner whose task is still claimed by it. Only the
        qemu backend's VMs are adopted: a process guest ends with its control
        connection, so nothing of it is left to adopt. Whether the guest says
        Hello again is only known later: a VM that does not is reclaimed then."""
        if self.backend_choice.name != "qemu" or self._netns_why is not None:
            return {}
        agents = {a.name: a for a in self.store.agents()}
        tasks = {t.owner: t for t in self.store.list_tasks(state="claimed", limit=100_000)}
        subnet = ipaddress.IPv4Network(self.config.network.subnet)
        plan: dict[str, Adoptee] = {}
        for rec in self.store.vms():
            role = self.config.roles.get(rec.role)
            ident = ProcessIdentity(pid=rec.pid, start_time=rec.start_time, boot_id=rec.boot_id)
            if (
                role is None
                or rec.spec_hash != role_hash(role)
                or not (rec.start_time and rec.socket and rec.port and rec.guest_token)
                or rec.address is None
                or ipaddress.IPv4Address(rec.address) not in subnet
                or not still_running(ident)
            ):
                continue
            agent, task = agents.get(rec.agent or ""), tasks.get(rec.name)
            if not rec.claimed:
                plan[rec.name] = Adoptee(rec)
            elif rec.agent is not None and agent is not None and agent.role == rec.role:
                identity = AgentIdentity(name=agent.name, model=agent.model, persona=agent.persona)
                plan[rec.name] = Adoptee(rec, agent=identity)
            elif rec.agent is None and task is not None and task.role == rec.role:
                plan[rec.name] = Adoptee(rec, task_id=task.id)
        return plan

    def reclaim(self) -> None:
        """Remove what a previous, crashed supervisor left: services, VMs, namespaces,
        cgroups, tasks."""
        self.reclaim_services()
        for rec in self.store.vms():
            if rec.name in self._adoptees:
                continue  # taken over as it runs, once the backend is up
            kill_recorded(rec)
            if rec.cgroup:
                with contextlib.suppress(cgroup.CgroupError):
                    cgroup.remove(Path(rec.cgroup))
            if rec.netns:
                with contextlib.suppress(netns.NetnsError):
                    netns.remove_sync(rec.netns)
            self.store.drop_vm(rec.name)
            self.event("reclaimed", rec.name, pid=rec.pid)
            log.info("reclaimed %s (pid %d) left by a previous supervisor", rec.name, rec.pid)
        # What no registry row names: VM processes whose row was never written or
        # already dropped, links, rules, overlays and VM run directories.
        found = _sparing(leftovers.find(self.state_dir), self._adoptees.values(), self.rt.instance)
        for removal in leftovers.remove(found):
            if removal.ok:
                log.info("%s, left by a previous supervisor", removal)
            else:
                log.warning("%s", removal)
        runners = {name for name, a in self._adoptees.items() if a.task_id is not None}
        try:
            self._requeued(self._requeue_orphans(runners))
        except StateUnwritable as exc:
            log.warning("tasks of gone VMs are requeued once the state disk has room: %s", exc)
            self._orphans = runners

    def _requeue_orphans(self, runners: set[str]) -> list[TaskRow]:
        return self.store.requeue_orphans(runners, max_attempts=self.config.task_max_attempts)

    def _requeued(self, tasks: list[TaskRow]) -> None:
        for task in tasks:
            self.event("task_requeued", f"task-{task.id}", reason="supervisor restarted")

    async def _requeue_orphans_later(self, runners: set[str]) -> None:
        """``reclaim``'s requeue, held until the state disk takes it."""
        self._requeued(
            await until_written(partial(self._requeue_orphans, runners), self.store.health)
        )
        for group in self.groups.values():
            group.tasks_queued()

    def reclaim_services(self) -> None:
        """Stop the managed services (ngircd, ...) a previous supervisor left running.

        Each registry row names one by identity; it is stopped (SIGTERM to its
        group, then SIGKILL) rather than adopted (see ``supervisor/services.py``),
        so its port is free for ours. A copy whose row was written ahead (pid 0)
        is found by its command line in ``reclaim``'s sweep of ``leftovers``."""
        for rec in self.store.services():
            try:
                outcome = services.reclaim(self.store, rec)
            except OSError as exc:
                # Still holding its port, most likely: the start that follows says so.
                log.warning("cannot stop service %s (pid %d): %s", rec.name, rec.pid, exc)
                continue
            if outcome == "gone":
                continue
            self.event("reclaimed", rec.name, pid=rec.pid, command=rec.command, how=outcome)
            log.info(
                "reclaimed service %s (%s, pid %d, %s) left by a previous supervisor",
                rec.name,
                os.path.basename(rec.command),
                rec.pid,
                outcome,
            )

    async def _setup_backend(self, root: trio.Nursery) -> None:
        """Make the chosen VMM backend ready before any VM starts.

        For qemu: build the guest image into ``<state_dir>/images`` or find it
        there (a first build takes about a minute; its steps are logged), pick
        KVM or TCG (a boot probe, cached), create the driver, and start the
        snapshot templates the warm pools restore from. Raises
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
        )
        self.rt.driver = backend.driver
        self.rt.vmm_overhead_mib = backend.memory_overhead_mib
        self.backend_reason = backend.reason
        if isinstance(backend.driver, QemuDriver):
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
            self.rt.base_disk = backend.driver.image.rootfs
            self.rt.workspaces_dir = self.state_dir / WORKSPACES_NAME
            templates = Templates(self.rt, backend.driver, self.state_dir / TEMPLATES_NAME)
            keep = {templates.key_for(role) for role in self.config.roles.values()}
            await root.start(templates.run, keep)
            self.rt.templates = templates
        log.info("backend: %s", self.backend_reason)

    async def _start_models(self, root: trio.Nursery) -> None:
        """Bring up the model side: the managed model server (or the upstream URL and
        its key), the budgets, and the route every VM's gateway takes. Raises
        ModelServerError (one line) when it cannot start or a role names a model
        the server does not serve."""
        spec = self.config.models
        if spec is None:
            return
        if spec.is_managed:
            self.modelserver = ManagedModelServer(
                spec.managed,
                self.config.model_path,
                self.state_dir,
                on_event=self._on_event,
                registry=self.store,
            )
            await root.start(self.modelserver.run)
        else:
            scheme, host, port, prefix = parse_base_url(spec.server)
            key = await trio.to_thread.run_sync(self._read_api_key)
            self._upstream = Upstream(scheme, host, port, prefix, api_key=key)
        problem = await self.check_models(self.config)
        if problem is not None:
            raise ModelServerError(problem)
        root.start_soon(self.budgets.run)
        self.rt.models = ModelRoute(
            upstream=self.upstream,
            meter=self.budgets,
            limits=Limits(
                max_request_bytes=spec.max_request_bytes,
                max_concurrent=spec.max_concurrent,
                call_timeout=spec.call_timeout,
            ),
        )

    def _read_api_key(self) -> str | None:
        """The upstream's API key, from the file or the environment variable the config
        names. Raises ModelServerError (naming the file or variable, never the key)."""
        spec, path = self.config.models, self.config.api_key_path
        assert spec is not None
        if path is not None:
            try:
                key = path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise ModelServerError(f"models.api_key_file: cannot read {path}: {exc}") from None
            if not key or any(ch in key for ch in "\r\n\x00"):
                raise ModelServerError(f"models.api_key_file: {path} holds no usable key")
            return key
        if spec.api_key_env is not None:
            key = os.environ.get(spec.api_key_env, "").strip()
            if not key:
                raise ModelServerError(f"models.api_key_env: ${spec.api_key_env} is not set")
            return key
        return None

    def upstream(self) -> Upstream | None:
        """Where model calls go now; None while the managed server is not serving."""
        if self.modelserver is None:
            return self._upstream
        url = self.modelserver.url
        if url is None or self.modelserver.state != "running":
            return None
        scheme, host, port, prefix = parse_base_url(url)
        return Upstream(scheme, host, port, prefix)

    async def check_models(self, config: Config, extra: str | None = None) -> str | None:
        """One line naming a role's model (or ``extra``) the model server does not
        serve, or the server's failure to say; None when all are served."""
        if config.models is None:
            return None
        up = self.upstream()
        if up is None:
            return "the model server is not running"
        served: list[str] | None = None
        with trio.move_on_after(MODELS_TIMEOUT):
            try:
                served = await fetch_models(up)
            except UpstreamError as exc:
                return str(exc)
        if served is None:
            return f"the model server did not list its models within {MODELS_TIMEOUT:g}s"
        wanted = [(f"roles.{r.name}.model", r.model) for r in config.roles.values()]
        if extra is not None:
            wanted.append(("model", extra))
        for where, model in wanted:
            if model not in served:
                return (
                    f"{where}: {model!r} is not a model the model server serves"
                    f" (it serves: {', '.join(served) or 'none'})"
                )
        return None

    async def _start_irc(self, root: trio.Nursery) -> None:
        """Bring up the IRC side: the managed server if the config asks for one."""
        spec = self.config.irc
        if not spec.enabled:
            return
        address = spec.endpoint
        credentials = await trio.to_thread.run_sync(read_irc_credentials, spec)
        if spec.is_managed:
            self.ircd = ManagedIrcd(
                spec,
                self.state_dir,
                on_event=self._on_event,
                registry=self.store,
                password=credentials.password,
            )
            address = await root.start(self.ircd.run)
        self.rt.irc = IrcRoute(
            upstream=address,
            agents_channel=spec.agents_channel,
            password=credentials.password,
            cooldown=spec.agent_cooldown,
        )
        self.overseer = Overseer(self, spec, address, credentials)
        root.start_soon(self.overseer.run)

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
        )
        for adoptee in adopt:
            del self._adoptees[adoptee.record.name]
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

    # --- reload ------------------------------------------------------------------------

    def request_reload(self) -> None:
        self._reload_wanted.set()

    async def _reloader(self) -> None:
        # One reload at a time; signals arriving meanwhile collapse into one more run.
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted = trio.Event()
            done, self._reload_done = self._reload_done, trio.Event()
            self._reload_result = await self._apply_reload()
            done.set()

    async def _apply_reload(self) -> dict[str, object]:
        sdnotify.reloading()
        try:
            new = load_config(self.config.path)
        except ConfigError as exc:
            self.last_reload_error = str(exc)
            log.error("reload rejected: %s", exc)
            self.event("reload_rejected", "supervisor", error=str(exc))
            sdnotify.ready(f"reload rejected: {exc}")
            return {"ok": False, "error": str(exc)}
        problem = await self.check_models(new) if new.models == self.config.models else None
        if problem is not None:
            self.last_reload_error = problem
            log.error("reload rejected: %s", problem)
            self.event("reload_rejected", "supervisor", error=problem)
            sdnotify.ready(f"reload rejected: {problem}")
            return {"ok": False, "error": problem}
        diff = diff_config(self.config, new)
        notes: list[str] = []
        if new.models != self.config.models:
            notes.append("models changes take effect at the next start")
        if diff.backend_changed:
            notes.append("backend changes take effect at the next start")
        if diff.state_dir_changed:
            notes.append("state_dir changes take effect at the next start")
        if diff.irc_changed:
            notes.append("irc changes take effect at the next start")
        if diff.network_changed:
            notes.append("network changes take effect at the next start")
        if new.http != self.config.http:
            notes.append("http changes take effect at the next start")
        old, self.config = self.config, new
        self.rt.control, self.rt.stop = new.control, new.stop
        self.budgets.update(new.budget)
        assert self._root is not None
        for name in diff.removed:
            self._clear_scale(name)  # a role added again later starts from its file
            group = self.groups.get(name)
            if group is not None:
                self._root.start_soon(group.stop_all, "role removed")
            if self.rt.templates is not None:
                self.rt.templates.forget(name)  # its template is not tried or kept for it
        for name in diff.added:
            await self._start_group(name)
        for name, change in diff.changed.items():
            group = self.groups[name]
            group.update(new.roles[name])
            if change.scale and old.roles[name].pool != new.roles[name].pool:
                self._clear_scale(name)
                group.set_scale(None)
            if change.restart_policy:
                group.reset()
            if change.replace:
                self._root.start_soon(group.roll)
            elif change.hot:
                self._root.start_soon(group.hot_reload)
        self.last_reload_error = None
        self.event(
            "reloaded",
            "supervisor",
            added=list(diff.added),
            removed=list(diff.removed),
            changed=sorted(diff.changed),
        )
        log.info(
            "reloaded: added %s, removed %s, changed %s",
            list(diff.added),
            list(diff.removed),
            sorted(diff.changed),
        )
        sdnotify.ready(self._status_line())
        return {
            "ok": True,
            "error": None,
            "added": list(diff.added),
            "removed": list(diff.removed),
            "changed": sorted(diff.changed),
            "notes": notes,
        }

    def _clear_scale(self, role: str) -> None:
        """Forget a scale override; kept when the state disk refuses (the file's
        scale applies now; the override comes back at the next start)."""
        try:
            self.store.clear_scale(role)
        except StateError as exc:
            log.warning("scale override of %s not cleared: %s", role, exc)

    # --- the Controller the API serves --------------------------------------------------

    def _group(self, role: str) -> RoleGroup:
        group = self.groups.get(role)
        if group is None:
            raise ControllerError(
                f"no role {role!r} (roles: {', '.join(self.groups) or 'none'})", 404
            )
        return group

    def _status_line(self) -> str:
        counts = [g.counts() for g in self.groups.values()]
        idle = sum(int(c["idle"]) for c in counts)  # type: ignore[call-overload]
        active = sum(int(c["active"]) for c in counts)  # type: ignore[call-overload]
        failed = sum(int(c["failed"]) for c in counts)  # type: ignore[call-overload]
        line = f"{idle} idle, {active} active, {failed} failed"
        health = self.store.health
        if not health.writable:
            line += (
                f"; state disk {health.why}: tasks refused, {health.dropped_events} events dropped"
            )
        return line

    async def status(self, since: int | None = None, wait: float = 0.0) -> dict[str, object]:
        """The fleet; with ``since``, first wait up to ``wait`` s for a change past it."""
        if since is not None:
            with trio.move_on_after(wait):
                await self.rt.wait_change(since)
        return {
            "version": self.rt.version,
            "pid": os.getpid(),
            "config": str(self.config.path),
            "state_dir": str(self.state_dir),
            "backend": self.backend_reason,
            "isolation": self.isolation,
            "network": self._network_status(),
            "stopping": self.stopping,
            "last_reload_error": self.last_reload_error,
            "roles": {name: g.counts() for name, g in self.groups.items()},
            "agents": [a for g in self.groups.values() for a in g.snapshot()],
            "tasks": self._task_counts(),
            "state": self.store.health.status(),
            "irc": self._irc_status(),
            "models": self._models_status(),
            "http": self.http_url,
        }

    def _models_status(self) -> dict[str, object] | None:
        spec = self.config.models
        if spec is None:
            return None
        status: dict[str, object] = {"server": spec.server, "budget": self.budgets.status()}
        if self.modelserver is not None:
            status["managed"] = self.modelserver.status()
        return status

    def _task_counts(self) -> dict[str, int] | None:
        """Tasks by state; None when a failing disk cannot even be read (the
        store has logged that once; status is asked for often)."""
        try:
            return self.store.count_tasks()
        except StateUnwritable:
            return None

    def _network_status(self) -> dict[str, object] | None:
        net = self.rt.network
        if net is None:
            return None
        return {
            "bridge": net.bridge,
            "subnet": str(net.subnet),
            "gateway": net.gateway,
            "egress": net.egress,
        }

    def _irc_status(self) -> dict[str, object]:
        spec = self.config.irc
        if not spec.enabled:
            return {"enabled": False}
        host, port = self.rt.irc.upstream if self.rt.irc else spec.endpoint
        status: dict[str, object] = {"enabled": True, "server": f"{host}:{port}"}
        if self.ircd is not None:
            status["managed"] = self.ircd.status()
        return status

    async def run(self, role: str | None, argv: list[str], emit: Emit, user: str = "") -> int:
        if not argv:
            raise ControllerError("nothing to run: give a command after --")
        group = self._group(role or next(iter(self.groups), ""))
        boot_timeout = self.config.control.boot_timeout
        child = None
        with trio.move_on_after(boot_timeout):
            try:
                child = await group.claim()
            except PoolError as exc:
                raise ControllerError(str(exc), 503) from None
        if child is None:
            raise ControllerError(f"no {group.name} VM became ready within {boot_timeout:g}s", 503)
        try:
            await emit({"vm": child.name})
            assert child.session is not None
            return await child.session.run(argv, emit, user=user)
        except GuestLost as exc:
            raise ControllerError(
                f"{child.name} was lost during the run: {exc.reason}", 502
            ) from None
        finally:
            group.retire(child, "run finished")

    async def submit_task(self, role: str, prompt: str) -> dict[str, object]:
        group = self._group(role)
        if not prompt.strip():
            raise ControllerError("task: the prompt is empty")
        if len(prompt) > p.MAX_PROMPT_CHARS:
            raise ControllerError(
                f"task: the prompt has {len(prompt)} characters, at most {p.MAX_PROMPT_CHARS}"
            )
        try:
            task = self.store.add_task(role, prompt)
        except StateUnwritable as exc:
            raise _unwritable(exc, "task not accepted") from None
        self.event("task_queued", f"task-{task.id}", role=role)
        group.tasks_queued()
        return _task_dict(task)

    async def get_task(self, task_id: int) -> dict[str, object]:
        task = self.store.get_task(task_id)
        if task is None:
            raise ControllerError(f"no task {task_id}", 404)
        return _task_dict(task)

    async def list_tasks(self, state: str | None) -> list[dict[str, object]]:
        return [_task_dict(t) for t in self.store.list_tasks(state=state)]

    async def scale(self, role: str, n: int) -> dict[str, object]:
        if not 0 <= n <= 1000:
            raise ControllerError(f"scale: {n} is out of range (0..1000)")
        group = self._group(role)
        try:
            self.store.set_scale(role, n)
        except StateUnwritable as exc:
            raise _unwritable(exc, "scale not changed") from None
        group.set_scale(n)
        self.event("scaled", role, n=n)
        return {"role": role, "target": n}

    async def reset(self, name: str) -> dict[str, object]:
        if name in self.groups:
            return {"reset": self.groups[name].reset()}
        for group in self.groups.values():
            child = group.children.get(name)
            if child is not None:
                child.reset()
                return {"reset": 1}
        raise ControllerError(f"no role or VM named {name!r}", 404)

    async def reload(self) -> dict[str, object]:
        done = self._reload_done
        self.request_reload()
        await done.wait()
        return self._reload_result

    async def usage(self, by: str, since: int, key: str | None) -> dict[str, object]:
        """The ledger of model calls since ``since`` summed per ``by``, and the budgets."""
        assert by in ("agent", "role", "task", "model", "vm")
        rows = self.store.usage(by=by, since=float(since), key=key)  # type: ignore[arg-type]
        return {
            "by": by,
            "since": since,
            "rows": [
                {
                    "key": r.key,
                    "calls": r.calls,
                    "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens,
                    "tokens": r.tokens,
                }
                for r in rows
            ],
            "budget": self.budgets.status(),
        }

    async def events(self, after: int, limit: int) -> list[dict[str, object]]:
        return [
            {"id": e.id, "at": e.at, "kind": e.kind, "subject": e.subject, "detail": e.detail}
            for e in self.store.events(after=after, limit=limit)
        ]

    # --- named agents (the overseer's !invoke, !destroy, !model, !persona) -------

    def _agent(self, name: str) -> tuple[RoleGroup, Child]:
        for group in self.groups.values():
            child = group.find_agent(name)
            if child is not None:
                return group, child
        raise ControllerError(f"no agent named {name!r}", 404)

    def _free_agent_name(self, group: RoleGroup) -> str:
        taken = {c.agent.name for g in self.groups.values() for c in g.children.values() if c.agent}
        n = 1
        while group.role.nick(n) in taken:
            n += 1
        return group.role.nick(n)

    async def invoke(
        self, role: str, name: str | None = None, model: str | None = None
    ) -> dict[str, object]:
        """Bring up a named agent of ``role``: it keeps its name across restarts."""
        group = self._group(role)
        name = name or self._free_agent_name(group)
        if not _AGENT_NAME.fullmatch(name):
            raise ControllerError(
                f"{name!r} is not a usable agent name (letters, digits and -_[]{{}}|^`)"
            )
        if any(g.find_agent(name) for g in self.groups.values()):
            raise ControllerError(f"an agent named {name!r} already exists", 409)
        if model is not None and self.config.models is not None:
            problem = await self.check_models(self.config, model)
            if problem is not None:
                raise ControllerError(problem)
        # Remembered first: an agent the disk cannot remember is not made.
        try:
            self.store.put_agent(AgentRecord(name=name, role=role, model=model))
        except StateUnwritable as exc:
            raise _unwritable(exc, f"agent {name} not invoked") from None
        boot_timeout = self.config.control.boot_timeout
        child = None
        try:
            with trio.move_on_after(boot_timeout):
                try:
                    child = await group.invoke(AgentIdentity(name=name, model=model))
                except PoolError as exc:
                    raise ControllerError(str(exc), 503) from None
            if child is None:
                raise ControllerError(f"no {role} VM became ready within {boot_timeout:g}s", 503)
        except BaseException:
            with contextlib.suppress(StateError):
                self.store.drop_agent(name)
            raise
        return {"name": name, "role": role, "vm": child.name}

    async def destroy(self, name: str) -> dict[str, object]:
        group, child = self._agent(name)
        try:
            self.store.drop_agent(name)
        except StateUnwritable as exc:
            raise _unwritable(exc, f"agent {name} not destroyed") from None
        self.event("destroyed", name, role=group.name, vm=child.name)
        await child.stop("destroyed")
        return {"name": name, "destroyed": True}

    async def cancel(self, name: str, reason: str) -> dict[str, object]:
        """End the current turn(s) of the agent ``name`` (a named agent, or the VM
        running a task): its model streams close, its tool processes are killed,
        a task so ended fails with exit 130. The VM and the agent stay."""
        child = next(
            (c for g in self.groups.values() if (c := g.find_agent(name)) is not None), None
        )
        if child is None:
            child = next(
                (g.children[name] for g in self.groups.values() if name in g.children), None
            )
        if child is None:
            raise ControllerError(f"no agent or VM named {name!r}", 404)
        if child.promoted_as is None:
            raise ControllerError(f"{name} is not at work: it has no turn to stop", 409)
        try:
            await child.cancel_turn(reason)
        except GuestLost as exc:
            raise ControllerError(f"{name}: {exc.reason}", 409) from None
        return {"name": name, "vm": child.name, "cancelled": True}

    async def retune(
        self, name: str, *, model: str | None = None, persona: str | None = None
    ) -> dict[str, object]:
        """Give a named agent a new model or persona, without restarting its VM."""
        group, child = self._agent(name)
        assert child.agent is not None
        if model is not None and self.config.models is not None:
            problem = await self.check_models(self.config, model)
            if problem is not None:
                raise ControllerError(problem)
        agent = dataclasses.replace(
            child.agent,
            model=child.agent.model if model is None else model,
            persona=child.agent.persona if persona is None else persona,
        )
        try:
            self.store.put_agent(
                AgentRecord(name=name, role=group.name, model=agent.model, persona=agent.persona)
            )
        except StateUnwritable as exc:
            raise _unwritable(exc, f"agent {name} not changed") from None
        child.agent.model, child.agent.persona = agent.model, agent.persona
        await group.retune(child)
        self.event("retuned", name, model=agent.model, persona=agent.persona is not None)
        return {"name": name, "model": agent.model or group.role.model}

    async def _restore_agent(self, rec: AgentRecord) -> None:
        """Bring back a named agent the previous supervisor had."""
        group = self.groups.get(rec.role)
        if group is None:
            log.warning("agent %s: its role %s is gone; forgetting it", rec.name, rec.role)
            with contextlib.suppress(StateError):  # forgotten at a later start, then
                self.store.drop_agent(rec.name)
            return
        if group.find_agent(rec.name) is not None:
            return  # its VM was adopted: it is back as it was
        try:
            await group.invoke(AgentIdentity(name=rec.name, model=rec.model, persona=rec.persona))
        except PoolError as exc:
            log.warning("agent %s not restored: %s", rec.name, exc)

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


def _sparing(
    found: leftovers.Leftovers, adopted: Iterable[Adoptee], instance: str
) -> leftovers.Leftovers:
    """``found`` without what the VMs being adopted hold: their processes, rows,
    cgroups, namespaces, veths, overlays and run directories, and the swarm's
    bridge and rules they are on."""
    recs = [a.record for a in adopted]
    if not recs:
        return found
    pids = {r.pid for r in recs}
    kept = {
        *(r.cgroup for r in recs),
        *(r.netns for r in recs),
        *(r.veth for r in recs),
        *(r.disk for r in recs),
        *(str(Path(r.socket).parent) for r in recs if r.socket),
        *(r.name for r in recs),
        bridge_name(instance),
        f"inet {table_name(instance)}",
    }
    return dataclasses.replace(
        found,
        processes=[p for p in found.processes if p.pid not in pids],
        vms=[v for v in found.vms if v.name not in kept],
        cgroups=[c for c in found.cgroups if str(c) not in kept],
        netns=[n for n in found.netns if n not in kept],
        links=[n for n in found.links if n not in kept],
        tables=[t for t in found.tables if t not in kept],
        disks=[d for d in found.disks if str(d) not in kept],
        run_dirs=[d for d in found.run_dirs if str(d) not in kept],
    )


def _unwritable(exc: StateUnwritable, what: str) -> ControllerError:
    """The one line a request gets when the state disk refuses what it asks:
    507 Insufficient Storage; it can be tried again once the disk has room."""
    return ControllerError(f"the state disk is {exc.why}: {what} ({exc.path})", 507)


def _task_dict(task: object) -> dict[str, object]:
    import msgspec

    return msgspec.structs.asdict(task)  # type: ignore[arg-type]


def run_up(config_path: str, state_dir: str | None, *, handover: bool = False) -> int:
    """``fireclaw-swarm up``: run the supervisor in the foreground until stopped.

    With ``handover``, a supervisor already running on the state dir is asked to
    exit and leave its VMs running (``down --leave-vms``); this one waits for its
    lock, then starts and adopts them: an upgrade without stopping the fleet."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"fireclaw-swarm: {exc}", file=sys.stderr)
        return EX_CONFIG
    sdir = Path(state_dir).resolve() if state_dir else config.state_dir
    try:
        sdir.mkdir(parents=True, exist_ok=True)
        lock = PidLock(sdir / LOCK_NAME)
        try:
            lock.acquire()
        except AlreadyRunning as exc:
            if not handover:
                raise
            _ask_to_hand_over(sdir, exc)
            # A process backend's holder stops its fleet first: up to its deadline.
            lock.acquire(wait=config.stop.fleet_deadline + HANDOVER_MARGIN)
    except AlreadyRunning as exc:
        print(f"fireclaw-swarm: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"fireclaw-swarm: cannot use state dir {sdir}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        try:
            store = _open_store(sdir)
        except StateError as exc:
            print(f"fireclaw-swarm: {exc}", file=sys.stderr)
            return 1
        try:
            supervisor = Supervisor(config, sdir, store)
        except BackendUnavailable as exc:
            print(f"fireclaw-swarm: {config.path.name}: backend: {exc}", file=sys.stderr)
            return EX_CONFIG
        try:
            trio.run(supervisor.serve)
        finally:
            store.close()
        if supervisor.startup_error is not None:
            print(f"fireclaw-swarm: {supervisor.startup_error}", file=sys.stderr)
            return 1
    finally:
        lock.release()
    return 0


def _open_store(state_dir: Path) -> Store:
    """The state database, opened in the ballast's room if the disk is full
    (see ``ballast``); the ballast made again when there is room for it."""
    try:
        store = Store.open(state_dir / DB_NAME)
    except StateError:
        if not ballast.disk_full(state_dir):
            raise
        freed = ballast.release(state_dir)
        if not freed:
            raise
        log.warning(
            "state disk %s is full: its %d-byte ballast was released to start;"
            " make room there, or tasks are refused once that room is used too",
            state_dir,
            freed,
        )
        return Store.open(state_dir / DB_NAME)
    why = ballast.ensure(state_dir)
    if why is not None:
        log.warning("no ballast in %s (room to start on a full disk): %s", state_dir, why)
    return store


def _ask_to_hand_over(state_dir: Path, holder: AlreadyRunning) -> None:
    """Ask the supervisor holding ``state_dir`` to exit, leaving its VMs running."""
    from fireclaw.supervisor.client import ApiClient, ApiError, SwarmNotRunning

    try:
        ApiClient(state_dir / API_NAME).post("/down", {"leave_vms": True})
    except ApiError as exc:
        if exc.status is not None or isinstance(exc, SwarmNotRunning):
            raise AlreadyRunning(holder.pid, holder.path) from exc
        # The connection went with the supervisor before its answer came: it took
        # the request. Its lock tells when it is gone.
    who = f"pid {holder.pid}" if holder.pid else "the running supervisor"
    print(f"fireclaw-swarm: {who} is handing its VMs over; waiting for it", file=sys.stderr)


async def _hold_network(network: Network, rt: Runtime) -> None:
    """Hold the swarm's (open) bridge and rules until cancelled, then remove them;
    in a handover they stay, with the VMs left running on them."""
    try:
        await trio.sleep_forever()
    finally:
        if not rt.leaving:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await network.close()
