"""Durable supervisor state: tasks, the audit trail, restarts, the registry of
VMs and managed services, runtime scale overrides and the ledger of model
calls, in one SQLite database
(``state_dir/swarm.db``).

The database runs in WAL mode. Task changes commit with ``synchronous=FULL``:
once a call that accepts or moves a task has returned, it has been fsynced and
survives a crash of the supervisor or of the machine. Everything else (the VM
and service registry, the audit trail, restarts, scales) commits with
``synchronous=NORMAL``: it survives a crash of the supervisor, and what a power
loss could take from it (the last few registry rows) describes processes that
died with the machine anyway.
That keeps fsyncs, which block the event loop, off the path of every VM boot.

A disk that cannot take a write (full, read-only, failing) never ends the
supervisor. Task writes raise ``StateUnwritable``: the caller refuses the
task, or holds the move in memory and tries again (``pool/durable.py``).
The audit trail, restarts and the VM and service registry are best effort:
a write the disk refuses is dropped and counted in ``Store.health``, and
logged once per outage, not once per write. What a missing registry row does
not name, the leftovers sweep (``supervisor/leftovers.py``) finds by name.
Every public method is one transaction. Other processes (the CLI, a second
supervisor being refused by the pid lock) may open the same file; writers wait
up to ``BUSY_TIMEOUT`` for each other.

Threads: the connection is opened with ``check_same_thread=False`` so that it
may be handed to a worker thread, but a ``Store`` is NOT safe for concurrent
use. The supervisor uses its one ``Store`` from one thread at a time (the trio
loop, or one ``trio.to_thread.run_sync`` call at a time).

The store is one class made of its parts, a module each: ``state_db`` (the
connection, transactions, error translation, ``WriteHealth``), ``state_schema``
(the migrations), ``state_tasks`` (the task queue), ``state_registry`` (VMs,
services, named agents, scales), ``state_ledger`` (events, restarts, model
calls) and ``state_accounts`` (the accounts tasks ran on, their exhaustion).
The records and errors the pool writes and handles, and the protocol of what
it calls, are declared in ``pool/store.py``.

Task states (each claim bumps the task's epoch; a result or requeue carrying an
older epoch changes nothing and raises ``TaskFenced``)::

    queued --claim_task--> claimed --finish_task(ok)--> done
       ^                      |  \\--finish_task(not ok)--> failed
       +----requeue_task------+
       |    requeue_orphans   \\--(attempts reach max_attempts)--> failed
       |                      \\--ask_task--> waiting_for_input
       |    defer_task        (its account was refused: no attempt counted)
       +----answer_task------------------------------+

(the table itself: ``pool/task_states.py``)

Exceptions::

    StateError              any failure of the database, one line naming the file
     +-- StateUnwritable    the disk refused a write (full, read-only, failing)
     +-- AgentExists        a named agent of that name exists (on some host)
     +-- TaskNotFound       no task with that id
     +-- TaskConflict       the task is not in a state that allows the move
          +-- TaskFenced    the task was claimed again since: the write is stale

A cluster keeps what its hosts share in PostgreSQL instead: ``state_pg.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fireclaw.pool.store import (
    TASK_STATES,
    CallRecord,
    StateError,
    StateUnwritable,
    TaskConflict,
    TaskFenced,
    TaskNotFound,
    TaskRow,
    TaskState,
    VmRecord,
)
from fireclaw.supervisor.state_accounts import Accounts
from fireclaw.supervisor.state_db import BUSY_TIMEOUT, WriteHealth
from fireclaw.supervisor.state_ledger import EventRow, Ledger, UsageBy, UsageRow
from fireclaw.supervisor.state_registry import (
    AgentExists,
    AgentRecord,
    HostLoad,
    HostRow,
    Registry,
    RoleLoad,
    ServiceRecord,
)
from fireclaw.supervisor.state_schema import SCHEMA_VERSION
from fireclaw.supervisor.state_tasks import TaskQueue

if TYPE_CHECKING:
    from fireclaw.pool.store import StateStore

# The records and errors the pool writes and handles are declared by the pool
# (``pool/store.py``); they are part of this store's interface all the same.
__all__ = [
    "BUSY_TIMEOUT",
    "SCHEMA_VERSION",
    "TASK_STATES",
    "AgentExists",
    "AgentRecord",
    "CallRecord",
    "EventRow",
    "HostLoad",
    "HostRow",
    "RoleLoad",
    "ServiceRecord",
    "StateError",
    "StateUnwritable",
    "Store",
    "TaskConflict",
    "TaskFenced",
    "TaskNotFound",
    "TaskRow",
    "TaskState",
    "UsageBy",
    "UsageRow",
    "VmRecord",
    "WriteHealth",
]


class Store(TaskQueue, Registry, Ledger, Accounts):
    """The state database: its task queue, registry and ledger over one
    connection. Open with ``Store.open(path)``; close with ``close()`` (or use
    it as a context manager)."""


if TYPE_CHECKING:

    def _as_pool_sees_it(store: Store) -> StateStore:
        """mypy checks here that the store has every method the pool calls."""
        return store
