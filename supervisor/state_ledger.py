"""What happened: the audit trail of events, restarts, and the ledger of model
calls that budgets and usage reports sum.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from fireclaw.pool.store import CallRecord
from fireclaw.supervisor.state_db import Database


class EventRow(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: int
    at: float
    kind: str
    subject: str
    detail: dict[str, Any]


UsageBy = Literal["agent", "role", "task", "model", "vm"]


class UsageRow(msgspec.Struct, frozen=True, kw_only=True):
    """The ledger summed over one key (an agent, a role, ...); ``key`` None: none."""

    key: str | None
    calls: int
    prompt_tokens: int
    completion_tokens: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


# Audit details are best effort: a value JSON cannot carry (a Path, an
# exception) is recorded as its str() rather than failing the caller.
detail_encoder = msgspec.json.Encoder(enc_hook=str)
detail_decoder = msgspec.json.Decoder(dict[str, Any])


class Ledger(Database):
    """The audit trail, restarts and the ledger of model calls."""

    def event(self, kind: str, subject: str, **detail: object) -> None:
        """Append to the audit trail. Values JSON cannot hold are stored as str().
        Best effort: see ``_best_effort``."""
        with self._best_effort("event"):
            self._conn.execute(
                "INSERT INTO events (at, kind, subject, detail) VALUES (?, ?, ?, ?)",
                (self._clock(), kind, subject, detail_encoder.encode(detail).decode()),
            )

    def events(self, *, after: int = 0, limit: int = 100) -> list[EventRow]:
        """Events with ``id > after``, oldest first (page with the last id seen)."""
        with self._errors():
            rows = self._conn.execute(
                "SELECT id, at, kind, subject, detail FROM events WHERE id > ? ORDER BY id LIMIT ?",
                (after, limit),
            ).fetchall()
        return [
            EventRow(id=i, at=at, kind=kind, subject=subject, detail=detail_decoder.decode(d))
            for i, at, kind, subject, d in rows
        ]

    # --- restarts ------------------------------------------------------------

    def record_restart(
        self, name: str, role: str, *, reason: str, exit_code: int | None, delay: float
    ) -> None:
        with self._best_effort("write"):
            self._conn.execute(
                "INSERT INTO restarts (at, name, role, reason, exit_code, delay)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (self._clock(), name, role, reason, exit_code, delay),
            )

    def restart_count(self, name: str) -> int:
        """All restarts ever recorded for ``name``."""
        with self._errors():
            (n,) = self._conn.execute(
                "SELECT count(*) FROM restarts WHERE name = ?", (name,)
            ).fetchone()
        return int(n)

    # --- the ledger of model calls ----------------------------------------------

    def record_call(self, rec: CallRecord) -> None:
        """Append one model call to the ledger."""
        with self._errors():
            self._conn.execute(
                "INSERT INTO model_calls (at, agent, role, vm, task, model, prompt_tokens,"
                " completion_tokens, duration, outcome, host_counted, account)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rec.at,
                    rec.agent,
                    rec.role,
                    rec.vm,
                    rec.task,
                    rec.model,
                    rec.prompt_tokens,
                    rec.completion_tokens,
                    rec.duration,
                    rec.outcome,
                    int(rec.host_counted),
                    rec.account,
                ),
            )

    def spent(self, *, since: float, role: str | None = None) -> int:
        """Tokens (prompt + completion) recorded at or after ``since``; of ``role`` only
        when given."""
        query = "SELECT coalesce(sum(prompt_tokens + completion_tokens), 0) FROM model_calls"
        query += " WHERE at >= ?" + (" AND role = ?" if role is not None else "")
        args: tuple[object, ...] = (since,) if role is None else (since, role)
        with self._errors():
            (n,) = self._conn.execute(query, args).fetchone()
        return int(n)

    def usage(
        self, *, by: UsageBy = "agent", since: float = 0.0, key: str | None = None
    ) -> list[UsageRow]:
        """The ledger since ``since``, summed per ``by`` (most tokens first); only the
        rows whose ``by`` column is ``key`` when given."""
        column = {"agent": "agent", "role": "role", "task": "task", "model": "model", "vm": "vm"}[
            by
        ]
        where = "at >= ?" + (f" AND CAST({column} AS TEXT) = ?" if key is not None else "")
        args: tuple[object, ...] = (since,) if key is None else (since, key)
        with self._errors():
            rows = self._conn.execute(
                f"SELECT {column}, count(*), sum(prompt_tokens), sum(completion_tokens)"
                f" FROM model_calls WHERE {where} GROUP BY {column}"
                " ORDER BY sum(prompt_tokens + completion_tokens) DESC",
                args,
            ).fetchall()
        return [
            UsageRow(
                key=None if k is None else str(k), calls=n, prompt_tokens=pt, completion_tokens=ct
            )
            for k, n, pt, ct in rows
        ]

    def calls(self, *, after: int = 0, limit: int = 100) -> list[CallRecord]:
        """Ledger rows with ``id > after``, oldest first."""
        with self._errors():
            rows = self._conn.execute(
                "SELECT at, agent, role, vm, task, model, prompt_tokens, completion_tokens,"
                " duration, outcome, host_counted, account FROM model_calls WHERE id > ?"
                " ORDER BY id LIMIT ?",
                (after, limit),
            ).fetchall()
        return [
            CallRecord(
                at=r[0],
                agent=r[1],
                role=r[2],
                vm=r[3],
                task=r[4],
                model=r[5],
                prompt_tokens=r[6],
                completion_tokens=r[7],
                duration=r[8],
                outcome=r[9],
                host_counted=bool(r[10]),
                account=r[11],
            )
            for r in rows
        ]
