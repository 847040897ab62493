"""What happened, across the cluster: the audit trail and the ledger of model
calls in PostgreSQL (same contract as ``state_ledger.py``), each row stamped
with the host it happened on. Restarts stay in each host's own database.
"""

from __future__ import annotations

from collections.abc import Callable

from fireclaw.pool.store import CallRecord, StateUnwritable
from fireclaw.supervisor.state_db import WriteHealth
from fireclaw.supervisor.state_ledger import (
    EventRow,
    UsageBy,
    UsageRow,
    detail_decoder,
    detail_encoder,
)
from fireclaw.supervisor.state_pg_db import PgDatabase
from fireclaw.supervisor.state_pg_tasks import pg_text

_CALL_COLUMNS = (
    "at, agent, role, vm, task, model, prompt_tokens, completion_tokens, duration, outcome,"
    " host_counted, account"
)
_USAGE_COLUMN: dict[UsageBy, str] = {
    "agent": "agent",
    "role": "role",
    "task": "task",
    "model": "model",
    "vm": "vm",
}


class PgLedger:
    """The audit trail and the ledger of model calls."""

    _pg: PgDatabase
    _clock: Callable[[], float]
    host: str
    health: WriteHealth

    def event(self, kind: str, subject: str, **detail: object) -> None:
        """Append to the audit trail. Best effort: an event the database cannot
        take now is dropped and counted in ``health``, never raised."""
        text = pg_text(detail_encoder.encode(detail).decode())
        try:
            with self._pg.transaction(write=True) as cur:
                cur.execute(
                    "INSERT INTO events (at, host, kind, subject, detail)"
                    " VALUES (%s, %s, %s, %s, %s)",
                    (self._clock(), self.host, pg_text(kind), pg_text(subject), text),
                )
        except StateUnwritable:
            self.health.dropped_events += 1

    def events(self, *, after: int = 0, limit: int = 100) -> list[EventRow]:
        """Events with ``id > after``, oldest first (page with the last id seen)."""
        with self._pg.transaction() as cur:
            rows = cur.execute(
                "SELECT id, at, kind, subject, detail FROM events WHERE id > %s"
                " ORDER BY id LIMIT %s",
                (after, limit),
            ).fetchall()
        return [
            EventRow(id=i, at=at, kind=kind, subject=subject, detail=detail_decoder.decode(d))
            for i, at, kind, subject, d in rows
        ]

    def record_call(self, rec: CallRecord) -> None:
        """Append one model call to the ledger."""
        with self._pg.transaction(write=True) as cur:
            cur.execute(
                f"INSERT INTO model_calls (host, {_CALL_COLUMNS})"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (self.host, rec.at, rec.agent, rec.role, rec.vm, rec.task, rec.model,
                 rec.prompt_tokens, rec.completion_tokens, rec.duration, rec.outcome,
                 rec.host_counted, rec.account),
            )  # fmt: skip

    def spent(self, *, since: float, role: str | None = None) -> int:
        """Tokens (prompt + completion) recorded at or after ``since`` by every
        host; of ``role`` only when given."""
        query = "SELECT coalesce(sum(prompt_tokens + completion_tokens), 0) FROM model_calls"
        query += " WHERE at >= %s" + (" AND role = %s" if role is not None else "")
        args: tuple[object, ...] = (since,) if role is None else (since, role)
        with self._pg.transaction() as cur:
            row = cur.execute(query, args).fetchone()
        assert row is not None
        return int(row[0])

    def usage(
        self, *, by: UsageBy = "agent", since: float = 0.0, key: str | None = None
    ) -> list[UsageRow]:
        """The ledger since ``since``, summed per ``by`` (most tokens first); only
        the rows whose ``by`` column is ``key`` when given."""
        column = _USAGE_COLUMN[by]
        where = "at >= %s" + (f" AND CAST({column} AS TEXT) = %s" if key is not None else "")
        args: tuple[object, ...] = (since,) if key is None else (since, key)
        with self._pg.transaction() as cur:
            rows = cur.execute(
                f"SELECT {column}, count(*), sum(prompt_tokens), sum(completion_tokens)"
                f" FROM model_calls WHERE {where} GROUP BY {column}"
                " ORDER BY sum(prompt_tokens + completion_tokens) DESC",
                args,
            ).fetchall()
        return [
            UsageRow(
                key=None if k is None else str(k),
                calls=int(n),
                prompt_tokens=int(pt),
                completion_tokens=int(ct),
            )
            for k, n, pt, ct in rows
        ]

    def calls(self, *, after: int = 0, limit: int = 100) -> list[CallRecord]:
        """Ledger rows with ``id > after``, oldest first."""
        with self._pg.transaction() as cur:
            rows = cur.execute(
                f"SELECT {_CALL_COLUMNS} FROM model_calls WHERE id > %s ORDER BY id LIMIT %s",
                (after, limit),
            ).fetchall()
        return [
            CallRecord(
                at=r[0], agent=r[1], role=r[2], vm=r[3], task=r[4], model=r[5],
                prompt_tokens=r[6], completion_tokens=r[7], duration=r[8], outcome=r[9],
                host_counted=r[10], account=r[11],
            )  # fmt: skip
            for r in rows
        ]
