"""The guest's end of a virtio-serial port: found by name, opened once, kept.

The host names the port (``virtserialport,name=NAME``); the kernel makes
``/dev/vportNpM`` and says its name in ``/sys/class/virtio-ports/vportNpM/name``
(no udev in the image to make ``/dev/virtio-ports/NAME``).

Whether a host is on the other end: the port polls ``POLLHUP`` while none is,
and a read then returns at once with nothing, so neither can wait for one.
The kernel sends ``SIGIO`` to the port's owner (``F_SETOWN``, ``O_ASYNC``)
when the host end opens or closes: ``Port.host_here`` waits for that signal
and checks again, never spinning. ``O_ASYNC`` is on only while it waits: with
a host on the port the kernel would also signal every frame the host sends.

This module imports only trio and the standard library: it ships inside VM images.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import trio

__all__ = ["SYS_PORTS", "Port", "PortError", "find_port", "open_port"]

SYS_PORTS: Final = Path("/sys/class/virtio-ports")
DEV: Final = Path("/dev")


class PortError(OSError):
    """The port could not be found or opened."""


def find_port(name: str, sys_ports: Path = SYS_PORTS) -> str | None:
    """The device name (``vport0p1``) of the port called ``name``, or None."""
    try:
        entries = sorted(sys_ports.iterdir())
    except OSError:
        return None
    for entry in entries:
        try:
            if (entry / "name").read_text().strip() == name:
                return entry.name
        except OSError:
            continue
    return None


class Port:
    """One open port: ``stream`` to read and write, ``host_here`` to wait for a host."""

    def __init__(self, fd: int, sigio: AsyncIterator[int]) -> None:
        self.stream = trio.lowlevel.FdStream(fd)
        self._fd = fd
        self._sigio = sigio

    def host_connected(self) -> bool:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN | select.POLLHUP)
        return not any(mask & select.POLLHUP for _, mask in poller.poll(0))

    async def host_here(self) -> None:
        """Return once a host is on the other end (at once if one is).

        ``O_ASYNC`` goes on before the first look, so a host that comes between
        the look and the wait is still signalled, and off again on return."""
        if self.host_connected():
            return
        self._signal_me(True)
        try:
            while not self.host_connected():
                await self._sigio.__anext__()
        finally:
            self._signal_me(False)

    def _signal_me(self, on: bool) -> None:
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        flags = flags | os.O_ASYNC if on else flags & ~os.O_ASYNC
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags)


@asynccontextmanager
async def open_port(name: str) -> AsyncIterator[Port]:
    """Open the port called ``name``; PortError if there is none. (The image's init
    waits for the port to be named before it starts the daemon.)"""
    with trio.open_signal_receiver(signal.SIGIO) as sigio:
        device = find_port(name)
        if device is None:
            raise PortError(f"no virtio-serial port named {name} in {SYS_PORTS}")
        try:
            fd = os.open(DEV / device, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise PortError(f"port {name} ({DEV / device}): {exc.strerror}") from None
        # SIGIO tells us when the host end opens or closes, to this process, while
        # ``host_here`` asks for it (its receiver is open already: the signal's
        # default action would end the daemon).
        fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
        port = Port(fd, sigio)
        async with port.stream:
            yield port
