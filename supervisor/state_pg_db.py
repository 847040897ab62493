"""The connection under a cluster's PostgreSQL store: the connection string and
its password, transactions, migrations, and translating psycopg's errors into
the store's (see ``pool/store.py``).

psycopg 3's sync API: its async one runs only on asyncio. A ``PgDatabase`` may
be used from several threads (a lock makes its transactions one at a time), so
the supervisor can call it from the trio loop or through ``trio.to_thread``.

The password never sits in the connection string (``parse_config`` refuses
one there): it comes from ``password_file`` (read as every secret is,
``secretfile.read_secret``) or from libpq's own environment (``PGPASSWORD``,
``PGPASSFILE``, ``~/.pgpass``). Errors name the database as ``host/dbname``.

A lost connection makes the write ``StateUnwritable`` ("unreachable"), as a
full disk does for SQLite: the pool holds its task moves and tries again, and
a later call connects anew. A database that refuses writes for want of room
is "full"; one in read-only mode (a standby) is "read-only".

The store is called on the supervisor's event loop, as the SQLite one is, so
an unreachable database must cost little time per call: connecting gives up
after ``CONNECT_TIMEOUT``, a silent peer drops the connection after
``CONNECT_TIMEOUT`` too (TCP user timeout and keepalives), and for
``RECONNECT_AFTER`` seconds after a failed attempt calls fail at once instead
of trying again.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, Self

import psycopg
from fireclaw.pool.store import StateError, StateUnwritable
from fireclaw.supervisor.secretfile import SecretFileError, read_secret
from fireclaw.supervisor.state_db import WriteHealth
from fireclaw.supervisor.state_pg_schema import MIGRATION_LOCK, MIGRATIONS, SCHEMA_VERSION
from psycopg.conninfo import conninfo_to_dict

log = logging.getLogger("fireclaw.state")

#: A database password: one line of printable characters.
PASSWORD_RE: Final = re.compile(r"[^\x00-\x1f\x7f]{1,1024}")
_PASSWORD_WHAT: Final = "the database password (one line)"

#: How long a connection attempt, and a silent TCP peer, may take before the
#: database counts as unreachable (seconds; libpq's least for the first is 2).
CONNECT_TIMEOUT: Final = 3
#: Seconds after a failed connection attempt during which calls fail at once.
RECONNECT_AFTER: Final = 2.0
_TCP_OPTIONS: Final[dict[str, Any]] = {
    "connect_timeout": CONNECT_TIMEOUT,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 1,
    "keepalives_count": 3,
    "tcp_user_timeout": CONNECT_TIMEOUT * 1000,
    "application_name": "fireclaw-swarm",
}

#: Seconds of silence from a lock-holding connection (``hold_lock``) after which
#: the server drops it and frees its lock: a holder cut off the network must
#: lose its lock in seconds, not after the kernel's two hours, so the server
#: probes it (keepalives) and gives up on what it sent unanswered as long. Not
#: sooner: the holder leads for a lease shorter than this (``cluster.LEAD_LEASE``),
#: and stops before another host can take the lock.
HOLDER_SILENCE: Final = 10
#: The server's side of a lock-holding connection; over a Unix socket these
#: change nothing.
_HOLDER_SETTINGS: Final = (
    f"SET tcp_keepalives_idle = {HOLDER_SILENCE}",
    "SET tcp_keepalives_interval = 1",
    "SET tcp_keepalives_count = 3",
    f"SET tcp_user_timeout = {HOLDER_SILENCE * 1000}",
)

# SQLSTATE classes that mean the server, not the statement, refuses writes now.
_UNWRITABLE: Final[dict[type[psycopg.Error], str]] = {
    psycopg.errors.DiskFull: "full",
    psycopg.errors.ReadOnlySqlTransaction: "read-only",
}


def describe(dsn: str) -> str:
    """``host/dbname`` of a connection string, for messages; ``StateError`` if it
    is not one. Never the password."""
    try:
        info = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise StateError(f"state database: not a PostgreSQL connection string: {exc}") from None
    host = str(info.get("host") or "localhost")
    return f"{host}/{info.get('dbname') or info.get('user') or ''}"


def has_password(dsn: str) -> bool:
    """Whether the connection string carries a password (it must not)."""
    try:
        return "password" in conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return False


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class PgDatabase:
    """One connection to the cluster's database, reopened when lost, and the
    transaction every part of the PostgreSQL store writes through."""

    def __init__(
        self, dsn: str, *, password: str | None, health: WriteHealth, clock: Callable[[], float]
    ) -> None:
        self.label = describe(dsn)
        self._dsn = dsn
        self._password = password
        self._health = health
        self._clock = clock
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None
        self._lock = threading.Lock()
        self._listener: psycopg.Connection[tuple[Any, ...]] | None = None  # see listen()
        self._holder: psycopg.Connection[tuple[Any, ...]] | None = None  # see hold_lock()
        self._holding = False
        #: ``time.monotonic()`` before which no new connection is tried (see above).
        self._retry_at = 0.0

    @classmethod
    def open(
        cls,
        dsn: str,
        *,
        password_file: Path | None = None,
        health: WriteHealth | None = None,
        clock: Callable[[], float] = time.time,
    ) -> Self:
        """Connect to ``dsn`` and migrate its schema. Raises ``StateError`` (one
        line naming ``host/dbname``) if the string carries a password, the
        password file cannot be used, the server cannot be reached or refuses
        us, or the schema is newer than this fireclaw-swarm knows."""
        label = describe(dsn)
        if has_password(dsn):
            raise StateError(
                f"state database {label}: the connection string carries a password;"
                " name a password_file (or set PGPASSFILE) instead"
            )
        password = None
        if password_file is not None:
            try:
                password = read_secret(password_file, PASSWORD_RE, _PASSWORD_WHAT)
            except SecretFileError as exc:
                raise StateError(f"state database {label}: password_file {exc}") from None
        db = cls(dsn, password=password, health=health or WriteHealth(), clock=clock)
        try:
            db._conn = db._connect()
            db._migrate()
        except psycopg.Error as exc:
            db.close()
            raise StateError(f"state database {label}: {first_line(exc)}") from None
        except StateError:
            db.close()
            raise
        return db

    def close(self) -> None:
        """Close the connections. Idempotent."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._holder is not None:
            self._holder.close()
            self._holder = None
            self._holding = False

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        extra: dict[str, Any] = dict(_TCP_OPTIONS)
        if self._password is not None:
            extra["password"] = self._password
        return psycopg.connect(self._dsn, autocommit=True, **extra)

    def _migrate(self) -> None:
        assert self._conn is not None
        with self._conn.transaction():
            self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS fireclaw_schema (version INTEGER NOT NULL)"
            )
            row = self._conn.execute("SELECT version FROM fireclaw_schema").fetchone()
            version = 0 if row is None else int(row[0])
            if version > SCHEMA_VERSION:
                raise StateError(
                    f"state database {self.label}: schema version {version} is newer"
                    f" than this fireclaw-swarm knows ({SCHEMA_VERSION})"
                )
            for step in MIGRATIONS[version:]:
                for statement in step:
                    self._conn.execute(statement)
            if row is None:
                self._conn.execute(
                    "INSERT INTO fireclaw_schema (version) VALUES (%s)", (SCHEMA_VERSION,)
                )
            elif version < SCHEMA_VERSION:
                self._conn.execute("UPDATE fireclaw_schema SET version = %s", (SCHEMA_VERSION,))

    @contextlib.contextmanager
    def transaction(self, *, write: bool = False) -> Iterator[psycopg.Cursor[tuple[Any, ...]]]:
        """A cursor in one transaction, committed when the block ends, rolled back
        if it raises. psycopg's errors come out as the store's: a lost or refused
        connection, or a server refusing writes, as ``StateUnwritable``; anything
        else as ``StateError``. With ``write``, a commit ends an outage in ``health``."""
        with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    if time.monotonic() < self._retry_at:
                        raise psycopg.OperationalError("not connected (tried again shortly)")
                    try:
                        self._conn = self._connect()
                    except psycopg.Error:
                        self._retry_at = time.monotonic() + RECONNECT_AFTER
                        raise
                with self._conn.transaction(), self._conn.cursor() as cur:
                    yield cur
            except psycopg.Error as exc:
                why = self._why_unwritable(exc)
                message = f"state database {self.label}: {first_line(exc)}"
                if why is None:
                    raise StateError(message) from exc
                if self._health.failed(self._clock(), why):
                    log.warning(
                        "%s: until it takes writes again, tasks are refused, task moves wait,"
                        " audit events are dropped",
                        message,
                    )
                raise StateUnwritable(message, why, self.label) from exc
        if write and self._health.succeeded():
            log.warning(
                "state database %s takes writes again (dropped meanwhile: %d events,"
                " %d other writes)",
                self.label,
                self._health.dropped_events,
                self._health.dropped_writes,
            )

    def listen(self, channel: str, timeout: float) -> set[str]:
        """The payloads of notifications on ``channel`` heard within ``timeout``
        seconds: returns at the first (with any others already there), or empty
        at the deadline. Blocking, on a connection of its own (listening from the
        first call on), so call it from one worker thread at a time. A
        notification sent while this connection was down is lost: callers poll
        as well. Raises ``StateUnwritable`` ("unreachable") if the database
        cannot be reached; the next call connects anew."""
        heard: set[str] = set()
        try:
            if self._listener is None or self._listener.closed:
                self._listener = self._connect()
                self._listener.execute(f'LISTEN "{channel}"')
            for notice in self._listener.notifies(timeout=timeout, stop_after=1):
                heard.add(notice.payload)
            if heard:  # what else already arrived, without waiting
                heard.update(n.payload for n in self._listener.notifies(timeout=0))
        except psycopg.Error as exc:
            if self._listener is not None:
                self._listener.close()
            self._listener = None
            message = f"state database {self.label}: {first_line(exc)}"
            raise StateUnwritable(message, "unreachable", self.label) from exc
        return heard

    def hold_lock(self, key: int) -> bool:
        """Whether this process holds the session-level advisory lock ``key``,
        trying to take it if not. It is held on a connection of its own, kept
        for that: the lock lasts as long as that connection, so a host that dies
        or loses the database frees it for another. One key per database object.
        Blocking, so call it from one worker thread at a time. False while the
        database cannot be reached; the next call connects anew."""
        try:
            if self._holder is None or self._holder.closed:
                self._holding = False
                self._holder = self._connect()
                for statement in _HOLDER_SETTINGS:
                    self._holder.execute(statement)
            if self._holding:
                self._holder.execute("SELECT 1")  # still connected: still held
            else:
                row = self._holder.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
                self._holding = row is not None and bool(row[0])
        except psycopg.Error as exc:
            log.debug("state database %s: advisory lock: %s", self.label, first_line(exc))
            if self._holder is not None:
                self._holder.close()
            self._holder, self._holding = None, False
        return self._holding

    def _why_unwritable(self, exc: psycopg.Error) -> str | None:
        for kind, why in _UNWRITABLE.items():
            if isinstance(exc, kind):
                return why
        if isinstance(exc, psycopg.OperationalError) and (
            self._conn is None or self._conn.closed or self._conn.broken
        ):
            # The connection is gone (server restarting, network cut): the next
            # call connects anew.
            if self._conn is not None:
                self._conn.close()
            self._conn = None
            return "unreachable"
        return None
