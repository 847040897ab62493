"""A role group: the warm pool of one role, its claimed VMs and its task queue.

Pool children are named ``<role>-<ordinal>`` with the lowest free ordinal, and
the group keeps ``target`` of them (``pool.min_idle``, or a ``scale``
override). ``claim()`` hands out an idle child at once, marks it claimed
and wakes the reconciler, which starts a new pool child in its place (while
``max_active`` allows). Scaling down stops the highest ordinals first.

More than half of the pool children ``failed`` makes the role ``degraded``:
its refills and restarts pause until a reset or reload.

After a supervisor restart the group starts with the VMs its predecessor left
running (``Adoptee``): idle pool VMs, named agents and task runners keep their
names and are adopted before the pool is refilled. A task runner's task is
not sent again: its result is awaited from the guest that holds it, or the
task goes back to the queue when the guest does not hold it or the VM is lost.

A task runner whose CLI stopped to ask retires as after any result; the task
waits for input in the store (``pool/task_states.py``). Answered, it is
queued again, and the runner that claims it next resumes the CLI's session
with the answer, on the task's own workspace where the driver has them.

The group claims tasks for its VMs here; what a task's run records is in
``group_tasks.py``, which accounts it runs on in ``group_accounts.py``.

Errors::

    PoolError
    └── NoCapacity      the role is stopping, degraded, or has max_active 0
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Final

import trio
from fireclaw.config import Role, role_hash
from fireclaw.guest_daemon import protocol as p
from fireclaw.pool.control import GuestLost
from fireclaw.pool.group_tasks import GroupTasks
from fireclaw.pool.harness_message import SecretReader
from fireclaw.pool.lifecycle import BUSY_STATES, POOL_STATES, State
from fireclaw.pool.promotion import promotion
from fireclaw.pool.runtime import Runtime
from fireclaw.pool.spare import Spare
from fireclaw.pool.store import VmRecord
from fireclaw.pool.vm import Child
from fireclaw.pool.vm_base import AgentIdentity, ChildBase

log = logging.getLogger("fireclaw.pool")

#: Task result text kept in the state database.
_RESULT_CAP: Final = p.MAX_RESULT_BYTES
#: How long a VM whose work is done waits for the VMs booting to be up before it
#: stops: longer than a restore takes even under TCG on busy cores (about 2 s at
#: worst), shorter than a cold boot, which is not worth holding a finished VM for.
RETIRE_WAIT: Final = 5.0


class PoolError(Exception):
    """A VM could not be handed out."""


class NoCapacity(PoolError):
    pass


@dataclass(frozen=True)
class Adoptee:
    """A VM a previous supervisor left running, to be adopted by its group."""

    record: VmRecord
    agent: AgentIdentity | None = None  # a named agent's VM
    task_id: int | None = None  # a task runner's task, still claimed by it
    epoch: int = 0  # that task's claim, which every write for it carries
    account: str | None = None  # the account that task runs on


class RoleGroup(GroupTasks):
    def __init__(
        self,
        role: Role,
        runtime: Runtime,
        *,
        max_attempts: int,
        scale: int | None,
        adopt: Sequence[Adoptee] = (),
        secrets: SecretReader | None = None,
        clock: Callable[[], float] = time.time,
        period: Callable[[], tuple[float, float]] | None = None,
    ) -> None:
        self.role = role
        #: Reads a CLI harness's secrets from the host at each promotion.
        self.secrets = secrets
        self.clock = clock
        self.period = period if period is not None else (lambda: (0.0, math.inf))
        self.accounts = None
        self.waiting_for_account = None
        self.rt = runtime
        self.max_attempts = max_attempts
        self.scale_override = scale
        self.spec_hash = role_hash(role)
        self.children: dict[str, Child] = {}
        self.stopping = False
        #: The host is draining: claim no tasks, keep no warm VMs (``set_draining``).
        self.draining = False
        self._changed = trio.Event()
        self._was_degraded = False
        self._claim_waiters = 0
        self._tasks_queued = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._retiring: set[Child] = set()  # children retire() has a stop scheduled for
        self.spare = Spare(self.rt, role.name)  # the next VM's namespace and cgroup, made ahead
        self._scope = trio.CancelScope()
        self._adopt = list(adopt)
        self._book()

    @property
    def name(self) -> str:
        return self.role.name

    @property
    def target(self) -> int:
        return self.scale_override if self.scale_override is not None else self.role.pool.min_idle

    # --- views ----------------------------------------------------------------------

    def pool_children(self) -> list[Child]:
        return [
            c
            for c in self.children.values()
            if not c.claimed and not c.stopping and c.state in POOL_STATES
        ]

    def active_children(self) -> list[Child]:
        return [c for c in self.children.values() if c.claimed and not c.stopping]

    @property
    def degraded(self) -> bool:
        pool = self.pool_children()
        failed = sum(1 for c in pool if c.state is State.FAILED)
        return bool(pool) and failed * 2 > len(pool)

    def counts(self) -> dict[str, object]:
        states = [c.state for c in self.children.values()]
        templates = self.rt.templates
        return {
            "start": templates.describe(self.role) if templates is not None else "boot",
            "target": self.target,
            "min_idle": self.role.pool.min_idle,
            "max_active": self.role.pool.max_active,
            "idle": states.count(State.IDLE),
            "active": sum(1 for s in states if s in BUSY_STATES),
            "starting": states.count(State.RESTORING),
            "backoff": states.count(State.BACKOFF) + states.count(State.CRASHED),
            "failed": states.count(State.FAILED),
            "draining": states.count(State.DRAINING),
            "degraded": self.degraded,
            **self._account_counts(),
        }

    # --- change notification --------------------------------------------------------

    def changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
        self.rt.bump()
        degraded = self.degraded
        if degraded != self._was_degraded:
            self._was_degraded = degraded
            self.rt.event("degraded" if degraded else "recovered", self.name, role=self.name)

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def child_done(self, child: Child) -> None:
        if self.children.get(child.name) is child:
            del self.children[child.name]
        self.changed()

    # --- the group task ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self._scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                adopt, self._adopt = self._adopt, []
                for adoptee in adopt:
                    self._start_adopted(adoptee)
                nursery.start_soon(self._reconcile_loop)
                nursery.start_soon(self._task_loop)
                if self.spare.wanted():
                    nursery.start_soon(self.spare.run, self._cgroup_limit)
                task_status.started()

    def _cgroup_limit(self) -> int:
        """A VM's cgroup memory limit in MiB: the role's RAM and the VMM's overhead."""
        return self.role.resources.memory_mib + self.rt.vmm_overhead_mib

    def _reconcile(self) -> None:
        if self.stopping or self._nursery is None:
            return
        pool = self.pool_children()
        room = self.role.pool.max_active - len(self.active_children())
        want = max(self.target, min(self._claim_waiters, max(room, 0)))
        if self.draining:
            want = min(self._claim_waiters, max(room, 0))  # a named agent's, coming back
        if len(pool) < want and not self.degraded:
            for _ in range(want - len(pool)):
                self._spawn()
        elif len(pool) > want:
            # Highest ordinals go first; idle before active (active ones are not in the pool).
            for child in sorted(pool, key=_ordinal, reverse=True)[: len(pool) - want]:
                self._nursery.start_soon(child.stop, "scaled down")

    def _spawn(self) -> Child:
        assert self._nursery is not None
        ordinal = 0
        while f"{self.name}-{ordinal}" in self.children:
            ordinal += 1
        child = Child(f"{self.name}-{ordinal}", self, self.rt, now=trio.current_time())
        self.children[child.name] = child
        self._nursery.start_soon(child.run)
        return child

    def _start_adopted(self, adoptee: Adoptee) -> None:
        assert self._nursery is not None
        rec = adoptee.record
        child = Child(rec.name, self, self.rt, now=trio.current_time(), adopt=rec)
        child.agent = adoptee.agent
        if adoptee.account is not None:
            # Its CLI runs on: its calls still go with that account's key, and a
            # refusal it reports rests that account.
            try:
                self._account_for(child, adoptee.account)
            except GuestLost as exc:
                log.warning("%s: its account's key is not at hand: %s", child.name, exc)
        self.children[child.name] = child
        self._nursery.start_soon(child.run)
        if adoptee.task_id is not None:
            self._nursery.start_soon(self._resume_task, child, adoptee.task_id, adoptee.epoch)

    async def _reconcile_loop(self) -> None:
        while True:
            changed = self._changed
            self._reconcile()
            await changed.wait()

    # --- claims -----------------------------------------------------------------------

    def try_claim(self) -> Child | None:
        """An idle child, now claimed, or None. Never waits."""
        if len(self.active_children()) >= self.role.pool.max_active:
            return None
        for child in sorted(self.pool_children(), key=_ordinal):
            if child.state is State.IDLE:
                child.claim()  # and the reconciler refills the pool
                return child
        return None

    async def claim(self) -> Child:
        """Hand out an idle child, waiting for one to boot if none is idle.

        Bound the wait at the call site (``trio.move_on_after``)."""
        child = self.try_claim()
        if child is not None:
            return child
        self._claim_waiters += 1
        self.changed()
        try:
            while True:
                if self.stopping:
                    raise NoCapacity(f"role {self.name} is stopping")
                if self.role.pool.max_active <= 0:
                    raise NoCapacity(f"role {self.name} has max_active 0")
                if self.degraded:
                    raise NoCapacity(f"role {self.name} is degraded (most of its VMs failed)")
                child = self.try_claim()
                if child is not None:
                    return child
                await self.wait_changed()
        finally:
            self._claim_waiters -= 1

    def retire(self, child: Child, reason: str, *, done: bool = False) -> None:
        """Stop a claimed child in the background. Once: a child already stopping,
        or retiring, is left to it.

        ``done``: its work is over and nobody waits for its stop, so the stop
        gives way to the VMs booting now (for at most ``RETIRE_WAIT``): its guest
        shutting down and its QEMU exiting would take the CPU from the restore
        of the clone that replaces it."""
        if (
            self._nursery is not None
            and not self._handing_over
            and not child.stopping
            and child not in self._retiring
        ):
            self._retiring.add(child)
            self._nursery.start_soon(self._retire, child, reason, done)

    async def _retire(self, child: Child, reason: str, done: bool) -> None:
        try:
            if done:
                with trio.move_on_after(RETIRE_WAIT):
                    await self.rt.no_boots()
            if not self._handing_over:
                await child.stop(reason)
        finally:
            self._retiring.discard(child)

    def stop_task_runners(self, reason: str) -> int:
        """Stop every VM running a task, in the background; how many. Their tasks
        go back to the queue as any lost VM's do (a cluster host that lost its
        database does this: another host is about to run them)."""
        runners = [c for c in self.children.values() if c.who.task is not None and not c.stopping]
        for child in runners:
            self.retire(child, reason)
        return len(runners)

    @property
    def _handing_over(self) -> bool:
        """The supervisor is leaving its VMs to the next one (``Runtime.leaving``)."""
        return self.rt.leaving and self.rt.driver.outlives_supervisor

    # --- tasks ------------------------------------------------------------------------

    def tasks_queued(self) -> None:
        self._tasks_queued.set()

    async def _task_loop(self) -> None:
        store = self.rt.store
        while True:
            await self._tasks_queued.wait()
            self._tasks_queued = trio.Event()
            while (
                not self.stopping
                and not self.draining
                and await self._written(store.count_queued, self.name) > 0
            ):
                meter = self.rt.models.meter if self.rt.models is not None else None
                if meter is not None and meter.refusal(self.name) is not None:
                    # Over budget: the tasks stay queued until a reload or a new period.
                    await meter.wait_changed()
                    continue
                account = None
                if self.accounts is not None:
                    account = await self._written(self.accounts.take)
                    if account is None:
                        await self._wait_for_account()
                        continue
                    self.waiting_for_account = None
                try:
                    child = await self.claim()
                except PoolError as exc:
                    log.warning("tasks for %s wait: %s", self.name, exc)
                    await self.wait_changed()
                    continue
                if self.draining:  # told while it waited for the VM
                    self.retire(child, "the host is draining")
                    continue
                # Held, unpromoted, until the claim is recorded; should it die
                # meanwhile, its promotion fails and the task is requeued.
                task = await self._written(store.claim_task, self.name, child.name)
                if task is None:
                    self.retire(child, "no task after all")
                    continue
                if account is not None:
                    child.who.account = account.name
                    await self._written(
                        partial(store.assign_account, epoch=task.epoch, account=account.name),
                        task.id,
                    )
                assert self._nursery is not None
                self._nursery.start_soon(self._run_task, child, task)
            self.waiting_for_account = None  # no task is left to wait

    def promotion_for(self, child: ChildBase) -> p.Promote:
        """What makes ``child`` an agent of this role, from the current spec. A role
        with accounts runs it on the account its task was given, else (a named
        agent) on one chosen now; GuestLost when none is usable."""
        account = self._account_for(child)
        return promotion(
            self.role,
            vm_name=child.name,
            agent=child.agent,
            irc=self.rt.irc,
            irc_endpoint=child.irc_endpoint,
            model_endpoint=child.model_endpoint,
            secrets=self.secrets,
            account=account,
        )

    async def invoke(self, agent: AgentIdentity) -> Child:
        """Make a pooled VM the named agent ``agent``; it stays until destroyed.

        Bound the wait for a VM at the call site."""
        child = await self.claim()
        child.agent = agent
        self.rt.event("invoked", agent.name, role=self.name, vm=child.name)
        await self.retune(child)
        return child

    async def retune(self, child: Child) -> None:
        """Promote ``child`` again with its current identity (a new model or persona)."""
        if child.session is None or child.state not in (State.IDLE, State.ACTIVE):
            return  # it is (re)booting: it is promoted with the new identity once back
        try:
            await child.promote(self.promotion_for(child))
        except GuestLost:
            pass  # the VM died; the child restarts it and promotes it again itself

    def find_agent(self, name: str) -> Child | None:
        for child in self.children.values():
            if child.agent is not None and child.agent.name == name and not child.stopping:
                return child
        return None

    async def hot_reload(self) -> None:
        """Send the new model and persona to every agent at work, without a restart."""
        for child in list(self.children.values()):
            if child.promoted_as is not None and child.state is State.ACTIVE:
                try:
                    await child.promote(self.promotion_for(child))
                except GuestLost:
                    pass  # the child's own task sees the loss and handles it
                self.rt.event("hot_reloaded", child.name, role=self.name)

    # --- changes from outside -----------------------------------------------------------

    def set_draining(self, draining: bool) -> None:
        """Drain (claim no tasks, stop the warm VMs; those at work finish, and
        a named agent may still come back) or stop draining (claim again,
        refill the pool)."""
        self.draining = draining
        self.changed()
        if not draining:
            self.tasks_queued()

    def running_tasks(self) -> int:
        """VMs of this group running a task now."""
        return sum(1 for c in self.children.values() if c.who.task is not None)

    def set_scale(self, n: int | None) -> None:
        self.scale_override = n
        self.changed()

    def update(self, role: Role) -> None:
        """Take a new spec for this role (reload); new incarnations use it."""
        self.role = role
        self.spec_hash = role_hash(role)
        self._book()
        for child in self.children.values():
            child.tracker.policy = role.restart
        self.changed()

    def reset(self) -> int:
        n = 0
        for child in self.children.values():
            if child.state in (State.FAILED, State.BACKOFF):
                child.reset()
                n += 1
        self.changed()
        return n

    async def roll(self) -> None:
        """Replace the pool children one at a time (after a spec change).

        The next child is stopped only once the previous one's replacement is
        idle (or after the boot timeout), so the pool is never more than one idle
        VM short of what it had."""
        for child in sorted(self.pool_children(), key=_ordinal):
            if child.state is State.FAILED:
                child.reset()
            idle_before = self._idle_count()
            await child.stop("role changed")
            with trio.move_on_after(self.rt.control.boot_timeout):
                # Another idle VM already there does not count: it is next in line.
                while self._idle_count() < min(idle_before, self.target):
                    if self.degraded or self.stopping:
                        return
                    await self.wait_changed()

    def _idle_count(self) -> int:
        return sum(1 for c in self.pool_children() if c.state is State.IDLE)

    async def stop_all(self, reason: str) -> None:
        """Stop every child concurrently; returns when all are gone."""
        self.stopping = True
        async with trio.open_nursery() as nursery:
            for child in list(self.children.values()):
                nursery.start_soon(child.stop, reason)
        self._scope.cancel()

    def snapshot(self) -> list[dict[str, object]]:
        return [c.snapshot() for c in sorted(self.children.values(), key=_ordinal)]


def _ordinal(child: Child) -> int:
    tail = child.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0
