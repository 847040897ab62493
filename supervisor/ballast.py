"""Room to start on a full state disk: a ballast file kept in the state dir.

A supervisor cannot open its database on a file system with no free byte:
SQLite's write-ahead log index alone needs a few pages. A running supervisor
survives a full disk (``durable``), but a restart (after a crash, a
``kill -9``, a reboot) on one would bring nothing back up, fleet included.
So while there is room the state dir holds a file of reserved blocks, and a
start that finds the disk full deletes it to open the database in the room it
leaves, then runs as it does on a full disk: tasks refused with one line until
there is room. The file is made again at a later start once the disk has
room for it and as much again. (CockroachDB's ``EMERGENCY_BALLAST`` is the
same idea.)
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Final

NAME: Final = "ballast"
MIN_SIZE: Final = 1 << 20
MAX_SIZE: Final = 64 << 20
#: Below this many free bytes a start treats its state disk as full.
FULL_BELOW: Final = 256 << 10


def size_for(fs_bytes: int) -> int:
    """One percent of the file system, within [MIN_SIZE, MAX_SIZE]."""
    return max(MIN_SIZE, min(fs_bytes // 100, MAX_SIZE))


def disk_full(state_dir: Path) -> bool:
    return shutil.disk_usage(state_dir).free < FULL_BELOW


def ensure(state_dir: Path) -> str | None:
    """Make the ballast unless it exists; why it could not be made, or None.

    It is made only when the disk keeps as much room again beside it, so that
    making it never fills a disk that is nearly full."""
    path = state_dir / NAME
    if path.exists():
        return None
    usage = shutil.disk_usage(state_dir)
    size = size_for(usage.total)
    if usage.free < 2 * size:
        return f"{usage.free} bytes free, fewer than twice its {size}"
    tmp = path.with_name(f".{NAME}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EOPNOTSUPP):
            return exc.strerror or str(exc)
        raise
    return None


def release(state_dir: Path) -> int:
    """Delete the ballast; the bytes it gave back (0: there was none)."""
    path = state_dir / NAME
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    return size
