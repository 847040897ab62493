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

Errors::

    PoolError
    └── NoCapacity      the role is stopping, degraded, or has max_active 0
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Final, TypeVar

import trio
from fireclaw.config import Role, role_hash
from fireclaw.guest_daemon import protocol as p
from fireclaw.pool import workspaces
from fireclaw.pool.control import GuestLost
from fireclaw.pool.durable import until_written
from fireclaw.pool.group_accounts import GroupAccounts
from fireclaw.pool.harness_message import SecretReader
from fireclaw.pool.lifecycle import BUSY_STATES, POOL_STATES, State
from fireclaw.pool.promotion import promotion
from fireclaw.pool.runtime import Runtime
from fireclaw.pool.store import StateError, TaskConflict, TaskNotFound, TaskRow, VmRecord
from fireclaw.pool.vm import Child
from fireclaw.pool.vm_base import AgentIdentity, ChildBase

log = logging.getLogger("fireclaw.pool")

T = TypeVar("T")

#: Task result text kept in the state database.
_RESULT_CAP: Final = p.MAX_RESULT_BYTES


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


class RoleGroup(GroupAccounts):
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
                task_status.started()

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

    def retire(self, child: Child, reason: str) -> None:
        """Stop a claimed child in the background; its work is done. Once: a child
        already stopping is left to it."""
        if self._nursery is not None and not self._handing_over and not child.stopping:
            self._nursery.start_soon(child.stop, reason)

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

    async def _written(self, write: Callable[..., T], *args: object) -> T:
        """``write(*args)``, held and tried again while the state disk refuses it."""
        return await until_written(partial(write, *args), self.rt.store.health)

    async def _run_task(self, child: Child, task: TaskRow) -> None:
        """Run ``task`` on ``child``: its prompt, or, for a task an operator answered,
        the answer given to the CLI session it stopped in."""
        task_id = task.id
        resume = task.session if task.answer is not None else None
        prompt = task.answer if task.answer is not None and resume is not None else task.prompt
        account = child.who.account
        extra = {"account": account} if account is not None else {}
        self.rt.event(
            "task_claimed",
            child.name,
            task_id=task_id,
            role=self.name,
            resumed=resume is not None,
            **extra,
        )
        child.who.task = task_id

        async def result() -> p.TaskDone:
            await child.promote(self.promotion_for(child))
            assert child.session is not None
            return await child.session.task(task_id, prompt, resume)

        await self._see_through(child, task_id, task.epoch, result)

    async def _see_through(
        self,
        child: Child,
        task_id: int,
        epoch: int,
        result: Callable[[], Awaitable[p.TaskDone]],
    ) -> None:
        """Record what ``result()`` gives, or requeue the task if the VM is lost
        meanwhile; give it back if cancelled first. The child retires either way."""
        finished = False
        try:
            done = await result()
            self.retire(child, "task finished")  # the result is held here, not in the VM
            if self._account_refused(child, task_id, done):
                finished = await self._defer(child, task_id, epoch, done)
            else:
                finished = await self._finish(child, task_id, epoch, done)
        except GuestLost as exc:
            finished = await self._requeue(child, task_id, epoch, exc.reason)
        finally:
            if not finished:
                self._give_back(task_id, epoch)
            self.retire(child, "task finished")
            self.tasks_queued()

    async def _finish(self, child: Child, task_id: int, epoch: int, done: p.TaskDone) -> bool:
        """Record a task's result, holding it until the disk takes it. True once
        the task is no longer this supervisor's to give back (also when the
        write is refused: the task was claimed again, ``TaskFenced``)."""
        store = self.rt.store
        if done.waiting is not None:
            return await self._wait_for_input(child, task_id, epoch, done.waiting)
        ok = done.code == 0
        try:
            await self._written(
                partial(
                    store.finish_task, epoch=epoch, ok=ok, exit_code=done.code, result=done.output
                ),
                task_id,
            )
        except (TaskNotFound, TaskConflict) as exc:
            log.warning("task %d: result from %s not recorded: %s", task_id, child.name, exc)
            return True
        self.rt.event("task_done", child.name, task_id=task_id, exit_code=done.code)
        await self._discard_workspace(task_id)
        return True

    async def _wait_for_input(
        self, child: Child, task_id: int, epoch: int, waiting: p.Waiting
    ) -> bool:
        """The task's CLI stopped to ask: the task waits for an operator's answer,
        holding no VM (``child`` retires as after any result)."""
        try:
            await self._written(
                partial(
                    self.rt.store.ask_task,
                    epoch=epoch,
                    question=waiting.question,
                    session=waiting.session,
                ),
                task_id,
            )
        except (TaskNotFound, TaskConflict) as exc:
            log.warning("task %d: question from %s not recorded: %s", task_id, child.name, exc)
            return True
        self.rt.event(
            "task_waiting",
            child.name,
            task_id=task_id,
            role=self.name,
            asks=waiting.kind,
            question=waiting.question,
        )
        return True

    async def _requeue(self, child: Child, task_id: int, epoch: int, reason: str) -> bool:
        """Give a task whose VM was lost back to the queue (or fail it, at its last
        attempt), holding the move until the disk takes it."""
        store = self.rt.store
        try:
            row = await self._written(
                partial(
                    store.requeue_task, epoch=epoch, reason=reason, max_attempts=self.max_attempts
                ),
                task_id,
            )
        except (TaskNotFound, TaskConflict) as exc:
            log.warning("task %d: not requeued: %s", task_id, exc)
            return True
        self.rt.event("task_requeued", child.name, task_id=task_id, reason=reason, state=row.state)
        if row.state == "failed":
            await self._discard_workspace(task_id)
        return True

    async def _discard_workspace(self, task_id: int) -> None:
        """The task is over: its CLI's session will not be resumed, its workspace goes."""
        directory = self.rt.workspaces_dir
        if directory is None:
            return
        try:
            await trio.to_thread.run_sync(workspaces.discard_task, directory, task_id)
        except (OSError, workspaces.WorkspaceError) as exc:
            log.warning("task %d: its workspace stays: %s", task_id, exc)

    def _give_back(self, task_id: int, epoch: int) -> None:
        """Cancelled (shutdown): the task is not lost, it goes back to the queue.
        In a handover it stays claimed by its VM, which runs on: the next
        supervisor adopts both, or requeues the task if the VM is gone. So it does
        when this write fails (the disk refuses it): the task stays claimed, and
        the next start requeues it."""
        if self._handing_over:
            return
        try:
            self.rt.store.requeue_task(
                task_id, epoch=epoch, reason="supervisor stopped", max_attempts=self.max_attempts
            )
        except StateError as exc:
            log.warning("task %d stays claimed for the next start to requeue: %s", task_id, exc)

    async def _resume_task(self, child: Child, task_id: int, epoch: int) -> None:
        """Finish a task an adopted task runner holds: its result is awaited, once.

        The guest says in its Hello which tasks it holds; one it does not hold, or
        a VM lost before it reports, sends the task back to the queue."""

        async def result() -> p.TaskDone:
            while child.session is None or child.state not in (State.IDLE, State.ACTIVE):
                if child.done.is_set():
                    raise GuestLost(f"{child.name} was not adopted: {child.reason or 'gone'}")
                await self.wait_changed()
            session = child.session
            if not session.holds(task_id):
                raise GuestLost(f"{child.name}'s guest does not hold task {task_id}")
            self.rt.event("task_resumed", child.name, task_id=task_id, role=self.name)
            return await session.result(task_id)

        await self._see_through(child, task_id, epoch, result)

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
