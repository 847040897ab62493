"""What swarms leave on a host, found and removed (``fireclaw-swarm doctor`` and ``gc``).

A swarm names everything it makes after its instance id (``instance_id(state_dir)``,
six hex digits), so what a dead supervisor left is found by name::

    processes       qemu-system-* with fireclaw.vm_id=<inst>-... in its arguments;
                    process guests with FIRECLAW_VM_ID=<inst>-... in their environment
    services        a managed service's program naming its file in a state dir
                    (ngircd -f <state_dir>/ircd/ngircd.conf): the instance is
                    instance_id(<state_dir>)
    cgroups         <cgroup root>/fireclaw/<inst>-<vm>
    namespaces      /run/netns/fireclaw-<inst>-<vm>
    host links      fc<inst>br (the bridge), fc<inst>v<6 hex> (veths)
    nft table       inet fireclaw_<inst>
    run dirs        $TMPDIR/fireclaw-<inst>-*

and through the state dir only (so only for a swarm whose state dir is known)::

    registry rows   the vms and services tables of <state_dir>/swarm.db
    overlays        <state_dir>/disks/*.qcow2
    run dirs        <state_dir>/logs/run/*

While a supervisor runs, all of this is its own. Whether it runs is its pid
lock for a known state dir (``owner``); for other instances, a process that
holds the lock of some state dir hashing to the instance, or a
``fireclaw-swarm`` process that is the parent of one of the instance's
processes (``running_instances``). Anything else is "unknown".

Everything here blocks (procfs, netlink, nft, SQLite): call it from a thread
under trio. Nothing raises for one item: ``find`` notes what it could not look
at in ``Leftovers.errors`` and ``remove`` reports each failure as one line. How
each kind is removed is in supervisor/removal.py.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Final, Literal, TypeVar

import psutil
from fireclaw.guest_daemon.lines import first_line
from fireclaw.pool import cgroup, disks, netns, network
from fireclaw.pool.procid import ProcessIdentity, process_identity
from fireclaw.pool.runtime import instance_id
from fireclaw.supervisor import pidfile, services
from fireclaw.supervisor.removal import (
    Removal,
    delete_table,
    kill_process,
    remove_links,
    remove_service_rows,
    remove_vm_rows,
    rmtree,
)
from fireclaw.supervisor.state import ServiceRecord, Store, VmRecord

__all__ = [
    "Leftovers",
    "Owner",
    "Process",
    "Removal",
    "ServiceKind",
    "ServiceProcess",
    "find",
    "find_all",
    "owner",
    "remove",
    "running_instances",
]

# What a state dir holds; supervisor/daemon.py takes these names from here (this
# module stays light: doctor and gc do not load the supervisor).
LOCK_NAME: Final = "supervisor.pid"
DB_NAME: Final = "swarm.db"
DISKS_NAME: Final = "disks"
RUN_DIRS: Final = Path("logs") / "run"


_INSTANCE: Final = re.compile(r"[0-9a-f]{6}")
#: A VM id: the instance, a dash, the rest (the VM's name and a random tag).
_VM_ID: Final = re.compile(r"([0-9a-f]{6})-\S+")
_QEMU_VM_ID: Final = re.compile(r"fireclaw\.vm_id=([0-9a-f]{6}-\S+)")
_NETNS: Final = re.compile(re.escape(netns.PREFIX) + r"([0-9a-f]{6})-")
_RUN_DIR: Final = re.compile(r"fireclaw-([0-9a-f]{6})-")
_TABLE_PREFIX: Final = "fireclaw_"
_SUPERVISOR_NAMES: Final = ("fireclaw-swarm", "fireclaw.supervisor")

T = TypeVar("T")


@dataclass(frozen=True)
class ServiceKind:
    """How a managed service's process is known by name: its program runs with the
    path of a file in its swarm's state dir on its command line. While that file
    exists its first line names fireclaw-swarm (``MARKER``), so a program of the
    same name run by someone else from a look-alike path is not taken for ours."""

    program: str  # the basename of argv[0]
    config: Path  # that file, relative to the state dir


#: The managed services, by their registry name (``state.ServiceRecord.name``).
SERVICES: Final = {
    "ircd": ServiceKind("ngircd", Path("ircd") / "ngircd.conf"),
    # The model server is this Python running fireclaw.supervisor.modelserver.
    "models": ServiceKind(os.path.basename(sys.executable), Path("models") / "modelserver.conf"),
}
MARKER: Final = "fireclaw-swarm"


@dataclass(frozen=True)
class Process:
    """A VMM or guest process of a swarm."""

    pid: int
    started: float  # psutil's create_time: a reused pid is not killed
    ppid: int
    vm_id: str
    command: str

    def __str__(self) -> str:
        return f"process {self.pid} ({self.command}, vm {self.vm_id})"


@dataclass(frozen=True)
class ServiceProcess:
    """A managed service's process, found by its command line."""

    service: str
    ident: ProcessIdentity
    ppid: int
    command: str
    state_dir: Path  # the swarm it serves, as its command line names it

    @property
    def pid(self) -> int:
        return self.ident.pid

    def __str__(self) -> str:
        return f"process {self.pid} ({self.command}, service {self.service} of {self.state_dir})"


@dataclass
class Leftovers:
    """What one instance has on the host, kind by kind, in the order ``remove`` goes."""

    instance: str
    state_dir: Path | None = None  # None: an instance found by name only
    processes: list[Process] = field(default_factory=list)
    services: list[ServiceProcess] = field(default_factory=list)
    vms: list[VmRecord] = field(default_factory=list)
    service_rows: list[ServiceRecord] = field(default_factory=list)
    cgroups: list[Path] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)  # "inet fireclaw_<inst>"
    disks: list[Path] = field(default_factory=list)
    run_dirs: list[Path] = field(default_factory=list)
    #: What could not be looked at, one line each (not leftovers themselves).
    errors: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.items()

    def items(self) -> list[str]:
        """One line per leftover, in removal order."""
        return [
            *(str(p) for p in self.processes),
            *(str(p) for p in self.services),
            *(f"registry row {v.name} (pid {v.pid})" for v in self.vms),
            *(f"registry row service {r.name} (pid {r.pid})" for r in self.service_rows),
            *(f"cgroup {p}" for p in self.cgroups),
            *(f"netns {n}" for n in self.netns),
            *(f"link {n}" for n in self.links),
            *(f"nft table {t}" for t in self.tables),
            *(f"disk {p}" for p in self.disks),
            *(f"run dir {p}" for p in self.run_dirs),
        ]


@dataclass(frozen=True)
class Owner:
    """Whether an instance's supervisor runs: ``unknown`` when no evidence either way."""

    state: Literal["running", "stopped", "unknown"]
    pid: int | None = None

    def __str__(self) -> str:
        if self.state == "running":
            return f"running (pid {self.pid})" if self.pid else "running"
        if self.state == "stopped":
            return "not running"
        return "supervisor not found"


# ---------------------------------------------------------------- finding


def find(state_dir: Path) -> Leftovers:
    """What the swarm of ``state_dir`` has on the host and in its state dir."""
    state_dir = Path(state_dir).resolve()
    mine = instance_id(state_dir)
    return find_all(state_dir).get(mine) or Leftovers(mine, state_dir)


def find_all(state_dir: Path | None = None) -> dict[str, Leftovers]:
    """Every instance's leftovers on the host, by instance id (only those with some).

    With ``state_dir``, that instance's entry also holds what its state dir has;
    other instances are found by name only."""
    found: dict[str, Leftovers] = {}
    errors: list[str] = []

    def entry(instance: str) -> Leftovers:
        if instance not in found:
            found[instance] = Leftovers(instance)
        return found[instance]

    for proc in _look("processes", _processes, errors):
        entry(proc.vm_id[:6]).processes.append(proc)
    for service in _look("services", _service_processes, errors):
        entry(instance_id(service.state_dir)).services.append(service)
    for path in _look("cgroups", cgroup.leftovers, errors):
        if (m := _VM_ID.fullmatch(path.name)) is not None:
            entry(m[1]).cgroups.append(path)
    for name in _look("namespaces", netns.leftovers, errors):
        if (m := _NETNS.match(name)) is not None:
            entry(m[1]).netns.append(name)
    for name in _look("host links", network.host_links, errors):
        entry(name[2:8]).links.append(name)
    for table in _look("nft tables", network.tables, errors):
        family, _, name = table.partition(" ")
        instance = name.removeprefix(_TABLE_PREFIX)
        if name.startswith(_TABLE_PREFIX) and _INSTANCE.fullmatch(instance):
            entry(instance).tables.append(table)
    for path in _look("run dirs", _tmp_run_dirs, errors):
        if (m := _RUN_DIR.match(path.name)) is not None:
            entry(m[1]).run_dirs.append(path)

    if state_dir is not None:
        sdir = Path(state_dir).resolve()
        mine = entry(instance_id(sdir))
        mine.state_dir = sdir
        mine.vms = _look("registry", partial(_registry, sdir, Store.vms), errors)
        mine.service_rows = _look("registry", partial(_registry, sdir, Store.services), errors)
        mine.disks = disks.leftovers(sdir / DISKS_NAME)
        mine.run_dirs += _look("run dirs", partial(_dirs_in, sdir / RUN_DIRS), errors)
    for leftovers in found.values():
        leftovers.errors = list(errors)
    return {k: v for k, v in found.items() if v.state_dir is not None or not v.empty}


def _look(what: str, fn: Callable[[], Iterable[T]], errors: list[str]) -> list[T]:
    try:
        return list(fn())
    except Exception as exc:  # one source failing must not hide the others
        errors.append(f"cannot list {what}: {first_line(exc)}")
        return []


def _processes() -> list[Process]:
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["cmdline", "create_time", "ppid"], ad_value=None):
        if proc.pid == me:
            continue
        argv: list[str] = proc.info["cmdline"] or []
        vm_id = None
        command = os.path.basename(argv[0]) if argv else ""
        if command.startswith("qemu-system"):
            vm_id = next((m[1] for a in argv if (m := _QEMU_VM_ID.search(a))), None)
        if vm_id is None:
            try:
                value = proc.environ().get("FIRECLAW_VM_ID", "")
            except psutil.Error:
                continue  # gone, a zombie, or not ours to read
            if _VM_ID.fullmatch(value):
                vm_id = value
        if vm_id is not None:
            found.append(
                Process(
                    pid=proc.pid,
                    started=proc.info["create_time"] or 0.0,
                    ppid=proc.info["ppid"] or 0,
                    vm_id=vm_id,
                    command=command or "?",
                )
            )
    return found


def _service_processes() -> list[ServiceProcess]:
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["cmdline", "ppid"], ad_value=None):
        argv: list[str] = proc.info["cmdline"] or []
        if proc.pid == me or not argv:
            continue
        command = os.path.basename(argv[0])
        for name, kind in SERVICES.items():
            if command != kind.program:
                continue
            state_dir = _state_dir_named(argv[1:], kind.config)
            if state_dir is None or not _written_by_us(state_dir / kind.config):
                continue
            ident = process_identity(proc.pid)
            if ident is not None:
                found.append(
                    ServiceProcess(
                        service=name,
                        ident=ident,
                        ppid=proc.info["ppid"] or 0,
                        command=command,
                        state_dir=state_dir,
                    )
                )
    return found


def _state_dir_named(args: list[str], config: Path) -> Path | None:
    """The state dir whose ``config`` file one of ``args`` is (an absolute path)."""
    n = len(config.parts)
    for arg in args:
        path = Path(arg)
        if path.is_absolute() and len(path.parts) > n and path.parts[-n:] == config.parts:
            return Path(*path.parts[:-n])
    return None


def _written_by_us(config: Path) -> bool:
    """Whether ``config`` is a file a swarm wrote (or is gone with its state dir)."""
    try:
        with config.open("rb") as f:
            first = f.readline(512)
    except FileNotFoundError:
        return True  # its state dir was removed under it: nobody else will name it
    except OSError:
        return True  # cannot tell (another user's): listed; only they could stop it
    return MARKER.encode() in first


def _tmp_run_dirs() -> list[Path]:
    return [p for p in _dirs_in(Path(tempfile.gettempdir())) if _RUN_DIR.match(p.name)]


def _dirs_in(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in directory.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []


def _registry(state_dir: Path, rows: Callable[[Store], list[T]]) -> list[T]:
    db = state_dir / DB_NAME
    if not db.exists():
        return []  # opening would create it
    store = Store.open(db)
    try:
        return rows(store)
    finally:
        store.close()


# ---------------------------------------------------------------- who owns them


def owner(state_dir: Path) -> Owner:
    """Whether the supervisor of ``state_dir`` runs: its pid lock, tested without taking it."""
    try:
        pid = pidfile.holder(Path(state_dir) / LOCK_NAME)
    except pidfile.PidLockError:
        return Owner("unknown")
    return Owner("stopped") if pid is None else Owner("running", pid or None)


def running_instances(found: dict[str, Leftovers] | None = None) -> dict[str, int]:
    """Instances whose supervisor is seen running, with its pid.

    A supervisor is a process holding the lock of a state dir's ``supervisor.pid``
    open (a ``fireclaw-swarm up``, or a test running one in-process): its
    instance is that state dir's. A ``fireclaw-swarm`` or ``fireclaw.supervisor``
    process that is the parent of a process in ``found`` counts for that
    instance too. Ourselves (``gc`` holds its own state dir's lock) are left out.
    """
    me = os.getpid()
    named: set[int] = set()
    for proc in psutil.process_iter(["cmdline"], ad_value=None):
        argv: list[str] = proc.info["cmdline"] or []
        if any(os.path.basename(a).startswith(_SUPERVISOR_NAMES) for a in argv[:3]):
            named.add(proc.pid)
    running: dict[str, int] = {}
    for pid in sorted((named | _flock_pids()) - {me}):
        try:
            files = psutil.Process(pid).open_files()
        except psutil.Error:
            continue
        for f in files:
            path = Path(f.path)
            # Open is not enough (``doctor`` opens it to look): the lock must be held.
            if path.name == LOCK_NAME and owner(path.parent).state == "running":
                running[instance_id(path.parent)] = pid
    for instance, leftovers in (found or {}).items():
        parents = [p.ppid for p in leftovers.processes] + [s.ppid for s in leftovers.services]
        parent = next((ppid for ppid in parents if ppid in named - {me}), None)
        if parent is not None:
            running.setdefault(instance, parent)
    return running


def _flock_pids() -> set[int]:
    """Pids holding some flock lock, from ``/proc/locks`` (empty if unreadable)."""
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return set()
    words = (line.split() for line in text.splitlines())
    return {int(w[4]) for w in words if len(w) >= 6 and w[1] == "FLOCK" and w[4].isdigit()}


# ---------------------------------------------------------------- removing


def remove(found: Leftovers) -> list[Removal]:
    """Remove everything in ``found``: processes first (they hold the rest busy).

    Never raises for one item: each gives a Removal, with its error if it failed.
    Something already gone counts as removed."""
    done: list[Removal] = []

    def attempt(item: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as exc:
            done.append(Removal(item, first_line(exc)))
        else:
            done.append(Removal(item))

    for proc in found.processes:
        attempt(str(proc), partial(kill_process, proc.pid, proc.started))
    for service in found.services:
        attempt(str(service), partial(services.stop, service.ident))
    if found.vms and found.state_dir is not None:
        remove_vm_rows(found.state_dir / DB_NAME, found.vms, done)
    if found.service_rows and found.state_dir is not None:
        remove_service_rows(found.state_dir / DB_NAME, found.service_rows, done)
    for path in found.cgroups:
        attempt(f"cgroup {path}", partial(cgroup.remove, path))
    for name in found.netns:
        attempt(f"netns {name}", partial(netns.remove_sync, name))
    if found.links:
        remove_links(found.links, done)
        if network.restore_forwarding():
            done.append(Removal("IPv4 forwarding turned on for swarms (restored)"))
    for table in found.tables:
        attempt(f"nft table {table}", partial(delete_table, table))
    for path in found.disks:
        attempt(f"disk {path}", partial(disks.remove, path))
    for path in found.run_dirs:
        attempt(f"run dir {path}", partial(rmtree, path))
    return done
