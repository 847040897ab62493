"""The connection under the state store: opening and migrating the database,
transactions, and translating SQLite's errors (see ``supervisor/state.py`` for
the store's contract: durability, best-effort writes, threads).

Sans-I/O ``WriteHealth`` tracks whether the disk takes writes, so that an
outage is reported once when it begins and once when it ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Final, Literal, Self

from fireclaw.pool.store import StateError, StateUnwritable
from fireclaw.supervisor.state_schema import MIGRATIONS, SCHEMA_VERSION

log = logging.getLogger("fireclaw.state")

#: Seconds a writer waits for another connection's write transaction.
BUSY_TIMEOUT: Final = 10.0

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


class Database:
    """One connection to the state database, and the transaction and error
    helpers every part of the store writes through. Open with ``open(path)``;
    close with ``close()`` (or use it as a context manager)."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: pathlib.Path,
        clock: Callable[[], float],
        host: str | None = None,
    ) -> None:
        self._conn = conn
        self.path = path
        self._clock = clock
        #: The host this store claims tasks for (one host here: this machine's name).
        self.host = host or socket.gethostname()
        self.health = WriteHealth()

    @classmethod
    def open(
        cls,
        path: pathlib.Path,
        *,
        clock: Callable[[], float] = time.time,
        host: str | None = None,
    ) -> Self:
        """Open (creating if needed) the database at ``path``, migrating its schema.

        The parent directory is created with mode 0700 and a new file with 0600.
        ``clock`` gives the unix time stamped on rows; ``host`` names this host
        on the tasks it claims (default: the machine's host name). Raises
        ``StateError`` if the file cannot be opened, is not a database, or has
        a newer schema.
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
            store = cls(conn, path, clock, host)
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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _migrate(self) -> None:
        while True:
            with self._write():
                (version,) = self._conn.execute("PRAGMA user_version").fetchone()
                if version > len(MIGRATIONS):
                    raise StateError(
                        f"state database {self.path}: schema version {version} is newer"
                        f" than this fireclaw-swarm knows ({SCHEMA_VERSION})"
                    )
                if version == len(MIGRATIONS):
                    return
                for statement in MIGRATIONS[version]:
                    self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version = {version + 1}")

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
