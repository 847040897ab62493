"""The supervisor's side of a cluster: hearing the tasks other hosts queue,
and saying that this host is alive.

Every host's role groups claim from the one shared queue, but a group looks
at the queue only when woken. A task queued through this supervisor wakes its
group at once (``controller.py``); one queued through another host's wakes
this one by PostgreSQL ``NOTIFY`` (``Store.wait_tasks``), and every ``POLL``
seconds all groups look anyway, since a notification sent while this host
was disconnected is lost.

Each ``HEARTBEAT`` seconds the host stamps its row in the hosts table with the
database's clock and its load, reads whether it is told to drain
(``fleet_side.py``), and requeues the tasks of hosts silent for longer than
``cluster.silent_after`` (one host at a time does: ``Store.requeue_silent``).
The lost host's late results are fenced off by the epoch of the new claim,
and the lost host fences itself too: out of the database for nearly
``silent_after`` (``SelfFence``), it stops the VMs running tasks, which other
hosts are about to run again.

One host at a time leads the fleet's overseers: the one holding an advisory
lock on a PostgreSQL connection kept for it (``Store.lead_fleet``), which the
others try every ``LEAD_RETRY`` seconds. Each host's overseer sits in the
linked control channel, but only the leader's obeys what is said there, so a
command given once is carried out once. A host that dies, or loses the
database, loses the connection and with it the lock.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING, Final, Literal

import trio
from fireclaw.config import Config
from fireclaw.pool.group import RoleGroup
from fireclaw.supervisor.state import HostLoad, StateError, Store

if TYPE_CHECKING:
    from fireclaw.supervisor.overseer import Overseer

log = logging.getLogger("fireclaw.supervisor")

#: Seconds between looks at the queue when no notification comes.
POLL: Final = 5.0
#: Seconds between this host's heartbeats.
HEARTBEAT: Final = 5.0
#: Seconds between tries of the lead lock by the hosts not leading (and checks
#: by the leader that it still holds it).
LEAD_RETRY: Final = 3.0


class SelfFence:
    """When a host out of the shared database must stop its task runners: once
    its last heartbeat is ``silent_after - HEARTBEAT`` seconds old, a beat before
    any other host may presume it dead, and once per outage. Sans-I/O: the
    caller passes the time of each heartbeat and whether it went through."""

    def __init__(self, silent_after: float, now: float) -> None:
        self.limit = silent_after - HEARTBEAT
        self.last_ok = now
        self.fenced = False

    def beat(self, now: float, *, ok: bool) -> bool:
        """A heartbeat at ``now``; True when the task runners must stop now."""
        if ok:
            self.last_ok, self.fenced = now, False
            return False
        if self.fenced or now - self.last_ok < self.limit:
            return False
        self.fenced = True
        return True


class Leadership:
    """Whether this host's overseer leads the fleet, from each look at the lead
    lock. Sans-I/O: the caller says whether the lock is held now; the answer is
    the change to act on, if any. Nobody leads until the lock is first held."""

    def __init__(self) -> None:
        self.leading = False

    def held(self, held: bool) -> Literal["took", "lost"] | None:
        """The lock is (or is not) held now: "took" the lead, "lost" it, or None."""
        if held == self.leading:
            return None
        self.leading = held
        return "took" if held else "lost"


class ClusterSide:
    """The cluster side of ``Supervisor`` (``daemon.py``). What it reads is the
    supervisor's; the declarations below name it for the type checker."""

    config: Config
    store: Store
    groups: dict[str, RoleGroup]

    if TYPE_CHECKING:

        def event(self, kind: str, subject: str, **detail: object) -> None: ...

        def host_load(self) -> HostLoad: ...

        def beaten(self, draining: bool) -> None: ...

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
        fence = SelfFence(silent_after, trio.current_time())
        while True:
            try:
                beat = partial(self.store.heartbeat, self.host_load())
                draining = await trio.to_thread.run_sync(beat)
                taken = await trio.to_thread.run_sync(requeue)
                fence.beat(trio.current_time(), ok=True)
                self.beaten(draining)
            except StateError as exc:
                log.debug("heartbeat not recorded: %s", exc)
                taken = []
                now = trio.current_time()
                if fence.beat(now, ok=False):
                    self._fence_self(exc, now - fence.last_ok)
            for task in taken:
                log.warning("task %d requeued: %s", task.id, task.result)
                self.event("task_requeued", f"task-{task.id}", reason=task.result, state=task.state)
            if taken:
                for group in list(self.groups.values()):
                    group.tasks_queued()
            await trio.sleep(HEARTBEAT)

    async def _lead_overseers(self, overseer: Overseer) -> None:
        """Try for the fleet's lead every ``LEAD_RETRY`` seconds, and let this
        host's overseer obey commands only while it holds it. Runs for the
        supervisor's life in cluster mode with IRC."""
        lead = Leadership()
        while True:
            held = await trio.to_thread.run_sync(self.store.lead_fleet)
            match lead.held(held):
                case "took":
                    self.event("fleet_lead", overseer.nick)
                    await overseer.take_lead()
                case "lost":
                    self.event("fleet_lead_lost", overseer.nick)
                    await overseer.lose_lead()
            await trio.sleep(LEAD_RETRY)

    def _fence_self(self, why: StateError, out_for: float) -> None:
        """Out of the database nearly long enough for other hosts to take this
        one's tasks: stop running them here, so that none runs on two hosts."""
        stopped = sum(
            group.stop_task_runners("this host lost the shared database")
            for group in list(self.groups.values())
        )
        log.warning(
            "out of the shared database for %.0f s (%s): stopped %d VMs running tasks,"
            " which other hosts will run",
            out_for,
            why,
            stopped,
        )
