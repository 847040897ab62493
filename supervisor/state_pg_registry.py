"""Who is in the cluster: named agents (one name across every host) and the
hosts with their heartbeats, in PostgreSQL (same contract as the SQLite
store's ``state_registry.py`` for these). A heartbeat is stamped with the
database's clock, so hosts whose clocks disagree still agree on who is silent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from fireclaw.supervisor.state_pg_db import PgDatabase
from fireclaw.supervisor.state_pg_schema import MIGRATION_LOCK
from fireclaw.supervisor.state_registry import AgentRecord, HostRow

#: Held, for as long as its connection lasts, by the host whose overseer leads
#: the fleet (``lead_fleet``).
LEAD_LOCK: Final = MIGRATION_LOCK + 2


class PgRegistry:
    """Named agents and hosts."""

    _pg: PgDatabase
    _clock: Callable[[], float]
    host: str

    def put_agent(self, rec: AgentRecord) -> None:
        """Remember a named agent (or its new model/persona), on this host."""
        with self._pg.transaction(write=True) as cur:
            cur.execute(
                "INSERT INTO agents (name, role, model, persona, host, created_at)"
                " VALUES (%s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (name) DO UPDATE SET role = excluded.role,"
                " model = excluded.model, persona = excluded.persona",
                (rec.name, rec.role, rec.model, rec.persona, self.host, self._clock()),
            )

    def drop_agent(self, name: str) -> None:
        with self._pg.transaction(write=True) as cur:
            cur.execute("DELETE FROM agents WHERE name = %s", (name,))

    def agents(self) -> list[AgentRecord]:
        """Named agents, oldest first."""
        with self._pg.transaction() as cur:
            rows = cur.execute(
                "SELECT name, role, model, persona FROM agents ORDER BY created_at, name"
            ).fetchall()
        return [AgentRecord(name=n, role=r, model=m, persona=p) for n, r, m, p in rows]

    def heartbeat(self) -> None:
        """This host is alive now (its row is made at the first heartbeat)."""
        with self._pg.transaction(write=True) as cur:
            cur.execute(
                "INSERT INTO hosts (name) VALUES (%s)"
                " ON CONFLICT (name) DO UPDATE SET heartbeat_at = now()",
                (self.host,),
            )

    def lead_fleet(self) -> bool:
        """Whether this host leads the fleet's overseers: it holds, or has just
        taken, an advisory lock on a connection kept for it, which its death or
        loss of the database frees. Blocking; one worker thread at a time."""
        return self._pg.hold_lock(LEAD_LOCK)

    def hosts(self) -> list[HostRow]:
        """Every host that ever heartbeat, by name; ``age`` by the database's clock."""
        with self._pg.transaction() as cur:
            rows = cur.execute(
                "SELECT name, extract(epoch FROM started_at), extract(epoch FROM heartbeat_at),"
                " extract(epoch FROM now() - heartbeat_at) FROM hosts ORDER BY name"
            ).fetchall()
        return [
            HostRow(name=n, started_at=float(s), heartbeat_at=float(h), age=float(a))
            for n, s, h, a in rows
        ]
