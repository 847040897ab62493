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
task, or holds the move in memory and tries again (``supervisor/durable.py``).
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

Task states::

    queued --claim_task--> claimed --finish_task(ok)--> done
       ^                      |  \\--finish_task(not ok)--> failed
       +----requeue_task------+
            requeue_orphans   \\--(attempts reach max_attempts)--> failed

Exceptions::

    StateError              any failure of the database, one line naming the file
     +-- StateUnwritable    the disk refused a write (full, read-only, failing)
     +-- TaskNotFound       no task with that id
     +-- TaskConflict       the task is not in a state that allows the move
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final, Literal, NoReturn

import msgspec
from fireclaw.pool.store import (
    TASK_STATES,
    CallRecord,
    StateError,
    StateUnwritable,
    TaskConflict,
    TaskNotFound,
    TaskRow,
    TaskState,
    VmRecord,
)

if TYPE_CHECKING:
    from fireclaw.pool.store import StateStore

# The records and errors the pool writes and handles are declared by the pool
# (``pool/store.py``); they are part of this store's interface all the same.
__all__ = [
    "BUSY_TIMEOUT",
    "SCHEMA_VERSION",
    "TASK_STATES",
    "AgentRecord",
    "CallRecord",
    "EventRow",
    "ServiceRecord",
    "StateError",
    "StateUnwritable",
    "Store",
    "TaskConflict",
    "TaskNotFound",
    "TaskRow",
    "TaskState",
    "UsageBy",
    "UsageRow",
    "VmRecord",
    "WriteHealth",
]

log = logging.getLogger("fireclaw.state")

SCHEMA_VERSION: Final = 5
#: Seconds a writer waits for another connection's write transaction.
BUSY_TIMEOUT: Final = 10.0


class EventRow(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: int
    at: float
    kind: str
    subject: str
    detail: dict[str, Any]


class AgentRecord(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A named agent: who it is, so it can be brought back."""

    name: str
    role: str
    model: str | None = None
    persona: str | None = None


class ServiceRecord(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A managed helper process (``ircd``: ngircd; ``models``: the local model server).

    Written ahead: with ``pid`` 0 (no identity yet) before the process is
    started, then with its identity once it runs; dropped once it has been
    stopped and reaped. A row left by a killed supervisor therefore names
    every copy that may still run: with ``pid`` 0, one that may have been
    started before its pid was recorded (found by its command line instead).
    """

    name: str
    #: The program (argv[0]), for people and for telling it apart by name.
    command: str
    pid: int = 0
    start_time: int = 0
    boot_id: str = ""
    #: Where it serves, ``host:port``, if it listens.
    address: str | None = None


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


# Each entry migrates the schema from version i to i + 1, in one transaction.
_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE tasks (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            role TEXT NOT NULL,
            prompt TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('queued', 'claimed', 'done', 'failed')),
            attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
            owner TEXT,
            exit_code INTEGER,
            result TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        "CREATE INDEX tasks_by_role_state ON tasks (role, state, id)",
        "CREATE INDEX tasks_by_state ON tasks (state, id)",
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at REAL NOT NULL,
            kind TEXT NOT NULL,
            subject TEXT NOT NULL,
            detail TEXT NOT NULL
        )""",
        """CREATE TABLE restarts (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at REAL NOT NULL,
            name TEXT NOT NULL,
            role TEXT NOT NULL,
            reason TEXT NOT NULL,
            exit_code INTEGER,
            delay REAL NOT NULL
        )""",
        "CREATE INDEX restarts_by_name ON restarts (name)",
        """CREATE TABLE vms (
            name TEXT PRIMARY KEY,
            role TEXT NOT NULL,
            pid INTEGER NOT NULL,
            start_time INTEGER NOT NULL,
            boot_id TEXT NOT NULL,
            spec_hash TEXT NOT NULL,
            netns TEXT,
            cgroup TEXT,
            socket TEXT,
            log TEXT
        )""",
        """CREATE TABLE scales (
            role TEXT PRIMARY KEY,
            n INTEGER NOT NULL CHECK (n >= 0)
        )""",
    ),
    # 2: named agents (!invoke), so they come back after a supervisor restart.
    (
        """CREATE TABLE agents (
            name TEXT PRIMARY KEY,
            role TEXT NOT NULL,
            model TEXT,
            persona TEXT,
            created_at REAL NOT NULL
        )""",
    ),
    # 3: managed services (ngircd, ...) in the crash-only registry, as VMs are.
    (
        """CREATE TABLE services (
            name TEXT PRIMARY KEY,
            command TEXT NOT NULL,
            pid INTEGER NOT NULL CHECK (pid >= 0),
            start_time INTEGER NOT NULL,
            boot_id TEXT NOT NULL,
            address TEXT
        )""",
    ),
    # 4: what a restarted supervisor needs to adopt a VM that still runs.
    (
        "ALTER TABLE vms ADD COLUMN vm_id TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE vms ADD COLUMN port INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE vms ADD COLUMN irc_port INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE vms ADD COLUMN veth TEXT",
        "ALTER TABLE vms ADD COLUMN address TEXT",
        "ALTER TABLE vms ADD COLUMN disk TEXT",
        "ALTER TABLE vms ADD COLUMN guest_id TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE vms ADD COLUMN guest_token TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE vms ADD COLUMN claimed INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE vms ADD COLUMN agent TEXT",
        "ALTER TABLE vms ADD COLUMN workspace INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE vms ADD COLUMN started_as TEXT NOT NULL DEFAULT ''",
    ),
    # 5: the ledger of model calls, metered by the gateways; budgets sum it.
    (
        """CREATE TABLE model_calls (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at REAL NOT NULL,
            agent TEXT,
            role TEXT NOT NULL,
            vm TEXT NOT NULL,
            task INTEGER,
            model TEXT NOT NULL,
            prompt_tokens INTEGER NOT NULL CHECK (prompt_tokens >= 0),
            completion_tokens INTEGER NOT NULL CHECK (completion_tokens >= 0),
            duration REAL NOT NULL,
            outcome TEXT NOT NULL
        )""",
        "CREATE INDEX model_calls_by_at ON model_calls (at)",
        "CREATE INDEX model_calls_by_role ON model_calls (role, at)",
    ),
)

_TASK_COLUMNS: Final = (
    "id, role, prompt, state, attempts, owner, exit_code, result, created_at, updated_at"
)
_VM_FIELDS: Final = VmRecord.__struct_fields__
_VM_COLUMNS: Final = ", ".join(_VM_FIELDS)
_SERVICE_COLUMNS: Final = "name, command, pid, start_time, boot_id, address"

# Audit details are best effort: a value JSON cannot carry (a Path, an
# exception) is recorded as its str() rather than failing the caller.
_detail_encoder = msgspec.json.Encoder(enc_hook=str)
_detail_decoder = msgspec.json.Decoder(dict[str, Any])


# SQLite's primary result codes (the low byte of an extended one) that mean the
# disk, not the statement, is at fault: the same write succeeds once it has room.
_UNWRITABLE: Final = {
    sqlite3.SQLITE_FULL: "full",
    sqlite3.SQLITE_READONLY: "read-only",
    sqlite3.SQLITE_IOERR: "failing",
    sqlite3.SQLITE_CANTOPEN: "failing",
}


class WriteHealth:
    """Whether the database takes writes, since when, and what was dropped meanwhile.

    Sans-I/O: the caller passes the time and gets told about transitions, so
    that it reports an outage once when it begins and once when it ends.
    ``on_change`` is called on each transition (the supervisor refreshes its
    status line there)."""

    def __init__(self) -> None:
        self.writable = True
        self.why = ""
        self.since: float | None = None  # unix time the current outage began
        self.dropped_events = 0  # audit events lost to the current or earlier outages
        self.dropped_writes = 0  # registry rows and restart records lost likewise
        self.pending = 0  # task writes held in memory, waiting to be tried again
        self.on_change: Callable[[], None] = lambda: None

    def failed(self, now: float, why: str) -> bool:
        """A write was refused at ``now``; True if that begins an outage."""
        if not self.writable:
            return False
        self.writable, self.why, self.since = False, why, now
        self.on_change()
        return True

    def succeeded(self) -> bool:
        """A write went through; True if that ends an outage."""
        if self.writable:
            return False
        self.writable, self.why, self.since = True, "", None
        self.on_change()
        return True

    def status(self) -> dict[str, object]:
        return {
            "writable": self.writable,
            "why": self.why or None,
            "since": self.since,
            "dropped_events": self.dropped_events,
            "dropped_writes": self.dropped_writes,
            "pending_writes": self.pending,
        }


def _task(row: tuple[Any, ...]) -> TaskRow:
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
    )


def _vm(row: tuple[Any, ...]) -> VmRecord:
    # SQLite has no booleans: the flags come back as 0 or 1.
    values = dict(zip(_VM_FIELDS, row, strict=True))
    return msgspec.convert(values, VmRecord, strict=False)


class Store:
    """The state database. Open with ``Store.open(path)``; close with ``close()``
    (or use it as a context manager)."""

    def __init__(
        self, conn: sqlite3.Connection, path: pathlib.Path, clock: Callable[[], float]
    ) -> None:
        self._conn = conn
        self.path = path
        self._clock = clock
        self.health = WriteHealth()

    @classmethod
    def open(cls, path: pathlib.Path, *, clock: Callable[[], float] = time.time) -> Store:
        """Open (creating if needed) the database at ``path``, migrating its schema.

        The parent directory is created with mode 0700 and a new file with 0600.
        ``clock`` gives the unix time stamped on rows. Raises ``StateError`` if
        the file cannot be opened, is not a database, or has a newer schema.
        """
        path = pathlib.Path(path)
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Create it 0600, but never open and close an existing file here: closing
            # any descriptor of it drops every POSIX lock this process holds on it,
            # those of a Store already open included (the supervisor opens a second
            # one at start to look for leftovers). Without its locks, another
            # process's connection believes itself the last, checkpoints and
            # deletes the WAL, and every later write of this process goes to the
            # unlinked file: invisible to others and lost on a crash.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        except OSError as exc:
            raise StateError(f"state database {path}: cannot open: {exc.strerror}") from exc
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            store = cls(conn, path, clock)
            store._migrate()
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            raise StateError(f"state database {path}: {exc}") from exc
        except StateError:
            if conn is not None:
                conn.close()
            raise
        return store

    def close(self) -> None:
        """Close the connection. Idempotent; any later call raises ``StateError``."""
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- tasks ---------------------------------------------------------------

    def add_task(self, role: str, prompt: str) -> TaskRow:
        """Queue a new task for ``role``."""
        now = self._clock()
        with self._errors(write=True), self._durable():
            row = self._conn.execute(
                "INSERT INTO tasks (role, prompt, state, attempts, created_at, updated_at)"
                f" VALUES (?, ?, 'queued', 0, ?, ?) RETURNING {_TASK_COLUMNS}",
                (role, prompt, now, now),
            ).fetchone()
        return _task(row)

    def claim_task(self, role: str, owner: str) -> TaskRow | None:
        """Atomically move the oldest queued task of ``role`` to claimed by
        ``owner``; ``None`` if there is none. Two claims never get the same task,
        also from different processes."""
        with self._errors(write=True), self._durable(), self._write():
            row = self._conn.execute(
                "UPDATE tasks SET state = 'claimed', owner = ?, updated_at = ?"
                " WHERE id = (SELECT id FROM tasks WHERE role = ? AND state = 'queued'"
                "             ORDER BY id LIMIT 1)"
                f" RETURNING {_TASK_COLUMNS}",
                (owner, self._clock(), role),
            ).fetchone()
        return None if row is None else _task(row)

    def finish_task(self, task_id: int, *, ok: bool, exit_code: int | None, result: str) -> TaskRow:
        """A claimed task ran to the end: done if ``ok``, else failed.

        Raises ``TaskNotFound``, or ``TaskConflict`` if it is not claimed
        (already finished, or requeued after its VM was declared gone).
        """
        with self._errors(write=True), self._durable(), self._write():
            row = self._conn.execute(
                "UPDATE tasks SET state = ?, exit_code = ?, result = ?, updated_at = ?"
                f" WHERE id = ? AND state = 'claimed' RETURNING {_TASK_COLUMNS}",
                ("done" if ok else "failed", exit_code, result, self._clock(), task_id),
            ).fetchone()
            if row is None:
                self._not_claimed(task_id)
        return _task(row)

    def requeue_task(self, task_id: int, *, reason: str, max_attempts: int) -> TaskRow:
        """Give a claimed task back: ``attempts`` grows by one; the task goes back
        to queued, or to failed once ``attempts`` reaches ``max_attempts``.
        ``reason`` is stored in ``result`` either way.

        Raises ``TaskNotFound``, or ``TaskConflict`` if it is not claimed.
        """
        _check_max_attempts(max_attempts)
        with self._errors(write=True), self._durable(), self._write():
            row = self._requeue(task_id, reason, max_attempts, self._clock())
            if row is None:
                self._not_claimed(task_id)
        return _task(row)

    def requeue_orphans(self, live_owners: set[str], *, max_attempts: int) -> list[TaskRow]:
        """Requeue (as ``requeue_task``) every claimed task whose owner is not in
        ``live_owners``: its VM is gone. Returns the tasks as they are now."""
        _check_max_attempts(max_attempts)
        now = self._clock()
        out: list[TaskRow] = []
        with self._errors(write=True), self._durable(), self._write():
            claimed = self._conn.execute(
                "SELECT id, owner FROM tasks WHERE state = 'claimed' ORDER BY id"
            ).fetchall()
            for task_id, owner in claimed:
                if owner in live_owners:
                    continue
                row = self._requeue(task_id, f"owner {owner} is gone", max_attempts, now)
                if row is not None:
                    out.append(_task(row))
        return out

    def get_task(self, task_id: int) -> TaskRow | None:
        with self._errors():
            row = self._conn.execute(
                f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = ?", (task_id,)
            ).fetchone()
        return None if row is None else _task(row)

    def list_tasks(self, *, state: str | None = None, limit: int = 100) -> list[TaskRow]:
        """The most recent ``limit`` tasks (of ``state``, if given), newest first."""
        with self._errors():
            if state is None:
                rows = self._conn.execute(
                    f"SELECT {_TASK_COLUMNS} FROM tasks ORDER BY id DESC LIMIT ?", (limit,)
                ).fetchall()
            else:
                rows = self._conn.execute(
                    f"SELECT {_TASK_COLUMNS} FROM tasks WHERE state = ? ORDER BY id DESC LIMIT ?",
                    (state, limit),
                ).fetchall()
        return [_task(r) for r in rows]

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

    # --- events --------------------------------------------------------------

    def event(self, kind: str, subject: str, **detail: object) -> None:
        """Append to the audit trail. Values JSON cannot hold are stored as str().
        Best effort: see ``_best_effort``."""
        with self._best_effort("event"):
            self._conn.execute(
                "INSERT INTO events (at, kind, subject, detail) VALUES (?, ?, ?, ?)",
                (self._clock(), kind, subject, _detail_encoder.encode(detail).decode()),
            )

    def events(self, *, after: int = 0, limit: int = 100) -> list[EventRow]:
        """Events with ``id > after``, oldest first (page with the last id seen)."""
        with self._errors():
            rows = self._conn.execute(
                "SELECT id, at, kind, subject, detail FROM events WHERE id > ? ORDER BY id LIMIT ?",
                (after, limit),
            ).fetchall()
        return [
            EventRow(id=i, at=at, kind=kind, subject=subject, detail=_detail_decoder.decode(d))
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

    # --- VM registry ---------------------------------------------------------

    def put_vm(self, rec: VmRecord) -> None:
        """Insert or replace the record named ``rec.name``. Best effort."""
        with self._best_effort("write"):
            self._conn.execute(
                f"INSERT OR REPLACE INTO vms ({_VM_COLUMNS})"
                f" VALUES ({', '.join('?' * len(_VM_FIELDS))})",
                msgspec.structs.astuple(rec),
            )

    def drop_vm(self, name: str) -> None:
        """Forget ``name``; no error if it is not there. Best effort."""
        with self._best_effort("write"):
            self._conn.execute("DELETE FROM vms WHERE name = ?", (name,))

    def vms(self) -> list[VmRecord]:
        with self._errors():
            rows = self._conn.execute(f"SELECT {_VM_COLUMNS} FROM vms ORDER BY name").fetchall()
        return [_vm(r) for r in rows]

    # --- service registry ----------------------------------------------------

    def put_service(self, rec: ServiceRecord) -> None:
        """Insert or replace the record named ``rec.name``. Best effort."""
        with self._best_effort("write"):
            self._conn.execute(
                f"INSERT OR REPLACE INTO services ({_SERVICE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                (rec.name, rec.command, rec.pid, rec.start_time, rec.boot_id, rec.address),
            )

    def drop_service(self, name: str) -> None:
        """Forget ``name``; no error if it is not there. Best effort."""
        with self._best_effort("write"):
            self._conn.execute("DELETE FROM services WHERE name = ?", (name,))

    def services(self) -> list[ServiceRecord]:
        with self._errors():
            rows = self._conn.execute(
                f"SELECT {_SERVICE_COLUMNS} FROM services ORDER BY name"
            ).fetchall()
        return [
            ServiceRecord(name=n, command=c, pid=p, start_time=t, boot_id=b, address=a)
            for n, c, p, t, b, a in rows
        ]

    # --- scale overrides -----------------------------------------------------

    def set_scale(self, role: str, n: int) -> None:
        if n < 0:
            raise ValueError(f"scale must be >= 0, got {n}")
        with self._errors():
            self._conn.execute(
                "INSERT INTO scales (role, n) VALUES (?, ?)"
                " ON CONFLICT (role) DO UPDATE SET n = excluded.n",
                (role, n),
            )

    def clear_scale(self, role: str) -> None:
        with self._errors():
            self._conn.execute("DELETE FROM scales WHERE role = ?", (role,))

    def scales(self) -> dict[str, int]:
        with self._errors():
            rows = self._conn.execute("SELECT role, n FROM scales ORDER BY role").fetchall()
        return {role: n for role, n in rows}

    # --- named agents ----------------------------------------------------------

    def put_agent(self, rec: AgentRecord) -> None:
        """Remember a named agent (or its new model/persona)."""
        with self._errors():
            self._conn.execute(
                "INSERT INTO agents (name, role, model, persona, created_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET role = excluded.role, model = excluded.model,"
                " persona = excluded.persona",
                (rec.name, rec.role, rec.model, rec.persona, self._clock()),
            )

    def drop_agent(self, name: str) -> None:
        with self._errors():
            self._conn.execute("DELETE FROM agents WHERE name = ?", (name,))

    def agents(self) -> list[AgentRecord]:
        """Named agents, oldest first."""
        with self._errors():
            rows = self._conn.execute(
                "SELECT name, role, model, persona FROM agents ORDER BY created_at, name"
            ).fetchall()
        return [AgentRecord(name=n, role=r, model=m, persona=p) for n, r, m, p in rows]

    # --- the ledger of model calls ----------------------------------------------

    def record_call(self, rec: CallRecord) -> None:
        """Append one model call to the ledger."""
        with self._errors():
            self._conn.execute(
                "INSERT INTO model_calls (at, agent, role, vm, task, model, prompt_tokens,"
                " completion_tokens, duration, outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                " duration, outcome FROM model_calls WHERE id > ? ORDER BY id LIMIT ?",
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
            )
            for r in rows
        ]

    # --- internals -----------------------------------------------------------

    def _migrate(self) -> None:
        while True:
            with self._write():
                (version,) = self._conn.execute("PRAGMA user_version").fetchone()
                if version > len(_MIGRATIONS):
                    raise StateError(
                        f"state database {self.path}: schema version {version} is newer"
                        f" than this fireclaw-swarm knows ({SCHEMA_VERSION})"
                    )
                if version == len(_MIGRATIONS):
                    return
                for statement in _MIGRATIONS[version]:
                    self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version = {version + 1}")

    def _requeue(
        self, task_id: int, reason: str, max_attempts: int, now: float
    ) -> tuple[Any, ...] | None:
        # SET expressions all see the old row, so ``attempts + 1`` is the new count.
        row: tuple[Any, ...] | None = self._conn.execute(
            "UPDATE tasks SET attempts = attempts + 1,"
            " state = CASE WHEN attempts + 1 >= :max THEN 'failed' ELSE 'queued' END,"
            " owner = CASE WHEN attempts + 1 >= :max THEN owner ELSE NULL END,"
            " result = :reason, updated_at = :now"
            f" WHERE id = :id AND state = 'claimed' RETURNING {_TASK_COLUMNS}",
            {"max": max_attempts, "reason": reason, "now": now, "id": task_id},
        ).fetchone()
        return row

    def _not_claimed(self, task_id: int) -> NoReturn:
        row = self._conn.execute("SELECT state FROM tasks WHERE id = ?", (task_id,)).fetchone()
        if row is None:
            raise TaskNotFound(f"no task {task_id}")
        raise TaskConflict(f"task {task_id} is {row[0]}, not claimed")

    @contextlib.contextmanager
    def _durable(self) -> Iterator[None]:
        """Commits inside are fsynced before they return (see the module docstring)."""
        self._conn.execute("PRAGMA synchronous = FULL")
        try:
            yield
        finally:
            self._conn.execute("PRAGMA synchronous = NORMAL")

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        # IMMEDIATE takes the write lock up front: a read-then-write in a deferred
        # transaction could find its snapshot stale (SQLITE_BUSY_SNAPSHOT), which
        # the busy timeout does not retry.
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._conn.execute("COMMIT")
        except BaseException:
            # A failed COMMIT can leave the transaction open; never leave it so.
            if self._conn.in_transaction:
                self._conn.rollback()
            raise

    @contextlib.contextmanager
    def _errors(self, *, write: bool = False) -> Iterator[None]:
        """Translate SQLite's errors; a refused write is ``StateUnwritable``.

        With ``write``, a success that changed a row ends an outage in ``health``
        (a statement that changed nothing wrote nothing, proving nothing)."""
        try:
            changes = self._conn.total_changes
            yield
        except sqlite3.Error as exc:
            why = _UNWRITABLE.get(getattr(exc, "sqlite_errorcode", -1) & 0xFF)
            message = f"state database {self.path}: {exc}"
            if why is None:
                raise StateError(message) from exc
            if self.health.failed(self._clock(), why):
                log.warning(
                    "%s: until it takes writes again, tasks are refused, task moves wait,"
                    " audit events and registry rows are dropped",
                    message,
                )
            raise StateUnwritable(message, why, self.path) from exc
        if write and self._conn.total_changes > changes and self.health.succeeded():
            log.warning(
                "state database %s takes writes again (dropped meanwhile: %d events,"
                " %d other writes)",
                self.path,
                self.health.dropped_events,
                self.health.dropped_writes,
            )

    @contextlib.contextmanager
    def _best_effort(self, kind: Literal["event", "write"]) -> Iterator[None]:
        """A write the supervisor can run without: one the disk refuses is dropped
        and counted in ``health`` (logged once per outage by ``_errors``), never
        raised. Any other failure is raised as usual."""
        try:
            with self._errors(write=True):
                yield
        except StateUnwritable:
            if kind == "event":
                self.health.dropped_events += 1
            else:
                self.health.dropped_writes += 1


def _check_max_attempts(max_attempts: int) -> None:
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")


if TYPE_CHECKING:

    def _as_pool_sees_it(store: Store) -> StateStore:
        """mypy checks here that the store has every method the pool calls."""
        return store
