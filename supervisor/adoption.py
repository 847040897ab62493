"""What a previous supervisor on the same state dir left: adopted when it can
be (its VMs that still run as they were recorded), reclaimed otherwise (its
services, its other VMs, and what no registry row names: namespaces, links,
rules, cgroups, overlays), and its tasks requeued when their VM is gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from fireclaw.config import Config, role_hash
from fireclaw.pool import cgroup, netns
from fireclaw.pool.drivers import Choice
from fireclaw.pool.durable import until_written
from fireclaw.pool.group import Adoptee, RoleGroup
from fireclaw.pool.network import bridge_name, table_name
from fireclaw.pool.procid import ProcessIdentity, still_running
from fireclaw.pool.runtime import Runtime
from fireclaw.pool.teardown import kill_recorded
from fireclaw.pool.vm_base import AgentIdentity
from fireclaw.supervisor import leftovers, services
from fireclaw.supervisor.state import StateUnwritable, Store, TaskRow

log = logging.getLogger("fireclaw.supervisor")


class Adoption:
    """Adoption and reclaim at the start of ``Supervisor`` (``daemon.py``). What
    they read and change is the supervisor's; the declarations below name it for
    the type checker."""

    config: Config
    state_dir: Path
    store: Store
    rt: Runtime
    groups: dict[str, RoleGroup]
    backend_choice: Choice
    _netns_why: str | None
    _adoptees: dict[str, Adoptee]
    _orphans: set[str] | None

    if TYPE_CHECKING:

        def event(self, kind: str, subject: str, **detail: object) -> None: ...

    def plan_adoption(self) -> dict[str, Adoptee]:
        """The VMs a previous supervisor left that are adopted rather than reclaimed.

        One is when it still runs (pid + start time + boot id), its role is in
        the config with the same spec hash, its registry row has what adoption
        needs (a row of an older schema has not), its address is in the
        configured subnet, and it was either idle, a named agent that still
        exists, or a task runner whose task is still claimed by it. Only the
        VMs of a driver whose VMs outlive the supervisor are adopted: a process
        guest ends with its control connection, so nothing of it is left to adopt.
        Whether the guest says Hello again is only known later: a VM that does
        not is reclaimed then."""
        if not self.backend_choice.outlives_supervisor or self._netns_why is not None:
            return {}
        agents = {a.name: a for a in self.store.agents() if a.host is None}  # this host's
        tasks = {
            t.owner: t
            for t in self.store.list_tasks(state="claimed", limit=100_000)
            if t.host in (self.store.host, None)  # a cluster's other hosts run theirs
        }
        subnet = ipaddress.IPv4Network(self.config.network.subnet)
        plan: dict[str, Adoptee] = {}
        for rec in self.store.vms():
            role = self.config.roles.get(rec.role)
            ident = ProcessIdentity(pid=rec.pid, start_time=rec.start_time, boot_id=rec.boot_id)
            if (
                role is None
                or rec.spec_hash != role_hash(role)
                or not (rec.start_time and rec.socket and rec.guest_token)
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
                plan[rec.name] = Adoptee(
                    rec, task_id=task.id, epoch=task.epoch, account=task.account
                )
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
