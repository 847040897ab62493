"""Thin disks for real VMs: a qcow2 overlay per VM over the shared image.

The image's root filesystem is never written: each VM gets its own overlay
(``<directory>/<vm id>.qcow2``), created empty on top of the image when it
cold-boots, or on top of its template's frozen overlay when it is restored
(the page cache in the snapshot matches that disk, not the bare image). An
overlay is removed with its VM; a supervisor starting up removes every
overlay a crashed one left (``sweep``), since no VM outlives its supervisor.

Errors::

    DiskError       an overlay could not be created
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Final, Literal

import trio
from fireclaw.pool.runner import ProgramFailed, run_program

SUFFIX: Final = ".qcow2"
QEMU_IMG: Final = "qemu-img"
_TIMEOUT: Final = 30.0


class DiskError(Exception):
    """An overlay could not be created."""


async def create_overlay(
    path: Path, backing: Path, backing_format: Literal["raw", "qcow2"]
) -> Path:
    """Create ``path``, an empty qcow2 overlay on ``backing``; return it.

    Readable by root only: it will hold what the guest writes."""
    await trio.to_thread.run_sync(_create, path, backing, backing_format)
    return path


def _create(path: Path, backing: Path, backing_format: str) -> None:
    argv = [
        QEMU_IMG, "create", "-q", "-f", "qcow2",
        "-F", backing_format, "-b", str(backing.absolute()), str(path),
    ]  # fmt: skip
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        run_program(argv, timeout=_TIMEOUT)
    except OSError as exc:
        raise DiskError(f"overlay {path.name}: {exc.strerror or exc}") from exc
    except ProgramFailed as exc:
        remove(path)
        raise DiskError(f"overlay {path.name}: {exc}") from exc
    path.chmod(0o600)


def remove(path: Path) -> None:
    """Remove ``path`` if it is there; never raises (it runs on every exit path)."""
    with contextlib.suppress(OSError):
        path.unlink()


def leftovers(directory: Path) -> list[Path]:
    """Overlays in ``directory``."""
    try:
        return sorted(p for p in directory.iterdir() if p.name.endswith(SUFFIX))
    except OSError:
        return []


def sweep(directory: Path) -> list[Path]:
    """Remove every overlay in ``directory``; the ones removed."""
    found = leftovers(directory)
    for path in found:
        remove(path)
    return found


def fsync_path(path: Path) -> None:
    """Flush ``path`` (a file or a directory) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
