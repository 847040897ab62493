"""What a ``Welcome`` asks of the machine: fresh entropy, a hostname, the clock.

A VM restored from a snapshot wakes up with its template's RNG state, name and
time; these functions make a clone its own. Each is best effort: what the
daemon may not do (not root, outside a VM) is logged, never raised.

This module imports nothing from the host side: it ships into VM images.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import socket
import time
from typing import Final

__all__ = ["RNDRESEEDCRNG", "mix_entropy", "set_clock", "set_hostname"]

log = logging.getLogger("fireclaw.guest_daemon")

#: ioctl(2) on /dev/urandom: reseed the kernel's CRNG from its input pool now.
RNDRESEEDCRNG: Final = 0x5207


def mix_entropy(entropy: bytes) -> None:
    """Stir ``entropy`` into the kernel pool, reseed the kernel CRNG, reseed ``random``.

    A clone restored from a snapshot shares its RNG state with every sibling;
    this is what makes them diverge. Writing to /dev/urandom mixes into the
    input pool without crediting and needs no privilege, but the CRNG that
    /dev/urandom and getrandom() read only draws on that pool when it next
    reseeds (up to a minute later): so, where permitted (root, as in a VM),
    force the reseed at once.
    """
    try:
        with open("/dev/urandom", "wb", buffering=0) as pool:
            pool.write(entropy)
            with contextlib.suppress(OSError):  # not root, or an old kernel
                fcntl.ioctl(pool, RNDRESEEDCRNG)
    except OSError as exc:
        log.info("cannot write /dev/urandom (%s); kernel pool not mixed", exc.strerror)
    random.seed(os.urandom(32) + entropy)


def set_hostname(name: str) -> None:
    """The VM's own name (a clone of a snapshot wakes up with the template's)."""
    try:
        socket.sethostname(name)
    except OSError as exc:
        log.warning("cannot set the hostname (%s)", exc.strerror)


def set_clock(unix_time: float) -> None:
    """Set CLOCK_REALTIME; a restored snapshot wakes up with the time it was taken."""
    try:
        time.clock_settime(time.CLOCK_REALTIME, unix_time)
    except OSError as exc:
        log.warning("cannot set the clock (%s); keeping %.3f", exc.strerror, time.time())
    else:
        log.info("clock set to %.3f", unix_time)
