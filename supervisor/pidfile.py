"""One supervisor per state dir: an exclusive ``flock`` on a lock file.

The lock is held by an open file descriptor for the whole life of the
supervisor and is dropped by the kernel when that descriptor is closed, which
includes any crash. The descriptor is close-on-exec so that spawned VMMs do not
keep the lock alive after the supervisor is gone. The file is never unlinked:
a starter that opened the old inode while another unlinked it and created a new
one would lock a file nobody else sees, and two supervisors would run. The pid
written into the file is for people and error messages, not for locking.

Exceptions::

    PidLockError            the lock file cannot be opened, locked or written
     +-- AlreadyRunning     another process holds the lock
"""

from __future__ import annotations

import errno
import fcntl
import os
import pathlib
from types import TracebackType


class PidLockError(Exception):
    pass


class AlreadyRunning(PidLockError):
    """Another process holds the lock. ``pid`` is what it wrote in the file, if readable."""

    def __init__(self, pid: int | None, path: pathlib.Path) -> None:
        self.pid = pid
        self.path = path
        who = "pid unknown" if pid is None else f"pid {pid}"
        super().__init__(f"another fireclaw-swarm ({who}) is running: it holds {path}")


class PidLock:
    """``flock(LOCK_EX | LOCK_NB)`` on ``path``; ``acquire`` fails at once if taken.

    Also a context manager (``with PidLock(path): ...``).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = pathlib.Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock and write our pid into the file.

        Raises ``AlreadyRunning`` if another open file description holds it
        (another process, or another ``PidLock`` in this one), ``PidLockError``
        for any other failure.
        """
        if self._fd is not None:
            raise PidLockError(f"{self.path} is already locked by this PidLock")
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise PidLockError(f"cannot open lock file {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd) if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise AlreadyRunning(holder, self.path) from None
            raise PidLockError(f"cannot lock {self.path}: {exc.strerror}") from exc
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            raise PidLockError(f"cannot write pid to {self.path}: {exc.strerror}") from exc
        self._fd = fd

    def release(self) -> None:
        """Drop the lock by closing the descriptor. The file and its pid stay;
        the next holder overwrites the pid. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> PidLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    # The holder may be between ftruncate and write: an empty or partial file
    # reads as unknown rather than as a wrong pid.
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not text.isdigit():
        return None
    pid = int(text)
    return pid if pid > 0 else None
