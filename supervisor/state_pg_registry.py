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
from fireclaw.supervisor.state_registry import (
    AgentExists,
    AgentRecord,
    HostLoad,
    HostRow,
    decode_load,
    encode_load,
)

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

    def add_agent(self, rec: AgentRecord) -> None:
        """Remember a new named agent on ``rec.host`` (None: this host). The
        name is the table's key, so two hosts adding one name at once cannot
        both succeed: the second gets ``AgentExists``, naming where it lives."""
        with self._pg.transaction(write=True) as cur:
            added = cur.execute(
                "INSERT INTO agents (name, role, model, persona, host, created_at)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO NOTHING RETURNING name",
                (rec.name, rec.role, rec.model, rec.persona, rec.host or self.host, self._clock()),
            ).fetchone()
            if added is None:
                row = cur.execute("SELECT host FROM agents WHERE name = %s", (rec.name,)).fetchone()
        if added is None:
            host = None if row is None or row[0] == self.host else row[0]
            raise AgentExists(rec.name, host)

    def drop_agent(self, name: str) -> None:
        with self._pg.transaction(write=True) as cur:
            cur.execute("DELETE FROM agents WHERE name = %s", (name,))

    def agents(self) -> list[AgentRecord]:
        """Named agents of every host, oldest first; ``host`` None for this one's."""
        with self._pg.transaction() as cur:
            rows = cur.execute(
                "SELECT name, role, model, persona, host FROM agents ORDER BY created_at, name"
            ).fetchall()
        return [
            AgentRecord(name=n, role=r, model=m, persona=p, host=None if h == self.host else h)
            for n, r, m, p, h in rows
        ]

    def heartbeat(self, load: HostLoad | None = None) -> bool:
        """This host is alive now, running ``load`` (its row is made at the
        first heartbeat); whether it is told to drain."""
        with self._pg.transaction(write=True) as cur:
            row = cur.execute(
                "INSERT INTO hosts (name, load) VALUES (%s, %s)"
                " ON CONFLICT (name) DO UPDATE SET heartbeat_at = now(), load = excluded.load"
                " RETURNING draining",
                (self.host, encode_load(load or HostLoad())),
            ).fetchone()
        return bool(row and row[0])

    def set_draining(self, name: str, draining: bool) -> bool:
        """Tell the host ``name`` to drain (or to stop draining); False if no
        such host ever heartbeat. The host reads it at its next heartbeat."""
        with self._pg.transaction(write=True) as cur:
            cur.execute("UPDATE hosts SET draining = %s WHERE name = %s", (draining, name))
            return cur.rowcount > 0

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
                " extract(epoch FROM now() - heartbeat_at), draining, load"
                " FROM hosts ORDER BY name"
            ).fetchall()
        return [
            HostRow(
                name=n,
                started_at=float(s),
                heartbeat_at=float(h),
                age=float(a),
                draining=d,
                load=decode_load(ld),
            )
            for n, s, h, a, d, ld in rows
        ]
