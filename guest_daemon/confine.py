"""Files inside the agent's workspace, and nowhere else.

``open_in(root, path, flags)`` opens ``path`` (relative to ``root``, or
absolute under it) one component at a time from a descriptor of ``root``,
each with ``O_NOFOLLOW``: a ``..`` component, a symlink anywhere on the way
(the last component included) or a path that leaves ``root`` is refused with
``Refused``, and no rename or symlink made meanwhile can lead it outside.

The file tools run this module as a program, as the unprivileged agent user,
so that the kernel checks that user's permissions too::

    python -I confine.py read ROOT PATH LIMIT      the file (at most LIMIT bytes) on stdout
    python -I confine.py write ROOT PATH           stdin becomes the file (parents made)
    python -I confine.py append ROOT PATH LIMIT    stdin appended unless the file would
                                                   outgrow LIMIT bytes
    python -I confine.py mkdir ROOT PATH...        each folder made, with its parents

Exit status 0, or 1 with one line on stderr. It imports only the standard
library and nothing of its package, so it runs with ``-I`` from any directory.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from typing import Final

EXIT_REFUSED: Final = 1
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Refused(Exception):
    """The path is outside the root, goes through a symlink, or cannot be opened."""


def parts_in(root: str, path: str) -> list[str]:
    """The components of ``path`` below ``root``; raises Refused for ``..``, an
    absolute path not under ``root``, or nothing left to name a file."""
    if "\0" in path:
        raise Refused("a path may not contain NUL")
    if os.path.isabs(path):
        base = os.path.normpath(root)
        if path != base and not path.startswith(base.rstrip("/") + "/"):
            raise Refused(f"{path}: outside {root}")
        path = path[len(base) :]
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise Refused(f"{path}: '..' is not allowed")
    if not parts:
        raise Refused(f"{path or '(empty)'}: names no file in {root}")
    return parts


def open_in(root: str, path: str, flags: int, *, make_parents: bool = False) -> int:
    """A descriptor of ``path`` under ``root`` opened with ``flags`` (``O_NOFOLLOW``
    added). Raises Refused with one line."""
    parts = parts_in(root, path)
    try:
        fd = os.open(root, _DIR_FLAGS)
    except OSError as exc:
        raise Refused(f"{root}: {exc.strerror}") from None
    try:
        for part in parts[:-1]:
            try:
                next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not make_parents:
                    raise
                os.mkdir(part, 0o755, dir_fd=fd)
                next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        file_fd = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a symlink (or a file) on the way
            raise Refused(f"{path}: a symlink or non-directory on the way") from None
        raise Refused(f"{path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(file_fd).st_mode):
        os.close(file_fd)
        raise Refused(f"{path}: not a regular file")
    return file_fd


def mkdir_in(root: str, path: str) -> None:
    """Make the folder ``path`` under ``root`` and its parents, each step taken as
    ``open_in`` takes them; a folder already there is fine."""
    parts = parts_in(root, path)
    try:
        fd = os.open(root, _DIR_FLAGS)
    except OSError as exc:
        raise Refused(f"{root}: {exc.strerror}") from None
    try:
        for part in parts:
            try:
                next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                os.mkdir(part, 0o755, dir_fd=fd)
                next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Refused(f"{path}: a symlink or non-directory on the way") from None
        raise Refused(f"{path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def read_in(root: str, path: str, limit: int) -> bytes:
    """At most ``limit`` bytes of ``path`` under ``root``."""
    fd = open_in(root, path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as file:
        return file.read(limit)


def main(argv: list[str]) -> int:
    try:
        op, root, path = argv[0], argv[1], argv[2]
        if op == "read":
            sys.stdout.buffer.write(read_in(root, path, int(argv[3])))
        elif op == "write":
            data = sys.stdin.buffer.read()
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
            with os.fdopen(open_in(root, path, flags, make_parents=True), "wb") as file:
                file.write(data)
            sys.stdout.write(f"wrote {len(data)} bytes to {path}\n")
        elif op == "append":
            data, limit = sys.stdin.buffer.read(), int(argv[3])
            fd = open_in(root, path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            with os.fdopen(fd, "ab") as file:
                size = os.fstat(fd).st_size
                if size + len(data) > limit:
                    raise Refused(f"{path} would outgrow {limit} bytes: nothing saved")
                file.write(data)
            sys.stdout.write(f"saved to {path}\n")
        elif op == "mkdir":
            for each in argv[2:]:
                mkdir_in(root, each)
        else:
            raise Refused(f"unknown operation {op!r}")
    except Refused as exc:
        print(exc, file=sys.stderr)
        return EXIT_REFUSED
    except (IndexError, ValueError):
        print("usage: confine.py read|write|append|mkdir ROOT PATH [LIMIT]", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{exc.strerror or exc}", file=sys.stderr)
        return EXIT_REFUSED
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
