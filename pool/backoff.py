"""Restart decisions for one child: restart type, backoff and the circuit breaker.

Sans-I/O: no clock reads, no sleeping. The caller passes ``now`` (any monotonic
clock in seconds), tells the tracker when the child became ready and when it
exited, and gets back a ``Decision``: restart or not, after how long, and
whether the child is now ``failed``.

The rules (docs: SUPERVISION.md, "Children", "Backoff", "Intensity"):

- ``temporary`` children are never restarted; ``transient`` ones only after a
  failure; ``permanent`` ones always. A fatal exit code is never restarted and
  marks the child failed.
- A child that was ready for at least ``stable_after`` before it died restarts
  at once. Ready for at least ``reset_after``: the consecutive-failure counter
  ``n`` goes back to 0 first. A child that never became ready is not stable.
- Otherwise the delay is ``uniform(0, min(backoff.max, backoff.base * 2**n))``
  (full jitter), and ``n`` grows by one.
- More than ``max_restarts`` restarts within ``window`` seconds opens the
  circuit: the child is failed and stays failed until ``reset()``.

This module raises no exceptions of its own.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import Protocol

# MAX_EXPONENT: also where the tracker's ``n`` stops growing.
from fireclaw.guest_daemon.pacing import MAX_EXPONENT as MAX_EXPONENT
from fireclaw.guest_daemon.pacing import full_jitter


class BackoffSpec(Protocol):
    """What the tracker reads from ``fireclaw.config.Backoff``."""

    @property
    def base(self) -> float: ...

    @property
    def max(self) -> float: ...


class RestartPolicyLike(Protocol):
    """What the tracker reads from ``fireclaw.config.RestartPolicy``."""

    @property
    def policy(self) -> str: ...

    @property
    def max_restarts(self) -> int: ...

    @property
    def window(self) -> float: ...

    @property
    def stable_after(self) -> float: ...

    @property
    def reset_after(self) -> float: ...

    @property
    def fatal_exit_codes(self) -> Container[int]: ...

    @property
    def backoff(self) -> BackoffSpec: ...


class ExitClass(enum.Enum):
    CLEAN = "clean"
    FAILURE = "failure"
    FATAL = "fatal"


def classify_exit(code: int | None, policy: RestartPolicyLike) -> ExitClass:
    """0 is clean, a code in ``fatal_exit_codes`` is fatal, anything else (or an
    unknown status, ``None``, as for an adopted process) is a failure."""
    if code is None:
        return ExitClass.FAILURE
    if code == 0:
        return ExitClass.CLEAN
    if code in policy.fatal_exit_codes:
        return ExitClass.FATAL
    return ExitClass.FAILURE


def backoff_delay(
    backoff: BackoffSpec, n: int, uniform: Callable[[float, float], float] = random.uniform
) -> float:
    """The wait before try ``n`` (from 0) after a failure: full jitter,
    ``uniform(0, min(backoff.max, backoff.base * 2**n))`` (``full_jitter``, the
    one retry formula, shared with the guest), with the bounds of ``backoff``."""
    return full_jitter(n, backoff.base, backoff.max, uniform)


@dataclass(frozen=True)
class Decision:
    """What to do after an exit. ``delay`` is seconds to wait before restarting
    (0.0 when ``restart`` is false); ``failed`` means report the child as failed."""

    restart: bool
    delay: float
    failed: bool
    reason: str


class RestartTracker:
    """Backoff and intensity state of one child. Not thread-safe; one per child."""

    def __init__(
        self,
        policy: RestartPolicyLike,
        *,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.policy = policy  # replaced in place on reload; the history is kept
        self._uniform = uniform
        self._ready_since: float | None = None
        self._restarts: deque[float] = deque()
        self.failed = False
        self.consecutive = 0

    def ready(self, now: float) -> None:
        """The child became ready. Readiness is continuous until it exits, so a
        second call (idle -> active) keeps the first start."""
        if self._ready_since is None:
            self._ready_since = now

    def exited(self, now: float, exit_class: ExitClass) -> Decision:
        """The child exited at ``now``; decide whether and when to restart it."""
        ready_for = None if self._ready_since is None else now - self._ready_since
        self._ready_since = None
        policy = self.policy

        if policy.policy == "temporary":
            return Decision(restart=False, delay=0.0, failed=False, reason="temporary")
        if self.failed:
            return Decision(restart=False, delay=0.0, failed=True, reason="circuit open")
        if exit_class is ExitClass.FATAL:
            self.failed = True
            return Decision(restart=False, delay=0.0, failed=True, reason="fatal exit")
        if policy.policy == "transient" and exit_class is ExitClass.CLEAN:
            return Decision(restart=False, delay=0.0, failed=False, reason="clean exit")

        self._expire(now)
        if len(self._restarts) >= policy.max_restarts:
            self.failed = True
            return Decision(
                restart=False,
                delay=0.0,
                failed=True,
                reason=f"more than {policy.max_restarts} restarts in {policy.window:g}s",
            )
        self._restarts.append(now)

        if ready_for is not None and ready_for >= policy.reset_after:
            self.consecutive = 0
        if ready_for is not None and ready_for >= policy.stable_after:
            return Decision(restart=True, delay=0.0, failed=False, reason="stable run")

        delay = backoff_delay(policy.backoff, self.consecutive, self._uniform)
        self.consecutive = min(self.consecutive + 1, MAX_EXPONENT)
        return Decision(restart=True, delay=delay, failed=False, reason="backoff")

    def reset(self) -> None:
        """Forget everything: close the circuit, ``n`` to 0, empty the window."""
        self.failed = False
        self.consecutive = 0
        self._restarts.clear()
        self._ready_since = None

    def restarts_in_window(self, now: float) -> int:
        """Restarts granted within the last ``window`` seconds before ``now``."""
        self._expire(now)
        return len(self._restarts)

    def _expire(self, now: float) -> None:
        horizon = now - self.policy.window
        while self._restarts and self._restarts[0] <= horizon:
            self._restarts.popleft()
