"""A cgroup per VM: the role's memory limit, and a way to kill everything inside.

Works with cgroup v2 (``memory.max``, ``cgroup.kill``) and with the v1 memory
controller (``memory.limit_in_bytes``; killing walks ``cgroup.procs``). Groups
live under ``<root>/fireclaw/<vm id>``. Everything here is blocking file I/O on
cgroupfs: call it from ``trio.to_thread``.

Errors::

    CgroupError     a group could not be created, limited, joined or removed
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Final

ROOT: Final = Path("/sys/fs/cgroup")
PARENT: Final = "fireclaw"


class CgroupError(Exception):
    """A cgroup operation failed."""


def _base() -> tuple[Path, int] | None:
    """Where our groups go and the cgroup version, or None if unusable here."""
    if (ROOT / "cgroup.controllers").exists():
        return ROOT / PARENT, 2
    if (ROOT / "memory" / "memory.limit_in_bytes").exists():
        return ROOT / "memory" / PARENT, 1
    return None


def probe() -> str | None:
    """None if per-VM cgroups work here, else one line saying why not."""
    if os.geteuid() != 0:
        return "not running as root"
    found = _base()
    if found is None:
        return f"no cgroup v2 or v1 memory controller under {ROOT}"
    base, version = found
    try:
        base.mkdir(exist_ok=True)
        if version == 2:
            # Child groups only get the memory controller if the parent hands it down.
            _write(base / "cgroup.subtree_control", "+memory")
    except OSError as exc:
        return f"cannot use {base}: {exc.strerror}"
    return None


def path_for(vm_id: str) -> Path | None:
    """Where ``create(vm_id)`` puts its group, known before it exists."""
    found = _base()
    return None if found is None else found[0] / vm_id


def create(vm_id: str, memory_mib: int) -> Path:
    found = _base()
    if found is None:
        raise CgroupError(f"no usable cgroup hierarchy under {ROOT}")
    base, version = found
    path = base / vm_id
    limit = str(memory_mib * 1024 * 1024)
    try:
        path.mkdir(parents=True, exist_ok=True)
        _write(path / ("memory.max" if version == 2 else "memory.limit_in_bytes"), limit)
    except OSError as exc:
        raise CgroupError(f"creating cgroup {path}: {exc.strerror}") from exc
    return path


def join(path: Path, pid: int) -> None:
    try:
        _write(path / "cgroup.procs", str(pid))
    except OSError as exc:
        raise CgroupError(f"moving pid {pid} into {path}: {exc.strerror}") from exc


def pids(path: Path) -> list[int]:
    try:
        return [int(x) for x in (path / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def kill_all(path: Path) -> None:
    """SIGKILL every process in the group (none can escape it by forking or setsid)."""
    kill_file = path / "cgroup.kill"
    if kill_file.exists():
        with contextlib.suppress(FileNotFoundError):
            _write(kill_file, "1")
        return
    # v1: repeat, since a process may fork while we walk the list.
    for _ in range(10):
        found = pids(path)
        if not found:
            return
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def remove(path: Path, *, timeout: float = 2.0) -> None:
    """Kill what is left inside, then remove the (empty) group."""
    deadline = time.monotonic() + timeout
    while True:
        kill_all(path)
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            # EBUSY until the killed processes are reaped by their parents.
            if time.monotonic() > deadline:
                raise CgroupError(f"removing cgroup {path}: {exc.strerror}") from exc
            time.sleep(0.005)


def leftovers() -> list[Path]:
    found = _base()
    if found is None or not found[0].is_dir():
        return []
    return sorted(p for p in found[0].iterdir() if p.is_dir())


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)
