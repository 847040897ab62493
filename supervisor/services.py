"""Managed services in the crash-only registry: stopping what a dead supervisor left.

A managed service (``ircd``: ngircd; later a local model server) is recorded in
the state database's ``services`` table before it is started, with its identity
once it runs, and dropped once it has been stopped and reaped (see
``state.ServiceRecord``). A supervisor killed with ``kill -9`` leaves its
services running, outside any process tree of the next one: this module stops
such a process (SIGTERM to its group, a bounded wait, then SIGKILL) and forgets
its row.

A stale copy is stopped rather than adopted: its output is a pipe whose reader
died with the old supervisor (so its log and readiness are lost), it runs the
old config, it is nobody's child (its exit status would be unknowable), and
every client it had came through forwarders that died with that supervisor.

Processes are named by pid + start time + boot id and waited for with a pidfd,
so a pid reused meanwhile is never signalled and nothing polls with sleeps.

Everything here blocks (``/proc``, waits of up to ``term_timeout + kill_timeout``,
SQLite): call it from a thread under trio, or before the event loop has work.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from typing import Final, Literal

from fireclaw.pool.procid import ProcessIdentity, still_running
from fireclaw.supervisor.state import ServiceRecord, Store

__all__ = [
    "KILL_TIMEOUT",
    "TERM_TIMEOUT",
    "Stopped",
    "StuckProcess",
    "identity",
    "reclaim",
    "stop",
]

TERM_TIMEOUT: Final = 5.0
"""Seconds a stale service has between SIGTERM and SIGKILL."""
KILL_TIMEOUT: Final = 5.0
"""Seconds a SIGKILLed process may take to die before it is reported as stuck."""

#: What ``stop`` found: ``gone`` (not running), ``terminated`` (it went on
#: SIGTERM) or ``killed`` (it needed SIGKILL).
Stopped = Literal["gone", "terminated", "killed"]


class StuckProcess(OSError):
    """A process still alive after SIGKILL and ``kill_timeout``."""


def identity(rec: ServiceRecord) -> ProcessIdentity | None:
    """The identity ``rec`` records; ``None`` for a row written ahead (pid 0)."""
    if rec.pid <= 0 or not rec.start_time:
        return None
    return ProcessIdentity(pid=rec.pid, start_time=rec.start_time, boot_id=rec.boot_id)


def stop(
    ident: ProcessIdentity,
    *,
    term_timeout: float = TERM_TIMEOUT,
    kill_timeout: float = KILL_TIMEOUT,
) -> Stopped:
    """Stop the process ``ident`` names, if it still runs: SIGTERM to its process
    group (or to it alone if it does not lead one), up to ``term_timeout``, then
    SIGKILL, up to ``kill_timeout``. Returns once it has exited (a zombie counts:
    its parent reaps it). Raises ``StuckProcess`` if it outlives the SIGKILL, and
    ``PermissionError`` if it is not ours to signal."""
    try:
        pidfd = os.pidfd_open(ident.pid)
    except ProcessLookupError:
        return "gone"
    try:
        # Checked with the pidfd open: if the identity still matches now, the
        # pidfd is that very process, and its pid cannot be reused under us.
        if not still_running(ident):
            return "gone"
        _signal(ident, pidfd, signal.SIGTERM)
        if _exited(pidfd, term_timeout):
            return "terminated"
        _signal(ident, pidfd, signal.SIGKILL)
        if _exited(pidfd, kill_timeout):
            return "killed"
        raise StuckProcess(f"pid {ident.pid} still alive {kill_timeout:g}s after SIGKILL")
    finally:
        os.close(pidfd)


def reclaim(store: Store, rec: ServiceRecord, **timeouts: float) -> Stopped:
    """Stop the process a registry row names (if it still runs) and drop the row.

    A row written ahead (pid 0) names no process: the copy that may have been
    started under it is found by its command line (``leftovers``)."""
    ident = identity(rec)
    outcome: Stopped = "gone" if ident is None else stop(ident, **timeouts)
    store.drop_service(rec.name)
    return outcome


def _signal(ident: ProcessIdentity, pidfd: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        # A service started with start_new_session leads its group; its helpers
        # (if any) are in it. The group is only signalled while its leader is
        # the process we name, so a reused pid's group is never hit.
        if os.getpgid(ident.pid) == ident.pid and ident.pid != os.getpgrp():
            if still_running(ident):
                os.killpg(ident.pid, signum)
                return
        signal.pidfd_send_signal(pidfd, signum)


def _exited(pidfd: int, timeout: float) -> bool:
    """Wait up to ``timeout`` s for the process of ``pidfd`` to exit."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))
