"""Identify a process by pid + start time + boot id, never by pid alone.

A pid is recycled once its process is reaped; the start time (field 22 of
``/proc/PID/stat``, in clock ticks since boot) tells a new process with the
same pid apart, and the boot id tells a start time of another boot apart. The
VM registry stores these three so that a restarted supervisor adopts only the
processes it started.

Errors: absence of the process is ``None`` / ``False``, not an exception; any
other ``OSError`` from reading ``/proc`` (for instance ``hidepid``) propagates.
"""

from __future__ import annotations

import functools
import pathlib

import msgspec

_PROC = pathlib.Path("/proc")
_BOOT_ID = _PROC / "sys/kernel/random/boot_id"
# States of a process that has exited but not yet been reaped.
_DEAD_STATES = frozenset({"Z", "X", "x"})


class ProcessIdentity(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pid: int
    start_time: int
    boot_id: str


@functools.cache
def boot_id() -> str:
    """This boot's id (constant for the life of the process, hence cached)."""
    return _BOOT_ID.read_text().strip()


def process_identity(pid: int) -> ProcessIdentity | None:
    """The identity of ``pid``, or ``None`` if no such process exists. A zombie
    (exited, not reaped) still has an identity; ``still_running`` says it is dead."""
    stat = _read_stat(pid)
    if stat is None:
        return None
    return ProcessIdentity(pid=pid, start_time=stat[1], boot_id=boot_id())


def still_running(ident: ProcessIdentity) -> bool:
    """True if the very process ``ident`` names is alive: same boot, same pid,
    same start time, and not a zombie."""
    if ident.boot_id != boot_id():
        return False
    stat = _read_stat(ident.pid)
    if stat is None:
        return False
    state, start_time = stat
    return start_time == ident.start_time and state not in _DEAD_STATES


def parse_stat(text: str) -> tuple[str, int]:
    """``(state, start_time)`` from the text of ``/proc/PID/stat``.

    Field 2, ``(comm)``, may hold spaces and parentheses, so the fields are
    counted from the LAST ``)``: after it come field 3 (state) onwards.
    Raises ``ValueError`` for text that does not have that shape.
    """
    _, paren, rest = text.rpartition(")")
    fields = rest.split()
    if not paren or len(fields) < 20:
        raise ValueError(f"malformed /proc/PID/stat: {text[:80]!r}")
    return fields[0], int(fields[22 - 3])


def _read_stat(pid: int) -> tuple[str, int] | None:
    if pid <= 0:
        return None
    try:
        raw = (_PROC / str(pid) / "stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm is arbitrary bytes chosen by the process; do not let it break decoding.
    return parse_stat(raw.decode("utf-8", "surrogateescape"))
