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

A leader cut off the network cannot be told it lost the lock: the database
frees it once that connection has been silent long enough (the server's
keepalives on it, ``state_pg_db.HOLDER_SILENCE``), and another host takes it
at its next try. So a lead is a lease (``LEAD_LEASE``): good from the start of
the look that found the lock held, for less time than the server waits, and
the overseer stops obeying when it runs out, whether or not its next look
has answered. The old leader has stopped before a new one can start.
"""

from __future__ import annotations

import logging
import math
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
#: Seconds a look that found the lock held lets the overseer lead, from the start
#: of that look: a retry period and a look that takes as long again. Shorter
#: than the silence after which the database frees the lock of a host cut off
#: (``state_pg_db.HOLDER_SILENCE``), so that two overseers never lead at once.
LEAD_LEASE: Final = 2 * LEAD_RETRY


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
    lock and the lease each look that found it held gives (``LEAD_LEASE``).
    Sans-I/O: the caller says what a look found and when it started, and asks
    when the lease runs out; each answer is the change to act on, if any.
    Nobody leads until the lock is first held."""

    def __init__(self, lease: float = LEAD_LEASE) -> None:
        self.lease = lease
        self.leading = False
        #: When the lead lapses unless a look renews it.
        self.until = -math.inf

    def held(self, held: bool, asked: float, now: float) -> Literal["took", "lost"] | None:
        """A look started at ``asked`` and answered at ``now`` found the lock held
        (or not): "took" the lead, "lost" it, or None. An answer that comes after
        the lease it would give has run out gives none."""
        if held and now < asked + self.lease:
            self.until = asked + self.lease
            return self._be(True)
        return self._be(False)

    def expire(self, now: float) -> Literal["lost"] | None:
        """The lead "lost" when the lease ran out by ``now`` with no look renewing it."""
        if self.leading and now >= self.until:
            self._be(False)
            return "lost"
        return None

    def _be(self, leading: bool) -> Literal["took", "lost"] | None:
        if leading == self.leading:
            return None
        self.leading = leading
        return "took" if leading else "lost"


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
        host's overseer obey commands only while it holds it, and its lease
        lasts. Runs for the supervisor's life in cluster mode with IRC."""
        lead = Leadership()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._end_lapsed_leads, lead, overseer)
            while True:
                asked = trio.current_time()
                held = await trio.to_thread.run_sync(self.store.lead_fleet)
                await self._lead_changed(lead.held(held, asked, trio.current_time()), overseer)
                await trio.sleep(LEAD_RETRY)

    async def _end_lapsed_leads(self, lead: Leadership, overseer: Overseer) -> None:
        """Stop the overseer obeying when its lease runs out: a look at the lock
        that hangs (a host cut off the network) must not extend the lead."""
        while True:
            await trio.sleep_until(lead.until if lead.leading else trio.current_time() + lead.lease)
            await self._lead_changed(lead.expire(trio.current_time()), overseer)

    async def _lead_changed(self, change: str | None, overseer: Overseer) -> None:
        match change:
            case "took":
                self.event("fleet_lead", overseer.nick)
                await overseer.take_lead()
            case "lost":
                self.event("fleet_lead_lost", overseer.nick)
                await overseer.lose_lead()

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
