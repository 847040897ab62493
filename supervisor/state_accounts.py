"""Accounts in the state store: which account a task runs on, each account's
exhaustion, and what the ledger says each account spent.

An account is exhausted (its provider rate-limited it, or its credit ran out)
until a time; that is written here so that it survives a restart, and read
back by the role group that chooses accounts (``pool/accounts.py``). A task
given back because its account was exhausted (``defer_task``) goes back to
the queue without counting an attempt: the task did not fail, the account did.
"""

from __future__ import annotations

from typing import NoReturn

from fireclaw.pool.store import TaskRow
from fireclaw.supervisor.state_db import Database
from fireclaw.supervisor.state_tasks import TASK_COLUMNS, refusal, task_row


class Accounts(Database):
    """Accounts of the roles' providers: the task's, exhaustions, spending."""

    def assign_account(self, task_id: int, *, epoch: int, account: str) -> TaskRow:
        """Record that the task claimed at ``epoch`` runs on ``account``. Raises as
        ``finish_task``."""
        with self._errors(write=True), self._durable(), self._write():
            row = self._conn.execute(
                "UPDATE tasks SET account = ?, updated_at = ?"
                f" WHERE id = ? AND state = 'claimed' AND epoch = ? RETURNING {TASK_COLUMNS}",
                (account, self._clock(), task_id, epoch),
            ).fetchone()
            if row is None:
                self._refusal(task_id, epoch)
        return task_row(row)

    def defer_task(self, task_id: int, *, epoch: int, reason: str) -> TaskRow:
        """Give the task claimed at ``epoch`` back to the queue without counting an
        attempt (its account, not the task, ran out); ``reason`` is kept in
        ``result``. Raises as ``finish_task``."""
        with self._errors(write=True), self._durable(), self._write():
            row = self._conn.execute(
                "UPDATE tasks SET state = 'queued', owner = NULL, result = ?, updated_at = ?"
                f" WHERE id = ? AND state = 'claimed' AND epoch = ? RETURNING {TASK_COLUMNS}",
                (reason, self._clock(), task_id, epoch),
            ).fetchone()
            if row is None:
                self._refusal(task_id, epoch)
        return task_row(row)

    def _refusal(self, task_id: int, epoch: int) -> NoReturn:
        row = self._conn.execute(
            "SELECT state, epoch FROM tasks WHERE id = ?", (task_id,)
        ).fetchone()
        refusal(task_id, epoch, row)

    def exhaust_account(self, role: str, name: str, *, until: float, reason: str) -> None:
        """Mark ``role``'s account ``name`` exhausted until ``until`` (wall-clock
        seconds), replacing what was said of it before."""
        with self._errors(write=True), self._durable():
            self._conn.execute(
                "INSERT INTO accounts (role, name, exhausted_until, reason) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (role, name) DO UPDATE"
                " SET exhausted_until = excluded.exhausted_until, reason = excluded.reason",
                (role, name, until, reason),
            )

    def exhausted_accounts(self, role: str) -> dict[str, float]:
        """``{account: exhausted until}`` of ``role``, past times included."""
        with self._errors():
            rows = self._conn.execute(
                "SELECT name, exhausted_until FROM accounts WHERE role = ?", (role,)
            ).fetchall()
        return {name: float(until) for name, until in rows}

    def account_spent(self, role: str, *, since: float) -> dict[str, int]:
        """Tokens the ledger holds of each of ``role``'s accounts since ``since``."""
        with self._errors():
            rows = self._conn.execute(
                "SELECT account, sum(prompt_tokens + completion_tokens) FROM model_calls"
                " WHERE role = ? AND at >= ? AND account IS NOT NULL GROUP BY account",
                (role, since),
            ).fetchall()
        return {name: int(n) for name, n in rows}
