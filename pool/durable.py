"""Task writes that must not be lost, tried again until the disk takes them.

A task claim, a task's result and a requeue are moves the supervisor cannot
drop (the task would run twice, or never), and cannot make while the state
disk refuses writes (``StateUnwritable``: full, read-only, failing). The move
is held in memory and tried again after the project's backoff
(``backoff_delay``: full jitter, doubling up to ``RETRY.max``), so an outage
costs a few failed transactions, not a busy loop, and the move is made
within ``RETRY.max`` of the disk having room again. A cancelled wait (the
supervisor stopping) ends the hold: the task is still claimed in the
database, and the next start requeues it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Final, TypeVar

import trio
from fireclaw.config import Backoff
from fireclaw.pool.backoff import backoff_delay
from fireclaw.pool.store import PendingWrites, StateUnwritable

T = TypeVar("T")

#: Short enough that claims and results resume soon after the disk has room.
RETRY: Final = Backoff(base=0.5, max=10.0)


async def until_written(
    write: Callable[[], T],
    health: PendingWrites,
    *,
    backoff: Backoff = RETRY,
    uniform: Callable[[float, float], float] = random.uniform,
) -> T:
    """``write()``'s result, once it does not raise ``StateUnwritable``.

    While it does, the write is held (counted in ``health.pending``) and tried
    again after ``backoff_delay(backoff, n)`` for the n-th failure. Any other
    error is raised at once. Cancellable at every wait."""
    n = 0
    while True:
        try:
            return write()
        except StateUnwritable:
            pass
        health.pending += 1
        try:
            await trio.sleep(backoff_delay(backoff, n, uniform))
        finally:
            health.pending -= 1
        n += 1
