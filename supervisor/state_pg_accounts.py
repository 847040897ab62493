"""Accounts in a cluster's PostgreSQL store (same contract as
``state_accounts.py``): an account's exhaustion is shared by the hosts, so one
that a host saw rate-limited is not chosen by another."""

from __future__ import annotations

from collections.abc import Callable

from fireclaw.pool.store import TaskRow
from fireclaw.supervisor.state_pg_db import PgDatabase
from fireclaw.supervisor.state_pg_tasks import _state_of, pg_text
from fireclaw.supervisor.state_tasks import TASK_COLUMNS, refusal, task_row


class PgAccounts:
    """Accounts of the roles' providers: the task's, exhaustions, spending."""

    _pg: PgDatabase
    _clock: Callable[[], float]

    def assign_account(self, task_id: int, *, epoch: int, account: str) -> TaskRow:
        """Record that the task claimed at ``epoch`` runs on ``account``."""
        with self._pg.transaction(write=True) as cur:
            row = cur.execute(
                "UPDATE tasks SET account = %s, updated_at = %s"
                " WHERE id = %s AND state = 'claimed' AND epoch = %s"
                f" RETURNING {TASK_COLUMNS}",
                (pg_text(account), self._clock(), task_id, epoch),
            ).fetchone()
            if row is None:
                refusal(task_id, epoch, _state_of(cur, task_id))
        return task_row(row)

    def defer_task(self, task_id: int, *, epoch: int, reason: str) -> TaskRow:
        """Give the task claimed at ``epoch`` back without counting an attempt."""
        with self._pg.transaction(write=True) as cur:
            row = cur.execute(
                "UPDATE tasks SET state = 'queued', owner = NULL, result = %s, updated_at = %s"
                " WHERE id = %s AND state = 'claimed' AND epoch = %s"
                f" RETURNING {TASK_COLUMNS}",
                (pg_text(reason), self._clock(), task_id, epoch),
            ).fetchone()
            if row is None:
                refusal(task_id, epoch, _state_of(cur, task_id))
        return task_row(row)

    def exhaust_account(self, role: str, name: str, *, until: float, reason: str) -> None:
        """Mark ``role``'s account ``name`` exhausted until ``until``."""
        with self._pg.transaction(write=True) as cur:
            cur.execute(
                "INSERT INTO accounts (role, name, exhausted_until, reason)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (role, name) DO UPDATE"
                " SET exhausted_until = excluded.exhausted_until, reason = excluded.reason",
                (role, pg_text(name), until, pg_text(reason)),
            )

    def exhausted_accounts(self, role: str) -> dict[str, float]:
        """``{account: exhausted until}`` of ``role``, past times included."""
        with self._pg.transaction() as cur:
            rows = cur.execute(
                "SELECT name, exhausted_until FROM accounts WHERE role = %s", (role,)
            ).fetchall()
        return {name: float(until) for name, until in rows}

    def account_spent(self, role: str, *, since: float) -> dict[str, int]:
        """Tokens the ledger holds of each of ``role``'s accounts since ``since``,
        on every host."""
        with self._pg.transaction() as cur:
            rows = cur.execute(
                "SELECT account, sum(prompt_tokens + completion_tokens) FROM model_calls"
                " WHERE role = %s AND at >= %s AND account IS NOT NULL GROUP BY account",
                (role, since),
            ).fetchall()
        return {name: int(n) for name, n in rows}
