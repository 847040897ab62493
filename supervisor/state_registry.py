"""What runs, and what to bring back: the registry of VMs and managed services
(best effort, for a later supervisor to adopt or reclaim them), named agents,
runtime scale overrides, and the hosts (here the one host, heartbeating).
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
from fireclaw.pool.store import VmRecord
from fireclaw.supervisor.state_db import Database


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


class HostRow(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A host of the swarm and its last sign of life. ``age`` is the seconds
    since that heartbeat as the database's own clock counts them, so hosts whose
    clocks disagree still agree on who is silent."""

    name: str
    started_at: float
    heartbeat_at: float
    age: float


_VM_FIELDS: Final = VmRecord.__struct_fields__
_VM_COLUMNS: Final = ", ".join(_VM_FIELDS)
_SERVICE_COLUMNS: Final = "name, command, pid, start_time, boot_id, address"


def _vm(row: tuple[Any, ...]) -> VmRecord:
    # SQLite has no booleans: the flags come back as 0 or 1.
    values = dict(zip(_VM_FIELDS, row, strict=True))
    return msgspec.convert(values, VmRecord, strict=False)


class Registry(Database):
    """The VM and service registry, scale overrides and named agents."""

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

    # --- hosts ---------------------------------------------------------------

    def heartbeat(self) -> None:
        """This host is alive now (its row is made at the first heartbeat)."""
        now = self._clock()
        with self._errors(write=True):
            self._conn.execute(
                "INSERT INTO hosts (name, started_at, heartbeat_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                (self.host, now, now),
            )

    def lead_fleet(self) -> bool:
        """Whether this host's overseer leads the fleet. One host leads itself."""
        return True

    def hosts(self) -> list[HostRow]:
        """Every host that ever heartbeat, by name."""
        now = self._clock()
        with self._errors():
            rows = self._conn.execute(
                "SELECT name, started_at, heartbeat_at FROM hosts ORDER BY name"
            ).fetchall()
        return [HostRow(name=n, started_at=s, heartbeat_at=h, age=now - h) for n, s, h in rows]
