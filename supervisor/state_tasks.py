"""The task queue of the state store (see ``supervisor/state.py`` for the task
states and the store's contract). Every task move commits with
``synchronous=FULL``: once it has returned, it survives a crash of the machine.
Each claim bumps the task's epoch; a result or requeue carrying an older one
changes nothing (``TaskFenced``, see ``pool/store.py``).
"""

from __future__ import annotations

from typing import Any, Final, NoReturn

from fireclaw.pool.store import TASK_STATES, TaskConflict, TaskFenced, TaskNotFound, TaskRow
from fireclaw.pool.task_states import TaskState, next_state
from fireclaw.supervisor.state_db import Database

TASK_COLUMNS: Final = (
    "id, role, prompt, state, attempts, owner, exit_code, result, created_at, updated_at,"
    " epoch, host, session, answer, account"
)


def task_row(row: tuple[Any, ...]) -> TaskRow:
    """A task from a row of ``TASK_COLUMNS``, as both stores select them."""
    return TaskRow(
        id=row[0],
        role=row[1],
        prompt=row[2],
        state=row[3],
        attempts=row[4],
        owner=row[5],
        exit_code=row[6],
        result=row[7],
        created_at=row[8],
        updated_at=row[9],
        epoch=row[10],
        host=row[11],
        session=row[12],
        answer=row[13],
        account=row[14],
    )


class TaskQueue(Database):
    """Tasks: queued, claimed by a VM, done or failed."""

    def add_task(self, role: str, prompt: str) -> TaskRow:
        """Queue a new task for ``role``."""
        now = self._clock()
        with self._errors(write=True), self._durable():
            row = self._conn.execute(
                "INSERT INTO tasks (role, prompt, state, attempts, created_at, updated_at)"
                f" VALUES (?, ?, 'queued', 0, ?, ?) RETURNING {TASK_COLUMNS}",
                (role, prompt, now, now),
            ).fetchone()
        return task_row(row)

    def claim_task(self, role: str, owner: str) -> TaskRow | None:
        """Atomically move the oldest queued task of ``role`` to claimed by
        ``owner`` on this host, with the next epoch; ``None`` if there is none.
        Two claims never get the same task, also from different processes."""
        with self._errors(write=True), self._durable(), self._write():
            row = self._conn.execute(
                "UPDATE tasks SET state = 'claimed', owner = ?, host = ?, epoch = epoch + 1,"
                " updated_at = ?"
                " WHERE id = (SELECT id FROM tasks WHERE role = ? AND state = 'queued'"
                "             ORDER BY id LIMIT 1)"
                f" RETURNING {TASK_COLUMNS}",
                (owner, self.host, self._clock(), role),
            ).fetchone()
        return None if row is None else task_row(row)

    def finish_task(
        self, task_id: int, *, epoch: int, ok: bool, exit_code: int | None, result: str
    ) -> TaskRow:
        """The task claimed at ``epoch`` ran to the end: done if ``ok``, else failed.

        Raises ``TaskNotFound``; ``TaskFenced`` if it was claimed again since;
        ``TaskConflict`` if it is not claimed (already finished, or requeued
        after its VM was declared gone).
        """
        with self._errors(write=True), self._durable(), self._write():
            row = self._conn.execute(
                "UPDATE tasks SET state = ?, exit_code = ?, result = ?, updated_at = ?"
                f" WHERE id = ? AND state = 'claimed' AND epoch = ? RETURNING {TASK_COLUMNS}",
                ("done" if ok else "failed", exit_code, result, self._clock(), task_id, epoch),
            ).fetchone()
            if row is None:
                self._refused(task_id, epoch)
        return task_row(row)

    def requeue_task(self, task_id: int, *, epoch: int, reason: str, max_attempts: int) -> TaskRow:
        """Give the task claimed at ``epoch`` back: ``attempts`` grows by one; the
        task goes back to queued, or to failed once ``attempts`` reaches
        ``max_attempts``. ``reason`` is stored in ``result`` either way.

        Raises as ``finish_task``.
        """
        check_max_attempts(max_attempts)
        with self._errors(write=True), self._durable(), self._write():
            row = self._requeue(task_id, epoch, reason, max_attempts, self._clock())
            if row is None:
                self._refused(task_id, epoch)
        return task_row(row)

    def ask_task(self, task_id: int, *, epoch: int, question: str, session: str) -> TaskRow:
        """The task claimed at ``epoch`` stopped to ask ``question`` in the CLI
        session ``session``: it waits for input, its owner kept (the name an
        answer may give), its question its result meanwhile. Raises as
        ``finish_task``."""
        with self._errors(write=True), self._durable(), self._write():
            row = self._conn.execute(
                "UPDATE tasks SET state = ?, result = ?, session = ?, answer = NULL,"
                " exit_code = NULL, updated_at = ?"
                f" WHERE id = ? AND state = 'claimed' AND epoch = ? RETURNING {TASK_COLUMNS}",
                (
                    next_state("claimed", "ask"),
                    question,
                    session,
                    self._clock(),
                    task_id,
                    epoch,
                ),
            ).fetchone()
            if row is None:
                self._refused(task_id, epoch)
        return task_row(row)

    def answer_task(self, task_id: int, answer: str) -> TaskRow:
        """Queue a waiting task again with ``answer``, the prompt its next run
        resumes its session with. Raises ``TaskNotFound``; ``TaskConflict`` if it
        is not waiting for input (one line naming its state)."""
        with self._errors(write=True), self._durable(), self._write():
            row = self._conn.execute(
                "UPDATE tasks SET state = ?, answer = ?, owner = NULL, updated_at = ?"
                " WHERE id = ? AND state = 'waiting_for_input'"
                f" RETURNING {TASK_COLUMNS}",
                (next_state("waiting_for_input", "answer"), answer, self._clock(), task_id),
            ).fetchone()
            if row is None:
                found = self._conn.execute(
                    "SELECT state FROM tasks WHERE id = ?", (task_id,)
                ).fetchone()
                not_waiting(task_id, None if found is None else found[0])
        return task_row(row)

    def requeue_orphans(self, live_owners: set[str], *, max_attempts: int) -> list[TaskRow]:
        """Requeue (as ``requeue_task``) every task this host claimed whose owner
        is not in ``live_owners``: its VM is gone. Returns the tasks as they are now."""
        check_max_attempts(max_attempts)
        now = self._clock()
        out: list[TaskRow] = []
        with self._errors(write=True), self._durable(), self._write():
            claimed = self._conn.execute(
                "SELECT id, owner, epoch FROM tasks WHERE state = 'claimed'"
                " AND (host = ? OR host IS NULL) ORDER BY id",
                (self.host,),
            ).fetchall()
            for task_id, owner, epoch in claimed:
                if owner in live_owners:
                    continue
                row = self._requeue(task_id, epoch, f"owner {owner} is gone", max_attempts, now)
                if row is not None:
                    out.append(task_row(row))
        return out

    def requeue_silent(self, *, silent_after: float, max_attempts: int) -> list[TaskRow]:
        """Requeue the claimed tasks of other hosts gone silent. One host has no
        other hosts: nothing to do."""
        check_max_attempts(max_attempts)
        return []

    def wait_tasks(self, timeout: float) -> set[str]:
        """Roles other hosts queued tasks for, heard within ``timeout`` seconds.
        One host hears nothing: its own supervisor queues every task, and wakes
        its groups as it does; returns an empty set at once."""
        return set()

    def get_task(self, task_id: int) -> TaskRow | None:
        with self._errors():
            row = self._conn.execute(
                f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?", (task_id,)
            ).fetchone()
        return None if row is None else task_row(row)

    def list_tasks(self, *, state: str | None = None, limit: int = 100) -> list[TaskRow]:
        """The most recent ``limit`` tasks (of ``state``, if given), newest first."""
        with self._errors():
            if state is None:
                rows = self._conn.execute(
                    f"SELECT {TASK_COLUMNS} FROM tasks ORDER BY id DESC LIMIT ?", (limit,)
                ).fetchall()
            else:
                rows = self._conn.execute(
                    f"SELECT {TASK_COLUMNS} FROM tasks WHERE state = ? ORDER BY id DESC LIMIT ?",
                    (state, limit),
                ).fetchall()
        return [task_row(r) for r in rows]

    def count_tasks(self) -> dict[str, int]:
        """Number of tasks in each state; every state is present, 0 if empty."""
        counts: dict[str, int] = {state: 0 for state in TASK_STATES}
        with self._errors():
            for state, n in self._conn.execute("SELECT state, count(*) FROM tasks GROUP BY state"):
                counts[state] = n
        return counts

    def count_queued(self, role: str) -> int:
        """Number of tasks of ``role`` waiting for an agent."""
        with self._errors():
            row = self._conn.execute(
                "SELECT count(*) FROM tasks WHERE state = 'queued' AND role = ?", (role,)
            ).fetchone()
        return int(row[0])

    def _requeue(
        self, task_id: int, epoch: int, reason: str, max_attempts: int, now: float
    ) -> tuple[Any, ...] | None:
        # SET expressions all see the old row, so ``attempts + 1`` is the new count.
        row: tuple[Any, ...] | None = self._conn.execute(
            "UPDATE tasks SET attempts = attempts + 1,"
            " state = CASE WHEN attempts + 1 >= :max THEN 'failed' ELSE 'queued' END,"
            " owner = CASE WHEN attempts + 1 >= :max THEN owner ELSE NULL END,"
            " result = :reason, updated_at = :now"
            " WHERE id = :id AND state = 'claimed' AND epoch = :epoch"
            f" RETURNING {TASK_COLUMNS}",
            {"max": max_attempts, "reason": reason, "now": now, "id": task_id, "epoch": epoch},
        ).fetchone()
        return row

    def _refused(self, task_id: int, epoch: int) -> NoReturn:
        row = self._conn.execute(
            "SELECT state, epoch FROM tasks WHERE id = ?", (task_id,)
        ).fetchone()
        refusal(task_id, epoch, row)


def refusal(task_id: int, epoch: int, row: tuple[Any, ...] | None) -> NoReturn:
    """Why a write for ``task_id`` at ``epoch`` changed nothing, given the task's
    ``(state, epoch)`` now (``None``: no such task). Shared by both stores."""
    if row is None:
        raise TaskNotFound(f"no task {task_id}")
    state, now = row
    if now != epoch:
        raise TaskFenced(
            f"task {task_id} was claimed again (epoch {now}); this write is of epoch {epoch}"
        )
    raise TaskConflict(f"task {task_id} is {state}, not claimed")


def not_waiting(task_id: int, state: TaskState | None) -> NoReturn:
    """Why an answer to ``task_id`` changed nothing. Shared by both stores."""
    if state is None:
        raise TaskNotFound(f"no task {task_id}")
    raise TaskConflict(f"task {task_id} is {state}, not waiting for an answer")


def check_max_attempts(max_attempts: int) -> None:
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
