"""One supervisor per state dir: an exclusive ``flock`` on a lock file.

The lock is held by an open file descriptor for the whole life of the
supervisor and is dropped by the kernel when that descriptor is closed, which
includes any crash. The descriptor is close-on-exec so that spawned VMMs do not
keep the lock alive after the supervisor is gone. The file is never unlinked:
a starter that opened the old inode while another unlinked it and created a new
one would lock a file nobody else sees, and two supervisors would run. The pid
written into the file is for people and error messages, not for locking.

``holder(path)`` says who holds the lock without taking it (``doctor``).

Exceptions::

    PidLockError            the lock file cannot be opened, locked or written
     +-- AlreadyRunning     another process holds the lock
"""

from __future__ import annotations

import errno
import fcntl
import os
import pathlib
import signal
import threading
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

    def acquire(self, *, wait: float = 0.0) -> None:
        """Take the lock and write our pid into the file.

        With ``wait`` (seconds, main thread only: it times the wait with
        ``SIGALRM``), wait that long for a holder to let go (a supervisor handing
        over). Raises ``AlreadyRunning`` if another open file description holds it
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
            _lock(fd, wait)
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


def holder(path: str | os.PathLike[str]) -> int | None:
    """The pid of the process holding the lock on ``path``, None if nobody does.

    Read from ``/proc/locks`` without touching the lock, so a supervisor starting
    at the same moment is never turned away. Where that file cannot be read, the
    lock is tried (and dropped at once) instead; the pid then comes from the file.
    A holder whose pid is not visible here (another pid namespace) reads as the
    pid written in the file, or 0 if that is unreadable.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PidLockError(f"cannot open lock file {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        try:
            text = pathlib.Path("/proc/locks").read_text()
        except OSError:
            return _try_lock(fd)
        pid = _flock_holder(text, os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
        if pid is None:
            return None
        return pid or _read_pid(fd) or 0
    finally:
        os.close(fd)


def _flock_holder(locks: str, major: int, minor: int, inode: int) -> int | None:
    """The pid of the flock on that file in ``/proc/locks`` text (0: not visible here)."""
    device = f"{major:02x}:{minor:02x}:{inode}"
    for line in locks.splitlines():
        words = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2146342 0 EOF"; "1: -> FLOCK ..." waits.
        if len(words) >= 6 and words[1] == "FLOCK" and words[5] == device:
            return int(words[4]) if words[4].isdigit() else 0
    return None


def _try_lock(fd: int) -> int | None:
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return _read_pid(fd) or 0
        raise PidLockError(f"cannot test the lock on fd {fd}: {exc.strerror}") from exc
    fcntl.flock(fd, fcntl.LOCK_UN)
    return None


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


class _Expired(Exception):
    pass


def _lock(fd: int, wait: float) -> None:
    """``flock(LOCK_EX)`` on ``fd``: at once, or within ``wait`` seconds (EWOULDBLOCK after)."""
    if wait <= 0 or threading.current_thread() is not threading.main_thread():
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return

    def expire(signum: int, frame: object) -> None:
        raise _Expired

    previous = signal.signal(signal.SIGALRM, expire)
    try:
        signal.setitimer(signal.ITIMER_REAL, wait)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Expired:
        raise OSError(errno.EWOULDBLOCK, os.strerror(errno.EWOULDBLOCK)) from None
    finally:
        signal.signal(signal.SIGALRM, previous)
