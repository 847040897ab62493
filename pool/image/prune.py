"""Removing old images from an image cache, safely while other processes use it.

Every change of an image's inputs makes a new ``<cache_dir>/<key[:16]>/`` of a
few hundred MiB; ``prune_images`` removes the old ones once the current image
is ready. Several processes may share a cache (supervisors, tests), so a
directory is removed only if

- it is a whole image (``load_image``) other than the one to keep;
- it was not used within the grace period (its mtime, which ``build_image``
  touches on each use; so a just-built or just-found image of another process
  is safe even before that process locks it);
- no process uses it: ``build_image`` gives each process that gets an image a
  shared ``flock`` on its directory until it exits, and we remove only what we
  can lock exclusively (without waiting).

A removed image is first renamed aside to ``.old-<name>-<random>``, so nobody
ever finds half of one under its own name; an aside left by a killed prune is
removed by the next. ``.build-*`` directories of killed builds, and downloaded
kernel packages that no image left was made from, are removed only while
nobody holds the cache's build lock, that is while no build is running.

Nothing here raises for a directory it cannot remove: that is reported through
``progress`` and the rest goes on.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec

from . import build, kernel, rootfs

#: How long after its last use another image is left alone.
GRACE_SECONDS: Final = 600.0

ASIDE_PREFIX: Final = ".old-"
BUILD_PREFIX: Final = ".build-"


@dataclass(frozen=True)
class Removed:
    """A directory or file ``prune_images`` removed, and the disk space it took."""

    path: Path
    size: int  # bytes allocated on disk


def prune_images(
    images_dir: Path,
    keep_key: str,
    progress: build.Progress,
    *,
    grace: float = GRACE_SECONDS,
    now: float | None = None,
) -> list[Removed]:
    """Remove the images in ``images_dir`` other than ``keep_key``'s, and build leftovers.

    Keeps ``keep_key``'s image (the full key, or its 16-character directory
    name), anything that is not a whole image, images used within ``grace``
    seconds of ``now`` (default: the time now) and images another process
    holds. Reports each removal through ``progress``, one line each, like
    ``removed old image 1234abcd5678ef90 (412 MiB)``, and each failure likewise.
    Blocking; never raises for what it cannot list or remove.
    """
    now = time.time() if now is None else now
    try:
        entries = sorted(images_dir.iterdir())
    except FileNotFoundError:
        return []
    except OSError as exc:
        progress(f"image prune: cannot list {images_dir}: {exc.strerror or exc}")
        return []
    removed: list[Removed] = []
    kernels: set[str] = set()  # of the images that stay
    for entry in entries:
        if entry.name.startswith(ASIDE_PREFIX):
            _remove(entry, f"leftover {entry.name}", progress, removed)
            continue
        if entry.name.startswith(".") or entry.is_symlink() or not entry.is_dir():
            continue
        stored = _whole_image(entry)
        if stored is None:
            continue  # not an image, or not a whole one: not ours to judge
        try:
            age = now - entry.stat().st_mtime
        except OSError:
            age = 0.0  # cannot tell: as if just used
        if entry.name == keep_key[:16] or stored.key == keep_key or age < grace:
            kernels.add(stored.inputs.kernel)
        elif not _remove(entry, f"old image {entry.name}", progress, removed):
            kernels.add(stored.inputs.kernel)  # in use, or failed: it stays
    with _try_locked(images_dir) as free:
        if free:  # no build is running: any .build-* is a killed one's
            for entry in entries:
                if entry.name.startswith(BUILD_PREFIX):
                    _remove(entry, f"unfinished build {entry.name}", progress, removed)
            for deb in sorted((images_dir / ".downloads").glob("*.deb")):
                if kernel.deb_label(deb) not in kernels:
                    _remove(deb, f"kernel package {deb.name}", progress, removed)
    return removed


def prune(cache_dir: Path, *, keep: int) -> list[Path]:
    """Remove all but the ``keep`` newest images, leftovers of crashed builds,
    and downloaded kernel packages no kept image was made from.

    Returns the paths removed. Takes the cache lock, so it never removes an
    image that a build in progress is about to rename into place; leaves an
    image that a process holds (and so any older ones too) in place.
    """
    if keep < 0:
        raise ValueError("keep must be >= 0")
    if not cache_dir.is_dir():
        return []
    removed: list[Removed] = []
    with build._locked(cache_dir):
        removed_builds = build._remove_stale_builds(cache_dir)
        images: list[tuple[float, Path, str]] = []
        for directory in sorted(cache_dir.iterdir()):
            if directory.name.startswith(ASIDE_PREFIX):
                _remove(directory, directory.name, _quiet, removed)
                continue
            if directory.name.startswith(".") or not directory.is_dir():
                continue
            stored = _manifest(directory)
            if stored is not None:
                images.append((stored.built_at, directory, stored.inputs.kernel))
        images.sort(reverse=True)
        kept = {label for _, _, label in images[:keep]}
        for _, directory, label in images[keep:]:
            if not _remove(directory, directory.name, _quiet, removed):
                kept.add(label)
        for deb in sorted((cache_dir / ".downloads").glob("*.deb")):
            if kernel.deb_label(deb) not in kept:
                _remove(deb, deb.name, _quiet, removed)
    return [*removed_builds, *(item.path for item in removed)]


def _quiet(line: str) -> None:
    """``prune``'s progress: its caller gets the paths; a failure leaves one out."""


def _manifest(directory: Path) -> build._Stored | None:
    try:
        return build._manifest_decoder.decode((directory / build.MANIFEST).read_bytes())
    except (OSError, msgspec.DecodeError):
        return None


def _whole_image(directory: Path) -> build._Stored | None:
    """The manifest of the whole image in ``directory``, or None."""
    if build.load_image(directory) is None:
        return None
    return _manifest(directory)


def _remove(path: Path, what: str, progress: build.Progress, removed: list[Removed]) -> bool:
    """Remove ``path`` unless a process holds it; report and record a removal.

    A directory is locked exclusively (without waiting: held means in use) and
    renamed aside before it is removed. True if ``path`` is gone."""
    if path.is_symlink() or not path.is_dir():
        try:
            size = _usage(path)
            path.unlink()
        except FileNotFoundError:
            return True  # another pruner was first
        except OSError as exc:
            progress(f"could not remove {what}: {exc.strerror or exc}")
            return False
        removed.append(Removed(path, size))
        progress(f"removed {what} ({_mib(size)})")
        return True
    try:
        fd = build._open_dir(path)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return True  # another pruner was first
        progress(f"could not remove {what}: {exc.strerror or exc}")
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # in use, or being removed by another pruner
        if os.stat(path, follow_symlinks=False).st_ino != os.fstat(fd).st_ino:
            return False  # removed and made again since we looked: look next time
        size = _usage(path)
        aside = path
        if not path.name.startswith("."):
            aside = path.with_name(f"{ASIDE_PREFIX}{path.name}-{secrets.token_hex(4)}")
            os.rename(path, aside)
        rootfs.remove_tree(aside)
    except OSError as exc:
        if exc.errno == errno.ENOENT and not path.exists():
            return True  # another pruner was first
        progress(f"could not remove {what}: {exc.strerror or exc}")
        return False
    finally:
        os.close(fd)
    removed.append(Removed(path, size))
    progress(f"removed {what} ({_mib(size)})")
    return True


def _usage(path: Path) -> int:
    """Bytes allocated to ``path`` and, for a directory, everything in it."""
    total = path.lstat().st_blocks * 512
    if path.is_dir() and not path.is_symlink():
        for parent, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(parent, name)).st_blocks * 512
    return total


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


@contextlib.contextmanager
def _try_locked(cache_dir: Path) -> Iterator[bool]:
    """The cache's build lock if nobody holds it (True), else at once False."""
    try:
        fd = os.open(cache_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            free = True
        except BlockingIOError:
            free = False
        yield free
    finally:
        os.close(fd)
