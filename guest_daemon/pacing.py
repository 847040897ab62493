"""Pacing, sans-I/O: a token bucket, the one every rate limit here uses (IRC
output, operators' commands, a guest's control messages), and ``full_jitter``,
the one retry delay (restarts, template attempts, IRC reconnects).

It imports only the standard library: it ships inside VM images.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Final

__all__ = ["MAX_EXPONENT", "TokenBucket", "full_jitter"]

#: ``n`` stops growing here: ``2.0**64`` is finite, and any sane cap is reached
#: long before.
MAX_EXPONENT: Final = 64


def full_jitter(
    n: int, base: float, cap: float, uniform: Callable[[float, float], float] = random.uniform
) -> float:
    """The wait before try ``n`` (from 0) after a failure: ``uniform(0, min(cap,
    base * 2**n))``. Full jitter, so that many clients failing at once do not
    come back at once."""
    return uniform(0.0, min(cap, base * 2.0 ** min(max(n, 0), MAX_EXPONENT)))


class TokenBucket:
    """``rate`` events per second on average, up to ``burst`` at once. Ask first
    (``delay``) then ``take``, or both at once with ``try_take``."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._stamp = now

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now

    def delay(self, now: float) -> float:
        """Seconds until one event may go (0 if one may go now)."""
        self._refill(now)
        missing = 1.0 - self._tokens
        return 0.0 if missing <= 1e-9 else missing / self.rate

    def take(self, now: float) -> None:
        """Account for one event at ``now`` (even one that had to wait)."""
        self._refill(now)
        self._tokens -= 1.0

    def try_take(self, now: float) -> bool:
        """Take one event at ``now`` if the bucket allows it now; whether it did."""
        if self.delay(now) > 0:
            return False
        self.take(now)
        return True
