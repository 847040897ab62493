"""A task that waits for input: the transition table (pure), and the two stores
(SQLite, a cluster's PostgreSQL: the ``store`` fixture of ``test_state.py``
runs each test on both) making its moves, durable across a reopen; and a
database of schema version 7 migrated with its tasks and their ids."""

from __future__ import annotations

import pathlib
import sqlite3

import pytest
import test_state
from fireclaw.pool.task_states import (
    FINAL,
    TASK_STATES,
    TRANSITIONS,
    IllegalMove,
    next_state,
    sources,
)
from fireclaw.supervisor import state_schema
from fireclaw.supervisor.state import SCHEMA_VERSION, Store, TaskConflict, TaskFenced, TaskNotFound

# The stores' fixtures: each test taking ``store`` runs on SQLite and on PostgreSQL.
clock, db_path, stores, store = (
    test_state.clock,
    test_state.db_path,
    test_state.stores,
    test_state.store,
)

SESSION = "3f0c9a52-7d1e-4b8a-9c6f-2e5d4a1b0c9d"

# --- the table ------------------------------------------------------------------


def test_a_task_asks_only_while_claimed_and_an_answer_queues_it_again() -> None:
    assert next_state("claimed", "ask") == "waiting_for_input"
    assert next_state("waiting_for_input", "answer") == "queued"
    assert sources("ask") == ("claimed",)
    assert sources("answer") == ("waiting_for_input",)
    for state in TASK_STATES:
        if state != "waiting_for_input":
            with pytest.raises(IllegalMove, match=f"a {state} task cannot answer"):
                next_state(state, "answer")
    # Waiting holds no VM: it cannot be finished, failed or requeued, only answered.
    assert set(TRANSITIONS["waiting_for_input"]) == {"answer"}


def test_every_state_is_in_the_table_and_final_ones_lead_nowhere() -> None:
    assert set(TRANSITIONS) == set(TASK_STATES)
    for state in FINAL:
        assert TRANSITIONS[state] == {}
    for moves in TRANSITIONS.values():
        assert set(moves.values()) <= set(TASK_STATES)


# --- both stores ----------------------------------------------------------------


def test_ask_keeps_session_and_owner_then_an_answer_requeues_it(store: Store) -> None:
    task = store.add_task("coder", "clean the build")
    claimed = store.claim_task("coder", "coder-0")
    assert claimed is not None
    asked = store.ask_task(
        task.id, epoch=claimed.epoch, question="allow Bash rm -rf build", session=SESSION
    )
    assert (asked.state, asked.owner, asked.session, asked.answer) == (
        "waiting_for_input",
        "coder-0",
        SESSION,
        None,
    )
    assert asked.result == "allow Bash rm -rf build" and asked.exit_code is None
    assert store.count_tasks()["waiting_for_input"] == 1
    assert [t.id for t in store.list_tasks(state="waiting_for_input")] == [task.id]
    # Waiting is not queued: nothing to claim, and a lost VM's sweep leaves it be.
    assert store.count_queued("coder") == 0
    assert store.claim_task("coder", "coder-1") is None
    assert store.requeue_orphans(set(), max_attempts=3) == []

    answered = store.answer_task(task.id, "yes, go on")
    assert (answered.state, answered.answer, answered.session) == ("queued", "yes, go on", SESSION)
    assert answered.prompt == "clean the build" and answered.attempts == 0
    again = store.claim_task("coder", "coder-1")
    assert again is not None and again.id == task.id
    assert (again.session, again.answer, again.epoch) == (SESSION, "yes, go on", claimed.epoch + 1)
    done = store.finish_task(task.id, epoch=again.epoch, ok=True, exit_code=0, result="cleaned")
    assert (done.state, done.result, done.session) == ("done", "cleaned", SESSION)


def test_answering_a_task_not_waiting_or_unknown_is_one_line(store: Store) -> None:
    task = store.add_task("coder", "p")
    not_waiting = rf"^task {task.id} is queued, not waiting for an answer$"
    with pytest.raises(TaskConflict, match=not_waiting):
        store.answer_task(task.id, "x")
    with pytest.raises(TaskNotFound, match="^no task 999$"):
        store.answer_task(999, "x")
    claimed = store.claim_task("coder", "coder-0")
    assert claimed is not None
    store.ask_task(task.id, epoch=claimed.epoch, question="go on?", session=SESSION)
    store.answer_task(task.id, "yes")
    with pytest.raises(TaskConflict, match="is queued, not waiting"):
        store.answer_task(task.id, "twice")  # a second answer finds it queued


def test_a_stale_claim_cannot_ask(store: Store) -> None:
    task = store.add_task("coder", "p")
    first = store.claim_task("coder", "coder-0")
    assert first is not None
    store.requeue_task(task.id, epoch=first.epoch, reason="lost", max_attempts=3)
    second = store.claim_task("coder", "coder-1")
    assert second is not None
    with pytest.raises(TaskFenced):
        store.ask_task(task.id, epoch=first.epoch, question="q", session=SESSION)
    assert store.get_task(task.id).state == "claimed"  # type: ignore[union-attr]


def test_a_new_question_forgets_the_last_answer(store: Store) -> None:
    task = store.add_task("coder", "p")
    for n in range(2):
        claimed = store.claim_task("coder", f"coder-{n}")
        assert claimed is not None
        if n:
            assert claimed.answer == "answer 0"
        asked = store.ask_task(task.id, epoch=claimed.epoch, question=f"q{n}", session=SESSION)
        assert asked.answer is None and asked.result == f"q{n}"
        store.answer_task(task.id, f"answer {n}")


# --- SQLite's migration ---------------------------------------------------------


def test_a_version_7_database_keeps_its_tasks_and_ids(db_path: pathlib.Path) -> None:
    db_path.parent.mkdir()
    conn = sqlite3.connect(db_path)
    for migration in state_schema.MIGRATIONS[:7]:
        for statement in migration:
            conn.execute(statement)
    for n in range(3):
        conn.execute(
            "INSERT INTO tasks (role, prompt, state, attempts, created_at, updated_at, epoch)"
            " VALUES ('coder', ?, 'done', 1, 1.0, 2.0, 1)",
            (f"p{n}",),
        )
    conn.execute("DELETE FROM tasks WHERE id = 3")  # the sequence is ahead of the rows
    conn.execute("PRAGMA user_version = 7")
    conn.commit()
    conn.close()
    with Store.open(db_path) as migrated:
        assert [(t.id, t.prompt, t.state, t.epoch) for t in migrated.list_tasks()] == [
            (2, "p1", "done", 1),
            (1, "p0", "done", 1),
        ]
        assert migrated.add_task("coder", "new").id == 4  # no id is given twice
        claimed = migrated.claim_task("coder", "coder-0")
        assert claimed is not None
        migrated.ask_task(claimed.id, epoch=claimed.epoch, question="q", session=SESSION)
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"tasks_by_role_state", "tasks_by_state"} <= indexes
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("UPDATE tasks SET state = 'pondering' WHERE id = 4")
    conn.close()
