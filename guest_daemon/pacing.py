"""Pacing, sans-I/O: a token bucket, the one every rate limit here uses (IRC
output, operators' commands, a guest's control messages).

It imports only the standard library: it ships inside VM images.
"""

from __future__ import annotations

__all__ = ["TokenBucket"]


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
