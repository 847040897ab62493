"""Disks of real VMs: one of its own per VM, over the shared image.

Which kind the driver says (``DriverInfo.disk``); ``create_disk`` makes either.
A qcow2 overlay (QEMU) is described here; a raw copy (a VMM that opens raw
files only, ``<vm id>.raw``) is a reflink or sparse copy of the image's root
or of the template's frozen disk (``pool.disk_copy``), made in a thread, no
process either: thin where the file system shares extents, else holding the
image's data. Both are removed with their VM and swept alike.

The image's root filesystem is never written: each VM gets its own overlay
(``<directory>/<vm id>.qcow2``), created empty on top of the image when it
cold-boots, or on top of its template's frozen overlay when it is restored
(the page cache in the snapshot matches that disk, not the bare image). An
overlay is removed with its VM; a supervisor starting up removes every
overlay a crashed one left (``sweep``), since no VM outlives its supervisor.

An empty overlay is the same file for every VM on one backing file (qcow2
holds no identity, only the backing's path, format and size): ``qemu-img``
makes it once per backing, beside the backing (``.NAME.blank-<hash>.qcow2``:
it lives and goes with the image or template it belongs to), and each VM's
overlay is a copy of it, made in a thread. No process per VM, on the restore
path or anywhere.

Errors::

    DiskError       a VM's disk could not be created
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path
from typing import Final, Literal

import trio
from fireclaw.pool.disk_copy import copy_raw
from fireclaw.pool.drivers.base import DiskFormat
from fireclaw.pool.runner import ProgramFailed, run_program

SUFFIX: Final = ".qcow2"
RAW_SUFFIX: Final = ".raw"
#: The file name ending of a VM's own disk of each kind.
SUFFIXES: Final = {DiskFormat.QCOW2_OVERLAY: SUFFIX, DiskFormat.RAW_COPY: RAW_SUFFIX}
#: ``.NAME.blank-<hash>.qcow2``: the blank overlay of the backing file NAME.
BLANK_INFIX: Final = ".blank-"
QEMU_IMG: Final = "qemu-img"
_TIMEOUT: Final = 30.0
_PREREAD_CHUNK: Final = 1 << 20


class DiskError(Exception):
    """A VM's disk could not be created."""


async def create_disk(
    path: Path, source: Path, disk_format: DiskFormat, *, from_template: bool
) -> Path:
    """Create ``path``, a VM's own disk of ``disk_format`` made from ``source``:
    the image's root (raw), or a template's frozen disk, of the same format
    (``from_template``); return it.

    A qcow2 overlay is empty, backed by ``source``; a raw copy holds all of
    ``source``, sharing its blocks where the file system can."""
    if disk_format is DiskFormat.RAW_COPY:
        await trio.to_thread.run_sync(_copy_raw, path, source)
        return path
    return await create_overlay(path, source, "qcow2" if from_template else "raw")


def _copy_raw(path: Path, source: Path) -> None:
    try:
        copy_raw(path, source)
    except OSError as exc:
        raise DiskError(f"raw disk {path.name}: {exc.strerror or exc}") from exc


async def create_overlay(
    path: Path, backing: Path, backing_format: Literal["raw", "qcow2"]
) -> Path:
    """Create ``path``, an empty qcow2 overlay on ``backing``; return it.

    Readable by root only: it will hold what the guest writes. A copy of the
    blank overlay of ``backing``, made first if there is none yet."""
    await trio.to_thread.run_sync(_copy_blank, path, backing, backing_format)
    return path


def blank_path(backing: Path, backing_format: str) -> Path:
    """Where the blank overlay of ``backing`` (resolved: the blank names it so, and
    is shared by everyone reaching it through any link) is kept: beside it, named
    by all an overlay holds of it: its path, format and size (a backing moved or
    rewritten to another size gets another blank)."""
    backing = backing.resolve()
    identity = f"{backing}\0{backing_format}\0{backing.stat().st_size}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return backing.with_name(f".{backing.name}{BLANK_INFIX}{digest}{SUFFIX}")


def _copy_blank(path: Path, backing: Path, backing_format: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        blank = blank_path(backing, backing_format)
        if not blank.exists():
            # Made aside and renamed: VMs starting at once each see a whole one.
            aside = blank.with_name(f"{blank.name}.{os.getpid()}.{os.urandom(4).hex()}")
            _create(aside, backing, backing_format, name=path.name)
            os.replace(aside, blank)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with open(blank, "rb") as source, open(fd, "wb") as target:
            shutil.copyfileobj(source, target)
    except OSError as exc:
        remove(path)
        raise DiskError(f"overlay {path.name}: {exc.strerror or exc}") from exc


def _create(path: Path, backing: Path, backing_format: str, *, name: str) -> None:
    """``qemu-img create`` of ``path``; errors name the overlay ``name`` it is for."""
    argv = [
        QEMU_IMG, "create", "-q", "-f", "qcow2",
        "-F", backing_format, "-b", str(backing.resolve()), str(path),
    ]  # fmt: skip
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        run_program(argv, timeout=_TIMEOUT)
    except OSError as exc:
        raise DiskError(f"overlay {name}: {exc.strerror or exc}") from exc
    except ProgramFailed as exc:
        remove(path)
        raise DiskError(f"overlay {name}: {exc}") from exc
    path.chmod(0o600)


def remove(path: Path) -> None:
    """Remove ``path`` if it is there; never raises (it runs on every exit path)."""
    with contextlib.suppress(OSError):
        path.unlink()


def leftovers(directory: Path) -> list[Path]:
    """VMs' own disks (overlays and raw copies) in ``directory``."""
    try:
        return sorted(p for p in directory.iterdir() if p.name.endswith((SUFFIX, RAW_SUFFIX)))
    except OSError:
        return []


def sweep(directory: Path) -> list[Path]:
    """Remove every VM's disk in ``directory``; the ones removed."""
    found = leftovers(directory)
    for path in found:
        remove(path)
    return found


def preread(paths: list[Path]) -> int:
    """Read each of ``paths`` through, so that what restores read next (a template's
    state, RAM and disk) comes from the page cache; the bytes read. Missing or
    unreadable files are passed over: this only ever saves time."""
    total = 0
    for path in paths:
        try:
            with open(path, "rb", buffering=0) as file:
                while chunk := file.read(_PREREAD_CHUNK):
                    total += len(chunk)
        except OSError:
            continue
    return total


def fsync_path(path: Path) -> None:
    """Flush ``path`` (a file or a directory) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
