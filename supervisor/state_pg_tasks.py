"""The task queue of a cluster, in PostgreSQL (same contract as
``state_tasks.py``; see ``supervisor/state.py`` for the task states).

A claim takes the oldest queued task of a role that no other transaction holds
(``FOR UPDATE SKIP LOCKED``): hosts claiming at once each get a different
task and never wait for each other. It stamps the claiming host and bumps the
epoch; every later write for the task names that epoch, and changes no row if
the task was claimed again since (``TaskFenced``): a host presumed dead, whose
tasks another host took over, cannot finish them a second time.

Commits wait for the server's WAL flush (PostgreSQL's default
``synchronous_commit``): once a task move has returned, it is durable.
PostgreSQL text holds no NUL character, so one in a prompt or a result is
stored as U+FFFD rather than refusing the task.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import psycopg
from fireclaw.pool.store import TASK_STATES, TaskRow
from fireclaw.pool.task_states import next_state
from fireclaw.supervisor.state_pg_db import PgDatabase
from fireclaw.supervisor.state_tasks import (
    TASK_COLUMNS,
    check_max_attempts,
    not_waiting,
    refusal,
    task_row,
)

Cursor = psycopg.Cursor[tuple[Any, ...]]

#: Held while one host requeues the tasks of silent ones (``requeue_silent``).
SILENT_LOCK: Final = 0x66697265636C6177 + 1
#: Wakes the hosts waiting for tasks (they poll as well: a notification is
#: lost while a host reconnects).
CHANNEL: Final = "fireclaw_tasks"


def pg_text(value: str) -> str:
    """``value`` as PostgreSQL text can hold it: NUL becomes U+FFFD."""
    return value.replace("\x00", "\ufffd")


class PgTasks:
    """Tasks: queued, claimed by a VM of some host, done or failed."""

    _pg: PgDatabase
    _clock: Callable[[], float]
    host: str

    def add_task(self, role: str, prompt: str) -> TaskRow:
        """Queue a new task for ``role`` and wake the hosts waiting for one."""
        now = self._clock()
        with self._pg.transaction(write=True) as cur:
            row = cur.execute(
                "INSERT INTO tasks (role, prompt, state, attempts, created_at, updated_at)"
                f" VALUES (%s, %s, 'queued', 0, %s, %s) RETURNING {TASK_COLUMNS}",
                (role, pg_text(prompt), now, now),
            ).fetchone()
            cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, role))
        assert row is not None
        return task_row(row)

    def claim_task(self, role: str, owner: str) -> TaskRow | None:
        """Atomically move the oldest queued task of ``role`` that nobody else is
        claiming to claimed by ``owner`` on this host, with the next epoch;
        ``None`` if there is none. No two claims, from any host, get the same task."""
        with self._pg.transaction(write=True) as cur:
            row = cur.execute(
                "UPDATE tasks SET state = 'claimed', owner = %s, host = %s,"
                " epoch = epoch + 1, updated_at = %s"
                " WHERE id = (SELECT id FROM tasks WHERE role = %s AND state = 'queued'"
                "             ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 1)"
                f" RETURNING {TASK_COLUMNS}",
                (owner, self.host, self._clock(), role),
            ).fetchone()
        return None if row is None else task_row(row)

    def finish_task(
        self, task_id: int, *, epoch: int, ok: bool, exit_code: int | None, result: str
    ) -> TaskRow:
        """The task claimed at ``epoch`` ran to the end: done if ``ok``, else failed.
        Raises ``TaskNotFound``, ``TaskFenced`` (claimed again since) or
        ``TaskConflict`` (not claimed)."""
        state = "done" if ok else "failed"
        with self._pg.transaction(write=True) as cur:
            row = cur.execute(
                "UPDATE tasks SET state = %s, exit_code = %s, result = %s, updated_at = %s"
                " WHERE id = %s AND state = 'claimed' AND epoch = %s"
                f" RETURNING {TASK_COLUMNS}",
                (state, exit_code, pg_text(result), self._clock(), task_id, epoch),
            ).fetchone()
            if row is None:
                refusal(task_id, epoch, _state_of(cur, task_id))
        return task_row(row)

    def requeue_task(self, task_id: int, *, epoch: int, reason: str, max_attempts: int) -> TaskRow:
        """Give the task claimed at ``epoch`` back (failed once ``attempts``
        reaches ``max_attempts``). Raises as ``finish_task``."""
        check_max_attempts(max_attempts)
        with self._pg.transaction(write=True) as cur:
            row = _requeue(cur, task_id, epoch, reason, max_attempts, self._clock())
            if row is None:
                refusal(task_id, epoch, _state_of(cur, task_id))
            cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, row[1]))
        return task_row(row)

    def ask_task(self, task_id: int, *, epoch: int, question: str, session: str) -> TaskRow:
        """As ``state_tasks.TaskQueue.ask_task``."""
        with self._pg.transaction(write=True) as cur:
            row = cur.execute(
                "UPDATE tasks SET state = %s, result = %s, session = %s, answer = NULL,"
                " exit_code = NULL, updated_at = %s"
                " WHERE id = %s AND state = 'claimed' AND epoch = %s"
                f" RETURNING {TASK_COLUMNS}",
                (
                    next_state("claimed", "ask"),
                    pg_text(question),
                    pg_text(session),
                    self._clock(),
                    task_id,
                    epoch,
                ),
            ).fetchone()
            if row is None:
                refusal(task_id, epoch, _state_of(cur, task_id))
        return task_row(row)

    def answer_task(self, task_id: int, answer: str) -> TaskRow:
        """As ``state_tasks.TaskQueue.answer_task``; wakes the hosts waiting for tasks."""
        with self._pg.transaction(write=True) as cur:
            row = cur.execute(
                "UPDATE tasks SET state = %s, answer = %s, owner = NULL, updated_at = %s"
                " WHERE id = %s AND state = 'waiting_for_input'"
                f" RETURNING {TASK_COLUMNS}",
                (
                    next_state("waiting_for_input", "answer"),
                    pg_text(answer),
                    self._clock(),
                    task_id,
                ),
            ).fetchone()
            if row is None:
                found = cur.execute("SELECT state FROM tasks WHERE id = %s", (task_id,)).fetchone()
                not_waiting(task_id, None if found is None else found[0])
            cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, row[1]))
        return task_row(row)

    def requeue_orphans(self, live_owners: set[str], *, max_attempts: int) -> list[TaskRow]:
        """Requeue every task this host claimed whose owner is not in
        ``live_owners`` (its VM is gone). Other hosts' tasks are theirs."""
        check_max_attempts(max_attempts)
        now = self._clock()
        out: list[TaskRow] = []
        with self._pg.transaction(write=True) as cur:
            claimed = cur.execute(
                "SELECT id, owner, epoch FROM tasks WHERE state = 'claimed' AND host = %s"
                " ORDER BY id FOR UPDATE",
                (self.host,),
            ).fetchall()
            for task_id, owner, epoch in claimed:
                if owner in live_owners:
                    continue
                row = _requeue(cur, task_id, epoch, f"owner {owner} is gone", max_attempts, now)
                if row is not None:
                    out.append(task_row(row))
            for role in sorted({t.role for t in out if t.state == "queued"}):
                cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, role))
        return out

    def wait_tasks(self, timeout: float) -> set[str]:
        """Roles that any host queued (or requeued) tasks for, heard within
        ``timeout`` seconds (empty: none heard; poll). Blocking: call it from a
        worker thread, one at a time. Raises ``StateUnwritable`` while the
        database cannot be reached."""
        return self._pg.listen(CHANNEL, timeout)

    def requeue_silent(self, *, silent_after: float, max_attempts: int) -> list[TaskRow]:
        """Requeue (as ``requeue_task``) the claimed tasks of every other host
        whose last heartbeat is more than ``silent_after`` seconds old by the
        database's clock: that host is presumed dead, and the epoch fences
        whatever it might still write. One host at a time does it (an advisory
        lock; a host that finds it taken returns nothing). A host that never
        heartbeat is not judged. Returns the tasks as they are now."""
        check_max_attempts(max_attempts)
        now = self._clock()
        out: list[TaskRow] = []
        with self._pg.transaction(write=True) as cur:
            row = cur.execute("SELECT pg_try_advisory_xact_lock(%s)", (SILENT_LOCK,)).fetchone()
            if row is None or not row[0]:
                return []
            claimed = cur.execute(
                "SELECT t.id, t.host, t.epoch FROM tasks t JOIN hosts h ON h.name = t.host"
                " WHERE t.state = 'claimed' AND t.host <> %s"
                " AND h.heartbeat_at < now() - make_interval(secs => %s)"
                " ORDER BY t.id FOR UPDATE OF t",
                (self.host, silent_after),
            ).fetchall()
            for task_id, host, epoch in claimed:
                reason = f"host {host} is silent"
                moved = _requeue(cur, task_id, epoch, reason, max_attempts, now)
                if moved is not None:
                    out.append(task_row(moved))
            for role in sorted({t.role for t in out if t.state == "queued"}):
                cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, role))
        return out

    def get_task(self, task_id: int) -> TaskRow | None:
        with self._pg.transaction() as cur:
            row = cur.execute(
                f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = %s", (task_id,)
            ).fetchone()
        return None if row is None else task_row(row)

    def list_tasks(self, *, state: str | None = None, limit: int = 100) -> list[TaskRow]:
        """The most recent ``limit`` tasks (of ``state``, if given), newest first."""
        with self._pg.transaction() as cur:
            if state is None:
                rows = cur.execute(
                    f"SELECT {TASK_COLUMNS} FROM tasks ORDER BY id DESC LIMIT %s", (limit,)
                ).fetchall()
            else:
                rows = cur.execute(
                    f"SELECT {TASK_COLUMNS} FROM tasks WHERE state = %s ORDER BY id DESC LIMIT %s",
                    (state, limit),
                ).fetchall()
        return [task_row(r) for r in rows]

    def count_tasks(self) -> dict[str, int]:
        """Number of tasks in each state; every state is present, 0 if empty."""
        counts: dict[str, int] = {state: 0 for state in TASK_STATES}
        with self._pg.transaction() as cur:
            for state, n in cur.execute("SELECT state, count(*) FROM tasks GROUP BY state"):
                counts[state] = n
        return counts

    def count_queued(self, role: str) -> int:
        """Number of tasks of ``role`` waiting for an agent (on any host)."""
        with self._pg.transaction() as cur:
            row = cur.execute(
                "SELECT count(*) FROM tasks WHERE state = 'queued' AND role = %s", (role,)
            ).fetchone()
        assert row is not None
        return int(row[0])


def _requeue(
    cur: Cursor, task_id: int, epoch: int, reason: str, max_attempts: int, now: float
) -> tuple[Any, ...] | None:
    # SET expressions all see the old row, so ``attempts + 1`` is the new count.
    row: tuple[Any, ...] | None = cur.execute(
        "UPDATE tasks SET attempts = attempts + 1,"
        " state = CASE WHEN attempts + 1 >= %(max)s THEN 'failed' ELSE 'queued' END,"
        " owner = CASE WHEN attempts + 1 >= %(max)s THEN owner ELSE NULL END,"
        " result = %(reason)s, updated_at = %(now)s"
        " WHERE id = %(id)s AND state = 'claimed' AND epoch = %(epoch)s"
        f" RETURNING {TASK_COLUMNS}",
        {
            "max": max_attempts,
            "reason": pg_text(reason),
            "now": now,
            "id": task_id,
            "epoch": epoch,
        },
    ).fetchone()
    return row


def _state_of(cur: Cursor, task_id: int) -> tuple[Any, ...] | None:
    row: tuple[Any, ...] | None = cur.execute(
        "SELECT state, epoch FROM tasks WHERE id = %s", (task_id,)
    ).fetchone()
    return row
