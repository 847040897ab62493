"""Token budgets: how much the swarm and each role may spend on models per period.

The ledger (``state.Store.record_call``, written by the VMs' gateways) is the
only measure: tokens as the model server reported them. A period is a calendar
hour, day, week (from Monday) or month in UTC; what counts against a limit is
what the ledger holds since the period began.

A scope (``swarm`` or ``role:<name>``) is *exhausted* once its spend reaches
its limit. While it is: the gateways refuse its calls (``refusal``), role
groups promote no new task for it (``refusal`` + ``wait_changed``), and the
change is an event, once: ``budget_exhausted`` when it happens,
``budget_resumed`` when a reload raises the limit or a new period begins.

``Budgets.run`` sleeps until the next period begins (a cancellable trio sleep,
so it runs under a fake clock in tests) and then re-evaluates.
"""

from __future__ import annotations

import calendar
import datetime as dt
import time
from collections.abc import Callable
from typing import Final

import trio
from fireclaw.config.llm import BudgetSpec, Period
from fireclaw.supervisor.state import CallRecord, Store

__all__ = ["SWARM", "Budgets", "period_bounds"]

SWARM: Final = "swarm"
"""The scope of the whole swarm's limit; a role's scope is ``role:<name>``."""

OnEvent = Callable[[str, str, dict[str, object]], None]


def period_bounds(period: Period, now: float) -> tuple[float, float]:
    """(start, end) in unix time of the UTC calendar ``period`` holding ``now``."""
    t = dt.datetime.fromtimestamp(now, dt.UTC)
    if period == "hour":
        start = t.replace(minute=0, second=0, microsecond=0)
        end = start + dt.timedelta(hours=1)
    elif period == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + dt.timedelta(days=1)
    elif period == "week":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0) - dt.timedelta(
            days=t.weekday()
        )
        end = start + dt.timedelta(days=7)
    else:
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        days = calendar.monthrange(t.year, t.month)[1]
        end = start + dt.timedelta(days=days)
    return start.timestamp(), end.timestamp()


class Budgets:
    """The swarm's budgets over ``store``'s ledger; satisfies the gateways' ``Meter``.

    ``clock`` gives unix time (tests tie it to trio's clock). Use from the trio
    thread only."""

    def __init__(
        self,
        spec: BudgetSpec,
        store: Store,
        *,
        on_event: OnEvent | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spec = spec
        self.store = store
        self._clock = clock
        self._on_event = on_event
        self._changed = trio.Event()
        self.exhausted: dict[str, str] = {}  # scope -> why, as the gateways say it
        self._evaluate()

    # --- what the gateways and role groups ask ----------------------------------------

    def refusal(self, role: str) -> str | None:
        """Why ``role`` may not call a model now, or None."""
        return self.exhausted.get(SWARM) or self.exhausted.get(f"role:{role}")

    def record(self, call: CallRecord) -> None:
        """Add ``call`` to the ledger, and see whether it used up a limit."""
        self.store.record_call(call)
        if call.prompt_tokens or call.completion_tokens:
            self._evaluate()

    async def wait_changed(self) -> None:
        """Return at the next change of what is exhausted (a reload, a new period, a limit
        reached)."""
        await self._changed.wait()

    # --- the supervisor's side ---------------------------------------------------------

    def update(self, spec: BudgetSpec) -> None:
        """Take the limits of a reloaded config."""
        self.spec = spec
        self._evaluate()

    async def run(self) -> None:
        """Re-evaluate at the start of each period, until cancelled."""
        while True:
            _, end = period_bounds(self.spec.period, self._clock())
            # Just past the boundary, so that the clock reads the new period.
            await trio.sleep(max(0.0, end - self._clock()) + 0.001)
            self._evaluate()

    def status(self) -> dict[str, object]:
        """Limits, spend this period, and what is exhausted, for ``status``."""
        start, end = period_bounds(self.spec.period, self._clock())
        scopes: dict[str, object] = {}
        for scope, limit, role in self._limits():
            spent = self.store.spent(since=start, role=role)
            scopes[scope] = {"limit": limit, "spent": spent, "exhausted": scope in self.exhausted}
        return {"period": self.spec.period, "since": start, "until": end, "scopes": scopes}

    # --- internals -----------------------------------------------------------------------

    def _limits(self) -> list[tuple[str, int, str | None]]:
        found: list[tuple[str, int, str | None]] = []
        if self.spec.swarm is not None:
            found.append((SWARM, self.spec.swarm, None))
        found += [(f"role:{r}", n, r) for r, n in self.spec.roles.items()]
        return found

    def _evaluate(self) -> None:
        start, _ = period_bounds(self.spec.period, self._clock())
        now_exhausted: dict[str, str] = {}
        spent_of: dict[str, int] = {}
        for scope, limit, role in self._limits():
            spent = self.store.spent(since=start, role=role)
            spent_of[scope] = spent
            if spent >= limit:
                whose = "the swarm's" if role is None else f"role {role}'s"
                now_exhausted[scope] = (
                    f"{whose} budget of {limit} tokens per {self.spec.period} is spent"
                    f" ({spent} used)"
                )
        if now_exhausted.keys() == self.exhausted.keys():
            self.exhausted = now_exhausted
            return
        limits = {scope: limit for scope, limit, _ in self._limits()}
        for scope in now_exhausted.keys() - self.exhausted.keys():
            self._event(
                "budget_exhausted",
                scope,
                spent=spent_of[scope],
                limit=limits[scope],
                period=self.spec.period,
            )
        for scope in self.exhausted.keys() - now_exhausted.keys():
            self._event("budget_resumed", scope, period=self.spec.period)
        self.exhausted = now_exhausted
        self._changed.set()
        self._changed = trio.Event()

    def _event(self, kind: str, scope: str, **detail: object) -> None:
        if self._on_event is not None:
            self._on_event(kind, scope, detail)
