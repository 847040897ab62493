"""The supervisor's side of a cluster: hearing the tasks other hosts queue,
and saying that this host is alive.

Every host's role groups claim from the one shared queue, but a group looks
at the queue only when woken. A task queued through this supervisor wakes its
group at once (``controller.py``); one queued through another host's wakes
this one by PostgreSQL ``NOTIFY`` (``Store.wait_tasks``), and every ``POLL``
seconds all groups look anyway, since a notification sent while this host
was disconnected is lost.

Each ``HEARTBEAT`` seconds the host stamps its row in the hosts table with the
database's clock, and requeues the tasks of hosts silent for longer than
``cluster.silent_after`` (one host at a time does: ``Store.requeue_silent``).
The lost host's late results are fenced off by the epoch of the new claim.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING, Final

import trio
from fireclaw.config import Config
from fireclaw.pool.group import RoleGroup
from fireclaw.supervisor.state import StateError, Store

log = logging.getLogger("fireclaw.supervisor")

#: Seconds between looks at the queue when no notification comes.
POLL: Final = 5.0
#: Seconds between this host's heartbeats.
HEARTBEAT: Final = 5.0


class ClusterSide:
    """The cluster side of ``Supervisor`` (``daemon.py``). What it reads is the
    supervisor's; the declarations below name it for the type checker."""

    config: Config
    store: Store
    groups: dict[str, RoleGroup]

    if TYPE_CHECKING:

        def event(self, kind: str, subject: str, **detail: object) -> None: ...

    async def _hear_tasks(self) -> None:
        """Wake the groups of the roles any host queued tasks for, and all of
        them every ``POLL`` seconds. Runs for the supervisor's life in cluster mode."""
        wait = partial(self.store.wait_tasks, POLL)
        while True:
            try:
                roles = await trio.to_thread.run_sync(wait, abandon_on_cancel=True)
            except StateError as exc:
                # The task moves report an unreachable database; here it only
                # means polling until it answers again.
                log.debug("not hearing queued tasks: %s", exc)
                roles = set()
                await trio.sleep(POLL)
            for name, group in list(self.groups.items()):
                if not roles or name in roles:
                    group.tasks_queued()

    async def _heartbeats(self) -> None:
        """Stamp this host alive now and every ``HEARTBEAT`` seconds, and take
        back the tasks of hosts gone silent, for the supervisor's life in
        cluster mode. A beat the database does not take is skipped: the next
        one says the same."""
        assert self.config.cluster is not None
        silent_after = self.config.cluster.silent_after
        requeue = partial(
            self.store.requeue_silent,
            silent_after=silent_after,
            max_attempts=self.config.task_max_attempts,
        )
        while True:
            try:
                await trio.to_thread.run_sync(self.store.heartbeat)
                taken = await trio.to_thread.run_sync(requeue)
            except StateError as exc:
                log.debug("heartbeat not recorded: %s", exc)
                taken = []
            for task in taken:
                log.warning("task %d requeued: %s", task.id, task.result)
                self.event("task_requeued", f"task-{task.id}", reason=task.result, state=task.state)
            if taken:
                for group in list(self.groups.values()):
                    group.tasks_queued()
            await trio.sleep(HEARTBEAT)
