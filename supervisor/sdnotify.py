"""systemd readiness notifications over ``$NOTIFY_SOCKET``, without libsystemd.

The protocol (sd_notify(3)): one datagram to the AF_UNIX socket named in
``$NOTIFY_SOCKET``, holding newline-separated ``KEY=VALUE`` fields. A leading
``@`` in the name means the Linux abstract namespace.

Notifications are best effort: nothing here raises for a missing or dead
listener, and nothing blocks for a slow one (the senders run on the event
loop, and a full datagram queue would stop the whole supervisor). Every
sender returns ``True`` when the datagram was sent and ``False`` when
``$NOTIFY_SOCKET`` is unset or the send failed or would have waited.
"""

from __future__ import annotations

import os
import socket
import time


def notify(*fields: str) -> bool:
    """Send ``fields`` (each ``KEY=VALUE``) in one datagram to ``$NOTIFY_SOCKET``."""
    name = os.environ.get("NOTIFY_SOCKET", "")
    if not name or not fields:
        return False
    address = "\0" + name[1:] if name.startswith("@") else name
    try:
        kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        with socket.socket(socket.AF_UNIX, kind) as sock:
            sock.sendto("\n".join(fields).encode(), address)
    except OSError:
        return False
    return True


def ready(status: str | None = None) -> bool:
    """``READY=1``, with an optional ``STATUS=`` line."""
    if status is None:
        return notify("READY=1")
    return notify("READY=1", _status_field(status))


def reloading() -> bool:
    """``RELOADING=1`` with the ``MONOTONIC_USEC=`` that ``Type=notify-reload`` requires.
    Send ``ready()`` when the reload is done."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def stopping() -> bool:
    return notify("STOPPING=1")


def watchdog() -> bool:
    """Ping the service watchdog (``WATCHDOG=1``)."""
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    """Set the one-line status that ``systemctl status`` shows."""
    return notify(_status_field(text))


def extend_timeout(seconds: float) -> bool:
    """Ask for ``seconds`` more before the start/stop/reload timeout fires."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds, or ``None`` when the watchdog is off or is
    meant for another process (``$WATCHDOG_PID`` names a different pid). Ping at
    about half of it."""
    raw_pid = os.environ.get("WATCHDOG_PID")
    if raw_pid is not None:
        try:
            if int(raw_pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 1_000_000


def _status_field(text: str) -> str:
    # A newline would start a new field that the listener would parse as KEY=VALUE.
    return "STATUS=" + " ".join(text.splitlines())
