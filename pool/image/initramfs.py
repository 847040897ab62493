"""The initramfs: busybox, the virtio modules in load order, and an /init that mounts the root.

Written in Python (see ``cpio``), so the build needs neither ``cpio`` nor
privileges for ``/dev/console``, which the kernel needs in the archive to give
/init a console before devtmpfs is mounted.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from importlib.resources import files

from .cpio import Entry, newc


def init_script() -> bytes:
    """The initramfs's /init (a busybox sh script)."""
    return files(__package__).joinpath("initramfs-init.sh").read_bytes()


def initramfs(busybox: bytes, modules: Sequence[tuple[str, bytes]], *, init: bytes) -> bytes:
    """A gzip-compressed newc archive that boots into ``/init``.

    ``modules`` are (file name, plain ELF) pairs in the order /init loads them.
    """
    entries = [
        Entry.directory("bin"),
        Entry.file("bin/busybox", busybox, 0o755),
        Entry.symlink("bin/sh", "busybox"),
        Entry.directory("dev"),
        Entry.char_device("dev/console", 5, 1),
        Entry.char_device("dev/null", 1, 3, 0o666),
        Entry.directory("lib"),
        Entry.directory("lib/modules"),
        *(Entry.file(f"lib/modules/{name}", data) for name, data in modules),
        Entry.file("lib/modules/load-order", "".join(f"{name}\n" for name, _ in modules).encode()),
        Entry.directory("newroot"),
        Entry.directory("proc"),
        Entry.directory("sys"),
        Entry.file("init", init, 0o755),
    ]
    # mtime=0: the same inputs give the same bytes.
    return gzip.compress(newc(entries), compresslevel=6, mtime=0)
