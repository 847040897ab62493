"""A cluster's state store: what the hosts share in PostgreSQL, what only this
host can use in its own SQLite database.

``PgStore`` has every method of the SQLite ``Store`` (it is one, to the
supervisor and the pool), and keeps in PostgreSQL what a fleet shares:

- the task queue: claims with ``FOR UPDATE SKIP LOCKED``, each stamped with
  the claiming host and a new epoch that fences every later write of the task
  (``state_pg_tasks``);
- named agents, one name across the fleet, and the hosts with their
  heartbeats in database time (``state_pg_registry``);
- the audit trail and the ledger of model calls (``state_pg_ledger``).

This host's VM and service registry, its restarts and its scale overrides
stay in ``state_dir/swarm.db``, as with one host: they name processes,
namespaces and files of this machine, which no other host could use, and a
host must reclaim them after a crash even while the database is unreachable.

The connection, the password (``password_file`` or libpq's environment,
never the connection string), error translation and migrations are in
``state_pg_db``. A database that cannot be reached makes task moves
``StateUnwritable``, as a full disk does: the pool holds them and tries again.

Threads: safe for concurrent use (each database call is one transaction under
a lock), unlike the SQLite part, which the supervisor uses from one thread
at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Self

from fireclaw.supervisor.state import Store
from fireclaw.supervisor.state_pg_accounts import PgAccounts
from fireclaw.supervisor.state_pg_db import PgDatabase
from fireclaw.supervisor.state_pg_ledger import PgLedger
from fireclaw.supervisor.state_pg_registry import PgRegistry
from fireclaw.supervisor.state_pg_tasks import PgTasks

if TYPE_CHECKING:
    from fireclaw.pool.store import StateStore

__all__ = ["PgStore"]


class PgStore(PgTasks, PgRegistry, PgLedger, PgAccounts, Store):
    """The shared state in PostgreSQL over this host's SQLite database. Open
    with ``PgStore.connect``; close with ``close()`` (or as a context manager)."""

    _pg: PgDatabase

    @classmethod
    def connect(
        cls,
        dsn: str,
        *,
        host: str,
        local: Path,
        password_file: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> Self:
        """Open this host's database at ``local`` and connect to ``dsn`` as the
        host named ``host``, migrating both schemas. Raises ``StateError`` (one
        line naming the file, or the database as ``host/dbname``)."""
        store = cls.open(local, clock=clock, host=host)
        try:
            store._pg = PgDatabase.open(
                dsn, password_file=password_file, health=store.health, clock=clock
            )
        except BaseException:
            Store.close(store)  # the SQLite part: the shared one never opened
            raise
        return store

    @property
    def database(self) -> str:
        """The shared database, as ``host/dbname``."""
        return self._pg.label

    def close(self) -> None:
        """Close both connections. Idempotent."""
        self._pg.close()
        super().close()


if TYPE_CHECKING:

    def _as_pool_sees_it(store: PgStore) -> StateStore:
        """mypy checks here that the store has every method the pool calls."""
        return store
