"""The fleet side of ``Supervisor`` (``daemon.py``): operating several hosts
as one swarm. What a host reports of itself, draining, placing named agents,
and the hosts as ``!fleet`` and ``status`` show them; the rules themselves are
in ``fleet.py``.

- **Load.** Each heartbeat (``cluster.py``) reports this host's load (its
  roles, VMs at work and warm targets, tasks running) and reads back whether
  the host is told to drain.
- **Drain.** ``drain HOST`` sets a flag in the hosts table, from any host;
  the host it names reads it at its next heartbeat (at once when it is this
  one), and then claims no task, stops its warm VMs and lets the VMs at work
  finish; it says so in the control channel, and again once nothing runs but
  its named agents. The flag is the table's, so a drained host that restarts
  starts drained. ``undrain`` reverses it.
- **Named agents.** A new one goes to the host ``fleet.place`` picks; its row
  in the agents table (the name its key, so unique in the fleet) names that
  host, which brings it up at its next heartbeat, and again after a restart:
  its workspace is there. An existing name stays with the host that has it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

import trio
from fireclaw.config import Config
from fireclaw.config.cluster import HOST_NAME_PATTERN, fleet_nick
from fireclaw.pool.group import RoleGroup
from fireclaw.supervisor.api import ControllerError
from fireclaw.supervisor.cluster import HEARTBEAT
from fireclaw.supervisor.controller import MAX_AGENT_NAME
from fireclaw.supervisor.fleet import NoRoom, fleet_line, host_state, host_status, place
from fireclaw.supervisor.state import (
    AgentExists,
    AgentRecord,
    HostLoad,
    HostRow,
    RoleLoad,
    StateError,
    Store,
)

log = logging.getLogger("fireclaw.supervisor")

_HOST_NAME: Final = re.compile(HOST_NAME_PATTERN)
#: A host whose heartbeat is older than this (two missed beats) is silent.
LATE: Final = 2 * HEARTBEAT


@contextlib.contextmanager
def _shared(what: str) -> Iterator[None]:
    """A command's store calls: the shared database failing is its one line
    (503, to be tried again), naming what was not done."""
    try:
        yield
    except AgentExists as exc:
        raise ControllerError(str(exc), 409) from None
    except StateError as exc:
        raise ControllerError(f"{what}: {exc}", 503) from None


class FleetSide:
    """Load, drain and placement for ``Supervisor``. What it reads is the
    supervisor's; the declarations below name it for the type checker."""

    config: Config
    store: Store
    groups: dict[str, RoleGroup]
    _root: trio.Nursery | None
    #: This host drains (as last read from the hosts table).
    draining: bool
    #: It said it is drained, since it was last told to drain.
    _drained_said: bool
    #: Named agents this host is bringing up now.
    _placing: set[str]

    if TYPE_CHECKING:

        def event(self, kind: str, subject: str, **detail: object) -> None: ...

        async def invoke(
            self, role: str, name: str | None = None, model: str | None = None
        ) -> dict[str, object]: ...

        async def _restore_agent(self, rec: AgentRecord) -> None: ...

        async def destroy(self, name: str) -> dict[str, object]: ...

    # --- what a heartbeat says ------------------------------------------------------

    def host_load(self) -> HostLoad:
        """This host's roles (VMs at work, warm target) and running tasks."""
        return HostLoad(
            roles={
                name: RoleLoad(
                    active=len(group.active_children()),
                    target=0 if group.draining else group.target,
                )
                for name, group in self.groups.items()
            },
            tasks=sum(group.running_tasks() for group in self.groups.values()),
        )

    def beaten(self, draining: bool) -> None:
        """A heartbeat went through and read the drain flag: act on it, and
        bring up the named agents placed on this host."""
        self.drain_told(draining)
        self.bring_up_placed()

    # --- drain ----------------------------------------------------------------------

    def drain_told(self, draining: bool) -> None:
        """This host is (or is no longer) told to drain: apply it to every role,
        and say so; say once too when a drain has finished."""
        host = self.store.host
        if draining != self.draining:
            self.draining, self._drained_said = draining, False
            # Counted first: what there was to finish and to stop.
            tasks = sum(g.running_tasks() for g in self.groups.values())
            warm = sum(len(g.pool_children()) for g in self.groups.values())
            for group in self.groups.values():
                group.set_draining(draining)
            if draining:
                log.warning("host %s drains: %d tasks to finish, %d warm VMs", host, tasks, warm)
                self.event("host_draining", host, tasks=tasks, warm=warm)
            else:
                log.info("host %s no longer drains", host)
                self.event("host_undrained", host)
        if self.draining and not self._drained_said and self._empty():
            self._drained_said = True
            self.event("host_drained", host)

    def _told_to_drain(self) -> bool:
        """Whether the hosts table says this host drains (at start: a drain
        outlives a restart). Unknown while the database does not answer: the
        first heartbeat reads it again."""
        try:
            rows = self.store.hosts()
        except StateError:
            return False
        draining = any(r.draining for r in rows if r.name == self.store.host)
        if draining:
            log.warning("host %s starts drained: it claims no tasks (undrain it)", self.store.host)
        return draining

    def _empty(self) -> bool:
        return all(g.running_tasks() == 0 and not g.pool_children() for g in self.groups.values())

    async def drain(self, host: str, draining: bool) -> dict[str, object]:
        """Tell ``host`` (any host of the fleet) to drain, or to stop."""
        if self.config.cluster is None:
            raise ControllerError(
                "this swarm is one host (swarm.yaml has no cluster: section): there is"
                " no other host to drain it to",
                409,
            )
        if not _HOST_NAME.fullmatch(host):
            raise ControllerError(f"{host[:64]!r} is not a host name")
        with _shared(f"{host} not changed"):
            found = self.store.set_draining(host, draining)
            if not found:
                names = ", ".join(r.name for r in self.store.hosts()) or "none"
                raise ControllerError(f"no host named {host!r} in the fleet (hosts: {names})", 404)
        if host == self.store.host:
            self.drain_told(draining)
        return {"host": host, "draining": draining}

    # --- the hosts ------------------------------------------------------------------

    def _silent_after(self) -> float:
        assert self.config.cluster is not None
        return self.config.cluster.silent_after

    def hosts_status(self) -> list[dict[str, object]] | None:
        """Every host, for ``status``; None for one host, or while the shared
        database does not answer."""
        if self.config.cluster is None:
            return None
        try:
            rows = self.store.hosts()
        except StateError:
            return None
        after = self._silent_after()
        return [host_status(r, late=LATE, silent_after=after) for r in rows]

    def fleet_lines(self) -> list[str]:
        """``!fleet``: one line per host."""
        if self.config.cluster is None:
            return ["this swarm is one host (no cluster: section in swarm.yaml)"]
        with _shared("the hosts not read"):
            rows = self.store.hosts()
        after = self._silent_after()
        return [fleet_line(r, late=LATE, silent_after=after) for r in rows] or ["no hosts yet"]

    # --- named agents across hosts ----------------------------------------------------

    async def place_agent(
        self, role: str, name: str | None = None, model: str | None = None
    ) -> dict[str, object]:
        """``!invoke`` in a fleet: a new named agent on the host with room, an
        existing one on the host that has its workspace. The answer has the
        ``host``; ``vm`` only when it came up here."""
        if self.config.cluster is None:
            return await self.invoke(role, name, model)
        with _shared("not placed"):
            rows = self.store.hosts()
            agents = self.store.agents()
        here = self.store.host
        if name is not None:
            existing = next((a for a in agents if a.name == name), None)
            if existing is not None:
                return self._where_it_lives(existing, rows)
        placed = collections.Counter(a.host or here for a in agents if a.role == role)
        try:
            host = place(rows, role, placed=placed, late=LATE, silent_after=self._silent_after())
        except NoRoom as exc:
            raise ControllerError(str(exc), 503) from None
        if host == here:
            return {**await self.invoke(role, name, model), "host": here}
        if name is None:
            name = self._free_fleet_name(role, host, {a.name for a in agents})
        with _shared(f"{name} not placed"):
            self.store.add_agent(AgentRecord(name=name, role=role, model=model, host=host))
        self.event("agent_placed", name, role=role, host=host)
        return {"name": name, "role": role, "host": host}

    def _where_it_lives(self, rec: AgentRecord, rows: list[HostRow]) -> dict[str, object]:
        """An existing named agent stays where its workspace is; if that host is
        gone, that is the one line to answer."""
        host = rec.host or self.store.host
        if host == self.store.host:
            if any(g.find_agent(rec.name) for g in self.groups.values()):
                raise ControllerError(f"an agent named {rec.name!r} already exists", 409)
            self.bring_up_placed()
            return {"name": rec.name, "role": rec.role, "host": host, "existing": True}
        row = next((r for r in rows if r.name == host), None)
        state = (
            None if row is None else host_state(row, late=LATE, silent_after=self._silent_after())
        )
        if row is None or state in ("silent", "fenced"):
            seen = (
                "never heard from"
                if row is None
                else f"{state}, last heartbeat {row.age:.0f} s ago"
            )
            raise ControllerError(
                f"{rec.name} lives on host {host} with its workspace, and that host is gone"
                f" ({seen}): it comes back when the host does",
                503,
            )
        return {"name": rec.name, "role": rec.role, "host": host, "existing": True}

    def _free_fleet_name(self, role: str, host: str, taken: set[str]) -> str:
        """The first free replica nick of ``role`` for an agent on ``host``."""
        spec = self.config.roles.get(role)
        if spec is None:
            raise ControllerError(f"no role {role!r} here to name its agent: give a name", 400)
        irc = self.config.irc
        longest = (
            min(MAX_AGENT_NAME, irc.managed.max_nick_length) if irc.is_managed else MAX_AGENT_NAME
        )
        n = 1
        while (name := fleet_nick(spec.nick(n), host, longest)) in taken:
            n += 1
        return name

    async def destroy_anywhere(self, name: str) -> dict[str, object]:
        """``!destroy`` in a fleet: a named agent here is stopped now; one on
        another host is dropped from the agents table, and that host stops it
        at its next heartbeat."""
        if self.config.cluster is None or any(g.find_agent(name) for g in self.groups.values()):
            return await self.destroy(name)
        with _shared(f"{name} not destroyed"):
            rec = next((a for a in self.store.agents() if a.name == name), None)
        if rec is None or rec.host is None:
            return await self.destroy(name)  # not here either: its one line
        with _shared(f"{name} not destroyed"):
            self.store.drop_agent(name)
        self.event("agent_dropped", name, role=rec.role, host=rec.host)
        return {"name": name, "host": rec.host, "destroyed": True}

    def bring_up_placed(self) -> None:
        """Start bringing up every named agent the agents table has on this
        host that does not run here (placed by the leader, or left by this
        host's previous supervisor), one attempt each at a time; in a fleet,
        stop those the table no longer has (destroyed from another host)."""
        if self._root is None:
            return
        try:
            agents = self.store.agents()
        except StateError as exc:
            log.debug("named agents not read: %s", exc)
            return
        here = self.store.host
        mine = {rec.name for rec in agents if (rec.host or here) == here}
        for rec in agents:
            if rec.name not in mine or rec.name in self._placing:
                continue
            if any(g.find_agent(rec.name) for g in self.groups.values()):
                continue
            self._placing.add(rec.name)
            self._root.start_soon(self._bring_up, rec)
        if self.config.cluster is None:
            return  # one host's agents are destroyed here, never behind its back
        for group in self.groups.values():
            for child in list(group.children.values()):
                agent = child.agent
                if agent is None or child.stopping or agent.name in mine:
                    continue
                if agent.name in self._placing:
                    continue  # being invoked here: its row is about to be, or was just, written
                log.info("agent %s was destroyed from another host: stopping it", agent.name)
                self.event("destroyed", agent.name, role=group.name, vm=child.name)
                self._root.start_soon(child.stop, "destroyed")

    async def _bring_up(self, rec: AgentRecord) -> None:
        try:
            await self._restore_agent(rec)
        finally:
            self._placing.discard(rec.name)
        group = self.groups.get(rec.role)
        child = group.find_agent(rec.name) if group is not None else None
        if child is not None and self.config.cluster is not None:
            self.event("agent_up", rec.name, role=rec.role, host=self.store.host, vm=child.name)
