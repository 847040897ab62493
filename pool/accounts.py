"""Which of a role's accounts a task runs on, and how long a refused one rests.

A role whose CLI harness lists ``accounts`` runs each task on one of them. The
rules are sans-I/O (``choose``, ``next_return``, ``rest_until``): values in,
a decision out, no clock and no store. ``AccountBook`` is the thin part a role
group holds: it reads what the store knows (the ledger's spending of each
account this budget period, the rest each one was given, which outlives a
restart and, in a cluster, is shared by the hosts) and writes a refusal back.

Choice: **least used**. Of the accounts that are neither resting nor past
their own budget, the one with the fewest tokens in the ledger this budget
period; among equals, the one chosen longest ago (one never chosen first,
then the config's order). Not plain round-robin: one task can spend a hundred
times another's tokens, so taking turns does not spread the spending, and a
round-robin pointer lives in one process (it starts over at each restart and
differs between a cluster's hosts) where the ledger is the same for all. The
tie-break makes accounts whose calls the ledger cannot see (a CLI that does
not go through the gateway) take turns.

Rest: an account its provider refused (a rate limit, a spent quota) rests
until the time the provider gave (bounded by ``MAX_REST``), else for the
swarm's one backoff formula (``pool/backoff.py``, full jitter) over the
harness's ``account_backoff``, doubling with each refusal in a row; a task
that ends well on the account starts the count over.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from fireclaw.config import Account
from fireclaw.guest_daemon.protocol import MAX_RETRY_AFTER
from fireclaw.pool.backoff import BackoffSpec, backoff_delay

__all__ = [
    "MAX_REST",
    "AccountBook",
    "AccountState",
    "AccountStore",
    "choose",
    "next_return",
    "rest_until",
]

#: The longest rest a refusal gives, whatever the provider (or a guest) said.
MAX_REST: Final = MAX_RETRY_AFTER


@dataclass(frozen=True)
class AccountState:
    """What the choice reads of one account. Times are unix seconds;
    ``last_chosen`` is -inf for an account never chosen."""

    name: str
    spent: int = 0
    budget: int | None = None
    resting_until: float = 0.0
    last_chosen: float = -math.inf

    def over_budget(self) -> bool:
        return self.budget is not None and self.spent >= self.budget

    def usable(self, now: float) -> bool:
        return self.resting_until <= now and not self.over_budget()


def choose(accounts: Sequence[AccountState], now: float) -> str | None:
    """The account the next task runs on (see the module docstring), or None when
    every one rests or is past its budget."""
    ready = [(a.spent, a.last_chosen, i, a.name) for i, a in enumerate(accounts) if a.usable(now)]
    return min(ready)[3] if ready else None


def next_return(accounts: Sequence[AccountState], now: float) -> float | None:
    """When the first resting account within its budget takes tasks again; None when
    none will before the budget period turns (or one is usable now)."""
    if any(a.usable(now) for a in accounts):
        return None
    back = [a.resting_until for a in accounts if not a.over_budget() and a.resting_until > now]
    return min(back) if back else None


def rest_until(
    now: float,
    *,
    retry_after: float | None,
    backoff: BackoffSpec,
    refusals: int,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float:
    """Until when an account refused at ``now`` rests: ``retry_after`` seconds when the
    provider said (at most ``MAX_REST``), else the backoff's delay for the
    ``refusals``-th refusal in a row (from 0)."""
    if retry_after is not None and math.isfinite(retry_after):
        return now + min(MAX_REST, max(0.0, retry_after))
    return now + backoff_delay(backoff, refusals, uniform)


class AccountStore(Protocol):
    """The store methods an ``AccountBook`` calls (both state stores have them)."""

    def exhausted_accounts(self, role: str) -> dict[str, float]: ...

    def exhaust_account(self, role: str, name: str, *, until: float, reason: str) -> None: ...

    def account_spent(self, role: str, *, since: float) -> dict[str, int]: ...


@dataclass
class AccountBook:
    """One role's accounts: the choice, and the refusals it hears of.

    ``clock`` gives unix time; ``period_start`` the start of the current budget
    period (what an account's ``budget`` counts from)."""

    role: str
    accounts: Sequence[Account]
    backoff: BackoffSpec
    store: AccountStore
    clock: Callable[[], float]
    period_start: Callable[[], float] = lambda: 0.0
    uniform: Callable[[float, float], float] = random.uniform
    _chosen: dict[str, float] = field(default_factory=dict)
    _refusals: dict[str, int] = field(default_factory=dict)

    def states(self) -> list[AccountState]:
        """Each account as the store knows it now, in the config's order."""
        resting = self.store.exhausted_accounts(self.role)
        spent = self.store.account_spent(self.role, since=self.period_start())
        return [
            AccountState(
                name=a.name,
                spent=spent.get(a.name, 0),
                budget=a.budget,
                resting_until=resting.get(a.name, 0.0),
                last_chosen=self._chosen.get(a.name, -math.inf),
            )
            for a in self.accounts
        ]

    def take(self) -> Account | None:
        """The account for the next task, noted as chosen now; None: none is usable."""
        now = self.clock()
        name = choose(self.states(), now)
        if name is None:
            return None
        self._chosen[name] = now
        return next(a for a in self.accounts if a.name == name)

    def next_return(self) -> float | None:
        """When (unix time) the first resting account is back; see ``next_return``."""
        return next_return(self.states(), self.clock())

    def refused(self, name: str, *, retry_after: float | None, reason: str) -> float:
        """The provider refused ``name``: it rests; returns until when."""
        refusals = self._refusals.get(name, 0)
        until = rest_until(
            self.clock(),
            retry_after=retry_after,
            backoff=self.backoff,
            refusals=refusals,
            uniform=self.uniform,
        )
        self._refusals[name] = refusals + 1
        self.store.exhaust_account(self.role, name, until=until, reason=reason)
        return until

    def served(self, name: str) -> None:
        """A task ended well on ``name``: its next refusal starts the backoff over."""
        self._refusals.pop(name, None)

    def resting(self) -> Mapping[str, float]:
        """``{account: until}`` of the accounts resting now."""
        now = self.clock()
        return {s.name: s.resting_until for s in self.states() if s.resting_until > now}
