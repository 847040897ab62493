"""A role group's accounts: which account each task runs on, and what a refusal does.

The part of ``RoleGroup`` (``group.py``) for a CLI harness with ``accounts``;
the rules themselves are sans-I/O in ``accounts.py``. Each task is given an
account before its VM is claimed (``take``), recorded with the task, and
given to the VM's gateway with its key (``_account_for``). A refusal, heard
from the gateway (an upstream's 429 to the account's key: ``account_refused``)
or from the task's CLI (``TaskDone.limited``), rests the account and sends the
task back at no cost to its attempts (``_defer``); with every account resting
the task loop waits for the first one back (``_wait_for_account``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import trio
from fireclaw.config import Account, CliHarnessBase, Role
from fireclaw.guest_daemon import protocol as p
from fireclaw.pool.accounts import AccountBook
from fireclaw.pool.control import GuestLost
from fireclaw.pool.harness_message import PromotionError, SecretReader, account_key
from fireclaw.pool.runtime import Runtime
from fireclaw.pool.store import StateError, TaskConflict, TaskNotFound

if TYPE_CHECKING:
    from fireclaw.pool.vm import Child
    from fireclaw.pool.vm_base import ChildBase

log = logging.getLogger("fireclaw.pool")

T = TypeVar("T")


class GroupAccounts:
    """The accounts side of ``RoleGroup``. What it reads and sets is the group's;
    the declarations below name it for the type checker."""

    role: Role
    rt: Runtime
    secrets: SecretReader | None
    #: Unix time, for accounts' rests (stored, so wall-clock).
    clock: Callable[[], float]
    #: The budget period now (start, end): what an account's budget counts.
    period: Callable[[], tuple[float, float]]
    accounts: AccountBook | None
    #: When tasks wait because every account rests: until when (None: they do not).
    waiting_for_account: float | None

    if TYPE_CHECKING:

        @property
        def name(self) -> str: ...

        def changed(self) -> None: ...

        def tasks_queued(self) -> None: ...

        async def wait_changed(self) -> None: ...

        async def _written(self, write: Callable[..., T], *args: Any) -> T: ...

    def _book(self) -> None:
        """The account book of the current spec: kept across a reload (its choices
        and refusal counts), made or dropped as the role gains or loses accounts."""
        harness = self.role.harness
        if not isinstance(harness, CliHarnessBase) or not harness.accounts:
            self.accounts = None
            self.waiting_for_account = None
            return
        if self.accounts is not None:
            self.accounts.accounts = harness.accounts
            self.accounts.backoff = harness.account_backoff
            return
        self.accounts = AccountBook(
            role=self.name,
            accounts=harness.accounts,
            backoff=harness.account_backoff,
            store=self.rt.store,
            clock=self.clock,
            period_start=lambda: self.period()[0],
            uniform=self.rt.uniform,
        )

    def account_refused(
        self, account: str, *, retry_after: float | None, kind: str, task: int | None = None
    ) -> float | None:
        """``account``'s provider refused it (``kind``: rate_limit or exhausted): it
        rests, said in an event and on #control. Returns until when (None: this
        role has no such account). Called by the gateway on an upstream's 429 and
        by a task whose CLI said so."""
        book = self.accounts
        if book is None or all(a.name != account for a in book.accounts):
            return None
        now = self.clock()
        try:
            resting = book.resting().get(account)
            if resting is not None and (retry_after is None or now + retry_after <= resting):
                return resting  # already told (the gateway saw the 429 the CLI reports)
            until = book.refused(account, retry_after=retry_after, reason=kind)
        except StateError as exc:
            log.warning("%s: account %s refused, but not recorded: %s", self.name, account, exc)
            return None
        self.rt.event(
            "account_exhausted",
            self.name,
            role=self.name,
            account=account,
            refusal=kind,
            until=until,
            rest=round(until - now, 3),
            said=retry_after is not None,
            task=task,
        )
        self.changed()
        self.tasks_queued()
        return until

    def _account_refused(self, child: Child, task_id: int, done: p.TaskDone) -> bool:
        """Whether the task failed because its account was refused: the guest's CLI
        said so (``done.limited``), or the gateway saw the upstream refuse the
        account's key during it. The account rests either way; True: run it
        again on another. A task that ended well starts the account's count over."""
        account, book = child.who.account, self.accounts
        if account is None or book is None:
            return False
        if done.code == 0:
            book.served(account)
            return False
        if done.limited is not None:
            self.account_refused(
                account,
                retry_after=done.limited.retry_after,
                kind=done.limited.kind,
                task=task_id,
            )
        try:
            return account in book.resting()
        except StateError as exc:
            log.warning("task %d: whether account %s rests is unknown: %s", task_id, account, exc)
            return False

    async def _defer(self, child: Child, task_id: int, epoch: int, done: p.TaskDone) -> bool:
        """Give a task whose account was refused back to the queue, at no cost to its
        attempts: the next claim runs it on another account."""
        account = child.who.account
        reason = f"account {account} refused by its provider; runs again on another account"
        try:
            await self._written(
                partial(self.rt.store.defer_task, epoch=epoch, reason=reason), task_id
            )
        except (TaskNotFound, TaskConflict) as exc:
            log.warning("task %d: not given back: %s", task_id, exc)
            return True
        self.rt.event("task_deferred", child.name, task_id=task_id, role=self.name, account=account)
        return True

    def _account_for(self, child: ChildBase, name: str | None = None) -> Account | None:
        """The account ``child`` runs on (``name``, else the one it has, else one
        chosen now), with its key given to the child's gateway for a CLI that goes
        through it. GuestLost when there is none to be had, or its key cannot be read."""
        harness, book = self.role.harness, self.accounts
        if book is None or not isinstance(harness, CliHarnessBase):
            return None
        name = name or child.who.account
        account = harness.account(name) if name is not None else None
        if account is None:
            account = book.take()
        if account is None:
            raise GuestLost(f"{child.name}: every account of role {self.name} rests")
        key = None
        if self.secrets is not None:
            try:
                key = account_key(harness, account, self.secrets)
            except PromotionError as exc:
                raise GuestLost(f"{child.name}: {exc}") from None
        child.who.account, child.who.account_key = account.name, key
        return account

    async def _wait_for_account(self) -> None:
        """Every account rests (or is past its budget): wait until the first is back,
        or the period turns, or something changes (a reload); said once per wait."""
        assert self.accounts is not None
        back = await self._written(self.accounts.next_return)
        now = self.clock()
        until = back if back is not None else self.period()[1]
        if self.waiting_for_account is None:
            self.waiting_for_account = until
            shown = until if math.isfinite(until) else None
            self.rt.event("accounts_resting", self.name, role=self.name, until=shown)
            self.changed()
        self.waiting_for_account = until
        with trio.move_on_after(max(0.0, until - now)):
            await self.wait_changed()

    def _account_counts(self) -> dict[str, object]:
        """For ``status``: the accounts resting and until when, and whether tasks
        wait for one (a role without accounts adds nothing)."""
        if self.accounts is None:
            return {}
        try:
            resting = dict(self.accounts.resting())
        except StateError:
            resting = {}
        return {
            "accounts": [a.name for a in self.accounts.accounts],
            "accounts_resting": resting,
            "waiting_for_account": self.waiting_for_account,
        }
