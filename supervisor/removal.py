"""How each kind of leftover is removed: one function per kind, each blocking.

``leftovers.remove`` calls these in order (processes first: they hold the rest
busy) and turns each outcome into a ``Removal`` line; a registry sweep reports
row by row itself. Something already gone counts as removed. Everything here
blocks (signals and waits, SQLite, netlink, nft): call it from a thread under
trio.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

import psutil
from fireclaw.guest_daemon.lines import first_line
from fireclaw.pool import cgroup, netns
from fireclaw.pool.runner import ProgramFailed, run_program
from fireclaw.pool.teardown import kill_recorded
from fireclaw.supervisor import services
from fireclaw.supervisor.state import ServiceRecord, StateError, Store, VmRecord

__all__ = [
    "KILL_DEADLINE",
    "NFT_TIMEOUT",
    "Removal",
    "delete_table",
    "kill_process",
    "remove_links",
    "remove_service_rows",
    "remove_vm_rows",
    "rmtree",
]

#: How long a SIGKILLed process may take to die before it is reported as stuck.
KILL_DEADLINE: Final = 5.0
NFT_TIMEOUT: Final = 10.0

T = TypeVar("T")


@dataclass(frozen=True)
class Removal:
    """One item ``remove`` dealt with; ``str()`` is the line to show."""

    item: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def __str__(self) -> str:
        return f"removed {self.item}" if self.ok else f"cannot remove {self.item}: {self.error}"


def kill_process(pid: int, started: float) -> None:
    """SIGKILL process ``pid`` if it is still the one that started at ``started``
    (psutil's create_time), and wait until it is dead."""
    try:
        live = psutil.Process(pid)
        if live.create_time() != started:
            return  # it is gone and its pid was reused
        pgid = os.getpgid(pid)
        # A VMM leads its own process group (guest commands included); anything
        # else, or a group we are in ourselves, gets the signal alone.
        if pgid == pid and pgid != os.getpgrp():
            os.killpg(pgid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except (psutil.NoSuchProcess, ProcessLookupError):
        return
    deadline = time.monotonic() + KILL_DEADLINE
    while True:
        try:
            if live.status() == psutil.STATUS_ZOMBIE:
                return  # dead; its parent reaps it
        except psutil.NoSuchProcess:
            return
        if time.monotonic() > deadline:
            raise ProcessLookupError(f"still alive {KILL_DEADLINE:g}s after SIGKILL")
        time.sleep(0.01)


def remove_vm_rows(db: Path, rows: list[VmRecord], done: list[Removal]) -> None:
    """As ``Supervisor.reclaim`` does at start: kill, remove its cgroup and namespace,
    forget it (in the registry at ``db``)."""

    def reclaim(store: Store, rec: VmRecord) -> None:
        kill_recorded(rec)
        if rec.cgroup:
            cgroup.remove(Path(rec.cgroup))
        if rec.netns:
            netns.remove_sync(rec.netns)
        store.drop_vm(rec.name)

    _sweep(db, rows, lambda r: f"registry row {r.name} (pid {r.pid})", reclaim, done)


def remove_service_rows(db: Path, rows: list[ServiceRecord], done: list[Removal]) -> None:
    """As ``Supervisor.reclaim_services`` does at start: stop it, forget it (in the
    registry at ``db``)."""

    def item(rec: ServiceRecord) -> str:
        return f"registry row service {rec.name} (pid {rec.pid})"

    _sweep(db, rows, item, services.reclaim, done)


def _sweep(
    db: Path,
    rows: Sequence[T],
    item: Callable[[T], str],
    reclaim: Callable[[Store, T], object],
    done: list[Removal],
) -> None:
    """``reclaim`` each registry row in the store at ``db``, one Removal each."""
    try:
        store = Store.open(db)
    except StateError as exc:
        done += [Removal(item(r), first_line(exc)) for r in rows]
        return
    try:
        for rec in rows:
            try:
                reclaim(store, rec)
            except Exception as exc:
                done.append(Removal(item(rec), first_line(exc)))
            else:
                done.append(Removal(item(rec)))
    finally:
        store.close()


def remove_links(names: list[str], done: list[Removal]) -> None:
    """Delete the host links ``names`` (veths before the bridge), one Removal each."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        ipr = IPRoute()
    except Exception as exc:
        done += [Removal(f"link {n}", f"netlink: {first_line(exc)}") for n in names]
        return
    with ipr:
        # veths before the bridge; a veth may go by itself once its namespace is gone.
        for name in sorted(names, key=lambda n: n.endswith("br")):
            try:
                for index in ipr.link_lookup(ifname=name):
                    ipr.link("del", index=index)
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    done.append(Removal(f"link {name}", first_line(exc)))
                    continue
            done.append(Removal(f"link {name}"))


def delete_table(table: str) -> None:
    """``nft delete table`` of ``table`` (\"inet fireclaw_<inst>\"); OSError with nft's line."""
    try:
        run_program(["nft", "delete", "table", *table.split()], timeout=NFT_TIMEOUT)
    except ProgramFailed as exc:
        raise OSError(str(exc)) from exc


def rmtree(path: Path) -> None:
    """Remove the tree at ``path``; one that is gone already is fine."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)
