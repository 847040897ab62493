"""The ``cluster:`` section of swarm.yaml: several hosts acting as one swarm.

::

    cluster:
      database: postgresql://fireclaw@db.internal/fireclaw   # shared state
      host: alpha                      # this host's name in the fleet
      password_file: secrets/pg-password

No section: one host, its state in SQLite under ``state_dir``. With one, the
hosts share their task queue, named agents, events and usage ledger in the
PostgreSQL database ``database`` names, and each keeps its VMs, snapshots
and registry to itself. ``host`` (default: the machine's host name) must be
unique in the fleet: it is who claims a task. The password is never written
here: ``password_file`` names a file only its owner may read (relative to
swarm.yaml's folder), or libpq finds it in ``PGPASSWORD`` / ``PGPASSFILE``.
"""

from __future__ import annotations

import urllib.parse
from typing import Annotated, Final

import msgspec
from msgspec import Meta

__all__ = ["HOST_NAME_PATTERN", "ClusterSpec"]

#: A host's name: what DNS allows in a label or name, dots and all.
HOST_NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
_SCHEMES: Final = ("postgresql", "postgres")


class ClusterSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where the fleet's shared state is, and who this host is in it."""

    database: Annotated[str, Meta(min_length=1, max_length=2000)]
    host: Annotated[str, Meta(pattern=HOST_NAME_PATTERN)] | None = None
    password_file: Annotated[str, Meta(min_length=1, max_length=4096)] | None = None

    def __post_init__(self) -> None:
        url = urllib.parse.urlsplit(self.database)
        if url.scheme not in _SCHEMES:
            raise ValueError(
                "database: expected a postgresql:// URL, as in postgresql://fireclaw@db/fireclaw"
            )
        query = urllib.parse.parse_qs(url.query)
        if url.password is not None or "password" in query:
            raise ValueError(
                "database: a password is never written in swarm.yaml: put it in a file"
                " only its owner may read (chmod 600) and name it with password_file,"
                " or set PGPASSFILE"
            )
