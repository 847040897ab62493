"""A role group's tasks: running one on a claimed VM, and what its end records.

The part of ``RoleGroup`` (``group.py``) between a task claimed for a VM and
the task's row in the store: ``_run_task`` promotes the VM and sends the task,
``_resume_task`` awaits the result an adopted task runner holds, and
``_see_through`` records what either gives (``_finish``; ``_wait_for_input``
for a CLI that stopped to ask; ``_defer`` in ``group_accounts.py`` for a
refused account) or requeues the task when the VM is lost (``_requeue``). A
cancelled task goes back to the queue (``_give_back``), except in a handover.
The VM retires after its task either way.

Every write waits until the state disk takes it (``_written``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, TypeVar

import trio
from fireclaw.guest_daemon import protocol as p
from fireclaw.pool import workspaces
from fireclaw.pool.control import GuestLost
from fireclaw.pool.durable import until_written
from fireclaw.pool.group_accounts import GroupAccounts
from fireclaw.pool.lifecycle import State
from fireclaw.pool.store import StateError, TaskConflict, TaskNotFound, TaskRow

if TYPE_CHECKING:
    from fireclaw.pool.vm import Child
    from fireclaw.pool.vm_base import ChildBase

log = logging.getLogger("fireclaw.pool")

T = TypeVar("T")


class GroupTasks(GroupAccounts):
    """The task side of ``RoleGroup``, on top of its accounts side. What it reads
    and sets is the group's; the declarations below name it for the type checker."""

    #: Runs a task gets: a VM lost on its last attempt fails it, not requeues it.
    max_attempts: int

    if TYPE_CHECKING:

        def retire(self, child: Child, reason: str, *, done: bool = False) -> None: ...

        def promotion_for(self, child: ChildBase) -> p.Promote: ...

        @property
        def _handing_over(self) -> bool: ...

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
            # The result is held here, not in the VM.
            self.retire(child, "task finished", done=True)
            if self._account_refused(child, task_id, done):
                finished = await self._defer(child, task_id, epoch, done)
            else:
                finished = await self._finish(child, task_id, epoch, done)
        except GuestLost as exc:
            finished = await self._requeue(child, task_id, epoch, exc.reason)
        finally:
            if not finished:
                self._give_back(task_id, epoch)
            self.retire(child, "task finished", done=True)
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
