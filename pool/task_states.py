"""A task's life, as a transition table (no I/O).

::

    queued --claim--> claimed --finish--> done | failed
       ^                 |  \\--ask--> waiting_for_input
       |                 |                  |
       +----requeue------+                  |
       +----------------answer--------------+

A task whose coding-agent CLI stopped to ask something (a permission it was
denied, its turn limit) waits for an operator's answer, holding no VM: it
keeps the CLI's session id and its question. An answer queues it again; the
next claim runs the same session with the answer as the prompt. A requeue at
the last attempt fails the task instead of queueing it.

Both stores (SQLite, a cluster's PostgreSQL) make these moves, each in one
statement guarded by the state the table says it starts from.
"""

from __future__ import annotations

from typing import Final, Literal

TaskState = Literal["queued", "claimed", "waiting_for_input", "done", "failed"]
TASK_STATES: Final[tuple[TaskState, ...]] = (
    "queued",
    "claimed",
    "waiting_for_input",
    "done",
    "failed",
)
#: States a task leaves no more.
FINAL: Final[frozenset[TaskState]] = frozenset({"done", "failed"})

TaskMove = Literal["claim", "finish", "fail", "ask", "requeue", "give_up", "answer"]

TRANSITIONS: Final[dict[TaskState, dict[TaskMove, TaskState]]] = {
    "queued": {"claim": "claimed"},
    "claimed": {
        "finish": "done",
        "fail": "failed",
        "ask": "waiting_for_input",
        "requeue": "queued",
        "give_up": "failed",
    },
    "waiting_for_input": {"answer": "queued"},
    "done": {},
    "failed": {},
}


class IllegalMove(Exception):
    """A move the task's state does not allow (one line: the task, its state, the move)."""


def next_state(state: TaskState, move: TaskMove) -> TaskState:
    """Where ``move`` takes a task in ``state``; IllegalMove if it cannot."""
    try:
        return TRANSITIONS[state][move]
    except KeyError:
        raise IllegalMove(f"a {state} task cannot {move.replace('_', ' ')}") from None


def sources(move: TaskMove) -> tuple[TaskState, ...]:
    """The states ``move`` may start from, in table order."""
    return tuple(state for state, moves in TRANSITIONS.items() if move in moves)
