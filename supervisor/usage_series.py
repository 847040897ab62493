"""Tokens per role over time, from the usage ledger: what the dashboard's chart draws.

The window ``[start, start + n * step)`` is cut into ``n`` buckets whose edges
are multiples of ``step`` (so two reads a moment apart agree on their edges).
The ledger is read through the controller's ``usage`` (the same sums the
``usage`` command shows, on whichever store holds them): the tokens spent
since each edge, per role. A bucket is the difference between its two edges.
The supervisor's ``usage`` does not yield to the scheduler, so the reads see
one ledger; should a call land between two reads all the same, a difference
below zero is taken as zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final, Protocol

__all__ = ["MAX_BUCKETS", "UsageSource", "bucket_edges", "buckets_from_totals", "usage_series"]

#: The most buckets one answer holds: a chart has no room for more, and each is
#: one read of the ledger, done on the supervisor's event loop.
MAX_BUCKETS: Final = 60


class UsageSource(Protocol):
    """The ledger as the controller sums it (supervisor/api.py ``Controller.usage``)."""

    async def usage(self, by: str, since: int, key: str | None) -> dict[str, object]: ...


def bucket_edges(now: float, window: int, n: int) -> tuple[int, int]:
    """``(start, step)``: ``n`` buckets of ``step`` whole seconds covering at least
    ``window`` seconds, the last one holding ``now``."""
    step = max(1, math.ceil(window / n))
    end = (int(now) // step + 1) * step
    return end - n * step, step


def buckets_from_totals(totals: Sequence[Mapping[str, int]]) -> dict[str, list[int]]:
    """Per role, the tokens of each bucket, from the totals since each of its
    ``n + 1`` edges (oldest first, the last edge in the future: all zero).
    A role with no tokens in the window is left out."""
    roles = sorted({role for t in totals for role in t})
    series: dict[str, list[int]] = {}
    for role in roles:
        row = [
            max(0, totals[i].get(role, 0) - totals[i + 1].get(role, 0))
            for i in range(len(totals) - 1)
        ]
        if any(row):
            series[role] = row
    return series


def _tokens_by_role(answer: Mapping[str, Any]) -> dict[str, int]:
    return {
        str(row["key"]): int(row.get("tokens") or 0)
        for row in answer.get("rows") or []
        if row.get("key") is not None
    }


async def usage_series(source: UsageSource, now: float, window: int, n: int) -> dict[str, object]:
    """The tokens per role in ``n`` buckets covering ``window`` seconds up to ``now``."""
    start, step = bucket_edges(now, window, n)
    totals = [_tokens_by_role(await source.usage("role", start + i * step, None)) for i in range(n)]
    totals.append({})  # the last edge is after now: nothing since
    return {
        "start": start,
        "step": step,
        "buckets": n,
        "roles": buckets_from_totals(totals),
    }
