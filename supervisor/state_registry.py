"""What runs, and what to bring back: the registry of VMs and managed services
(best effort, for a later supervisor to adopt or reclaim them), named agents,
runtime scale overrides, and the hosts (here the one host, heartbeating, with
its load and whether it is draining).

Exceptions (besides those of ``pool/store.py``)::

    StateError
     +-- AgentExists        a named agent of that name exists (on some host)
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
from fireclaw.pool.store import StateError, VmRecord
from fireclaw.supervisor.state_db import Database


class AgentRecord(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A named agent: who it is, so it can be brought back."""

    name: str
    role: str
    model: str | None = None
    persona: str | None = None
    #: The host it lives on, with its workspace, as another host's name; None: this one.
    host: str | None = None


class AgentExists(StateError):
    """A named agent of that name is already stored: names are unique in the
    swarm (across every host of a cluster). ``host`` is where it lives (None:
    this one)."""

    def __init__(self, name: str, host: str | None) -> None:
        where = f" on host {host}" if host is not None else ""
        super().__init__(f"an agent named {name!r} already exists{where}")
        self.name = name
        self.host = host


class RoleLoad(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One role on one host: VMs at work (tasks and named agents) and the idle
    VMs its pool keeps."""

    active: int = 0
    target: int = 0


class HostLoad(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a host runs, as its heartbeat reports it: each of its roles, and
    how many tasks it is running."""

    roles: dict[str, RoleLoad] = {}
    tasks: int = 0


_encode_load = msgspec.json.Encoder().encode
_decode_load = msgspec.json.Decoder(HostLoad).decode


def encode_load(load: HostLoad) -> str:
    return _encode_load(load).decode()


def decode_load(text: str) -> HostLoad:
    """A stored load; an unreadable one (an older or newer host wrote it) is none."""
    try:
        return _decode_load(text)
    except msgspec.DecodeError:
        return HostLoad()


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
    #: Told to drain (``drain HOST``): it claims nothing and keeps no warm VMs.
    draining: bool = False
    load: HostLoad = HostLoad()


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

    def add_agent(self, rec: AgentRecord) -> None:
        """Remember a new named agent; ``AgentExists`` if the name is taken."""
        with self._errors():
            cur = self._conn.execute(
                "INSERT INTO agents (name, role, model, persona, created_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (name) DO NOTHING",
                (rec.name, rec.role, rec.model, rec.persona, self._clock()),
            )
        if cur.rowcount == 0:
            raise AgentExists(rec.name, None)

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

    def heartbeat(self, load: HostLoad | None = None) -> bool:
        """This host is alive now, running ``load`` (its row is made at the
        first heartbeat); whether it is told to drain."""
        now = self._clock()
        with self._errors(write=True):
            (draining,) = self._conn.execute(
                "INSERT INTO hosts (name, started_at, heartbeat_at, load) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET heartbeat_at = excluded.heartbeat_at,"
                " load = excluded.load RETURNING draining",
                (self.host, now, now, encode_load(load or HostLoad())),
            ).fetchone()
        return bool(draining)

    def set_draining(self, name: str, draining: bool) -> bool:
        """Tell the host ``name`` to drain (or to stop draining); False if no
        such host ever heartbeat. The host reads it at its next heartbeat."""
        with self._errors(write=True):
            cur = self._conn.execute(
                "UPDATE hosts SET draining = ? WHERE name = ?", (int(draining), name)
            )
        return cur.rowcount > 0

    def lead_fleet(self) -> bool:
        """Whether this host's overseer leads the fleet. One host leads itself."""
        return True

    def hosts(self) -> list[HostRow]:
        """Every host that ever heartbeat, by name."""
        now = self._clock()
        with self._errors():
            rows = self._conn.execute(
                "SELECT name, started_at, heartbeat_at, draining, load FROM hosts ORDER BY name"
            ).fetchall()
        return [
            HostRow(
                name=n,
                started_at=s,
                heartbeat_at=h,
                age=now - h,
                draining=bool(d),
                load=decode_load(ld),
            )
            for n, s, h, d, ld in rows
        ]
