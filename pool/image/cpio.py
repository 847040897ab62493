"""A writer for the cpio "newc" format, the one the Linux kernel unpacks as initramfs.

Every member is owned by root with mtime 0, so the same members always give
the same bytes, and device nodes need no privilege to create.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member. ``mode`` includes the file type bits (``stat.S_IFREG | 0o755``)."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)

    @classmethod
    def directory(cls, name: str, perm: int = 0o755) -> Entry:
        return cls(name, stat.S_IFDIR | perm)

    @classmethod
    def file(cls, name: str, data: bytes, perm: int = 0o644) -> Entry:
        return cls(name, stat.S_IFREG | perm, data)

    @classmethod
    def symlink(cls, name: str, target: str) -> Entry:
        return cls(name, stat.S_IFLNK | 0o777, target.encode())

    @classmethod
    def char_device(cls, name: str, major: int, minor: int, perm: int = 0o600) -> Entry:
        return cls(name, stat.S_IFCHR | perm, rdev=(major, minor))


def newc(entries: Iterable[Entry]) -> bytes:
    """The uncompressed newc archive of ``entries``, in order, with its trailer.

    Names are relative (``bin/sh``, not ``/bin/sh``); parents must come before
    their children, as the kernel creates members in archive order.
    """
    out = bytearray()
    for ino, entry in enumerate(entries, start=1):
        name = entry.name.strip("/")
        if not name or name == _TRAILER:
            raise ValueError(f"invalid cpio member name {entry.name!r}")
        if entry.data and not (stat.S_ISREG(entry.mode) or stat.S_ISLNK(entry.mode)):
            raise ValueError(f"cpio member {name!r}: only files and symlinks carry data")
        _member(out, ino, entry.mode, name, entry.data, entry.rdev)
    _member(out, 0, 0, _TRAILER, b"", (0, 0))
    return bytes(out)


def _member(
    out: bytearray, ino: int, mode: int, name: str, data: bytes, rdev: tuple[int, int]
) -> None:
    encoded = name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    out += _MAGIC + b"".join(b"%08X" % value for value in fields)
    out += encoded
    _pad(out)
    out += data
    _pad(out)


def _pad(out: bytearray) -> None:
    out += b"\0" * (-len(out) % 4)
