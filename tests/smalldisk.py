"""A small file system of the test's own (a tmpfs, mounted as root), to fill up.

The state database on it meets a real full disk: SQLite's own ``SQLITE_FULL``,
not a simulation of it.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

#: Skip marker for tests that mount: only root can.
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@contextlib.contextmanager
def tmpfs(path: Path, size_mib: int) -> Iterator[Path]:
    """``path`` (created if missing) with a ``size_mib`` tmpfs mounted on it,
    unmounted again on every way out."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700", "tmpfs", str(path)],
        check=True,
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def fill(path: Path) -> int:
    """Write ``path`` until its file system is full, to the last byte; the bytes written."""
    chunk = b"\0" * (1 << 20)
    written = 0
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1):
            while True:
                try:
                    written += f.write(chunk[:size])
                except OSError:
                    break
    return written


def fill_under(db: Path) -> Path:
    """Fill the disk under the SQLite database ``db`` so that its next write
    fails; the filler, to delete for room again.

    SQLite reuses the space already in its write-ahead log, so a disk full to
    the last byte may still take a few writes, and a test would not know
    which. Truncating the log first (a checkpoint from a connection of our
    own) makes the next write need new blocks."""
    conn = sqlite3.connect(db, timeout=10)
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.close()
    assert busy == 0, f"{db}: the write-ahead log could not be truncated"
    filler = db.parent / "filler"
    fill(filler)
    return filler
