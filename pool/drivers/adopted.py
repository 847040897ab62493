"""A VMM process that is not our child: one a previous supervisor started.

A restarted supervisor cannot ``wait()`` for the VMs its predecessor left
running: they were reparented (to init or a subreaper), which reaps them. It
watches each through a pidfd instead (``pidfd_open(2)``): the descriptor
becomes readable when the process exits, and signals sent through it reach
that process and never another that was given its pid later. What the exit
status was is unknowable from here, and ``wait`` says so with None.

The process is only taken when it is still the one the registry recorded
(pid + start time + boot id, checked after the descriptor is open, so the
descriptor names that very process).
"""

from __future__ import annotations

import contextlib
import os
import signal

import trio
from fireclaw.pool.drivers.base import DriverError, Running
from fireclaw.pool.procid import ProcessIdentity, still_running


class AdoptedProcess:
    """A non-child process watched through a pidfd. Close it with ``close()``."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self._fd: int | None = fd
        self.exited = False
        self._polling = False  # one task at a time may wait on the descriptor
        self._changed = trio.Event()

    @classmethod
    def open(cls, running: Running) -> AdoptedProcess:
        """The process ``running`` names; DriverError if it is gone or another one."""
        try:
            fd = os.pidfd_open(running.pid)
        except ProcessLookupError:
            raise DriverError(f"process {running.pid} is gone") from None
        except OSError as exc:
            raise DriverError(f"process {running.pid}: pidfd_open: {exc.strerror}") from exc
        ident = ProcessIdentity(
            pid=running.pid, start_time=running.start_time, boot_id=running.boot_id
        )
        if not still_running(ident):
            os.close(fd)
            raise DriverError(f"process {running.pid} is not the VMM that was recorded")
        return cls(running.pid, fd)

    @property
    def returncode(self) -> int | None:
        """Never known for a process that is not our child."""
        return None

    async def wait(self) -> None:
        """Return once the process has exited (its status is unknowable).

        Any number of tasks may wait: one polls the descriptor, the others
        wait for it to say so (or to hand the polling over, when cancelled)."""
        while not self.exited:
            if self._polling:
                await self._changed.wait()
                continue
            if self._fd is None:
                raise trio.ClosedResourceError("the process is no longer watched")
            self._polling = True
            try:
                await trio.lowlevel.wait_readable(self._fd)
                self.exited = True
            finally:
                self._polling = False
                changed, self._changed = self._changed, trio.Event()
                changed.set()

    def send_signal(self, sig: signal.Signals) -> None:
        """Signal the process itself; a no-op once it has exited."""
        if self.exited or self._fd is None:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._fd, sig)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
