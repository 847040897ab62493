"""A raw disk of a VM's own: a copy of a whole disk file that costs what differs.

For a VMM that opens raw files only (``DiskFormat.RAW_COPY``) each VM's root
disk is a file of its own, copied from the image's root filesystem or from
its template's disk. ``copy_raw`` makes it without a process, in the calling
thread (run it in one):

- a reflink (``FICLONE``) where the file system shares extents (XFS, btrfs,
  bcachefs): instant, and no block is used until the VM writes one;
- else a sparse copy: only the source's data extents (``SEEK_DATA`` /
  ``SEEK_HOLE``) are copied, by ``copy_file_range`` (the kernel copies, or
  shares, without a pass through user space), and the holes stay holes: a
  mostly empty ext4 image of 1 GiB costs the blocks its files use.

Everything here raises OSError (``pool.disks`` says it in one line); a copy
not finished is removed.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import os
from pathlib import Path
from typing import Final

#: linux/fs.h: ``_IOW(0x94, 9, int)``, share all of the source's extents.
FICLONE: Final = 0x40049409
#: At most this much per ``copy_file_range`` call (and per read when it is refused).
_CHUNK: Final = 64 << 20
#: What says "no reflink here": the file system cannot share extents, or not
#: between these two files. Anything else is a real failure.
_NO_REFLINK: Final = frozenset(
    {errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EXDEV, errno.ENOSYS}
)
#: What says "no copy_file_range between these files": copy through user space instead.
_NO_COPY_RANGE: Final = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})


class CopyKind(enum.Enum):
    """How ``copy_raw`` made the copy."""

    REFLINK = "reflink"
    SPARSE = "sparse copy"


def copy_raw(target: Path, source: Path) -> CopyKind:
    """Make ``target`` (new, readable by root only: it will hold what a guest
    writes) a copy of ``source`` with its holes kept; how it was made.

    Raises OSError and leaves no ``target`` when the copy fails; an existing
    ``target`` is never overwritten."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as src:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with open(fd, "wb") as dst:
                return _clone_or_copy(src.fileno(), dst.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                target.unlink()  # half a disk is no disk
            raise


def _clone_or_copy(src: int, dst: int) -> CopyKind:
    try:
        fcntl.ioctl(dst, FICLONE, src)
        return CopyKind.REFLINK
    except OSError as exc:
        if exc.errno not in _NO_REFLINK:
            raise
    _sparse_copy(src, dst)
    return CopyKind.SPARSE


def _sparse_copy(src: int, dst: int) -> None:
    """Copy each data extent of ``src`` to the same offset of ``dst``, then give
    ``dst`` the length of ``src``: what was a hole in ``src`` is one in ``dst``."""
    size = os.fstat(src).st_size
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but a hole from here to the end
                break
            raise
        end = os.lseek(src, start, os.SEEK_HOLE)
        _copy_extent(src, dst, start, end)
        offset = end
    os.ftruncate(dst, size)


def _copy_extent(src: int, dst: int, start: int, end: int) -> None:
    at = start
    while at < end:
        want = min(_CHUNK, end - at)
        try:
            done = os.copy_file_range(src, dst, want, at, at)
        except OSError as exc:
            if exc.errno not in _NO_COPY_RANGE:
                raise
            done = _copy_through(src, dst, at, want)
        if done == 0:  # the source shrank under us: what is left is a hole
            return
        at += done


def _copy_through(src: int, dst: int, at: int, length: int) -> int:
    """``length`` bytes at ``at`` through user space; the bytes copied."""
    data = os.pread(src, length, at)
    view = memoryview(data)
    while view:
        written = os.pwrite(dst, view, at + len(data) - len(view))
        view = view[written:]
    return len(data)
