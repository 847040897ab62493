"""What a guest is doing that may outlive one connection to its host.

A promoted guest is an agent: an identity, maybe an IRC presence, harness
processes and the tasks they serve. Inside a VM all of that survives a lost
connection (``keep``): the supervisor that started the VM may have crashed or
been upgraded, and the next one adopts the VM as it runs. The daemon dials
again and its next session takes the work over; the Hello of that session
says what the work is (``resume``) and the results that could not be sent are
sent once the host has welcomed it. A guest that is not in a VM (the
``process`` driver's) cannot be adopted: its work ends with its session, as
the host expects.

::

    Work                       one per daemon, in serve()'s nursery
    ├─ identity, presence      set by Promote; kept across sessions when ``keep``
    ├─ turns                   tasks and IRC questions, by the harness (a command or
    │                          the model), as the agent user (``turns.Turns``)
    ├─ children                harness and tool processes
    └─ tasks                   running, or done with their TaskDone not yet sent

``report`` is how a task's ``TaskDone`` goes out: through the session that is
attached, else it waits in ``unsent`` for the next one. A session whose
connection broke hands back what it could not write (``undelivered``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

import trio

from .agent_irc import AgentPresence
from .harness import Children, Identity, child_env
from .protocol import MAX_RESUMED_TASKS, GuestMessage, Resume, Task, TaskDone
from .turns import Turns
from .users import RunAs

log = logging.getLogger("fireclaw.guest_daemon")

Send = Callable[[GuestMessage], Awaitable[None]]

#: Children get SIGTERM, then SIGKILL after this many seconds.
KILL_GRACE: Final = 2.0
#: After the children are dead, how long their tasks may take to report.
REPORT_GRACE: Final = 2.0
#: Seconds to say goodbye on IRC when stopping.
QUIT_GRACE: Final = 3.0


class Work:
    """The agent side of a guest; see the module docstring.

    ``jobs`` is the nursery its tasks and its IRC presence run in: it outlives
    every session. ``keep``: the work survives a lost connection (in a VM)."""

    def __init__(
        self, environ: Mapping[str, str], jobs: trio.Nursery, *, keep: bool, user: RunAs
    ) -> None:
        self.env = child_env(environ)
        self.keep = keep
        self.children = Children()
        self.identity: Identity | None = None
        self.presence: AgentPresence | None = None
        self.turns = Turns(user=user, children=self.children, env=self.env, send=self._emit)
        self._jobs = jobs
        self._running = 0
        self._idle = trio.Event()
        self._idle.set()
        self._tasks: set[int] = set()  # running
        self._unsent: dict[int, TaskDone] = {}
        self._outlet: Send | None = None
        self._ended = False

    # --- jobs ----------------------------------------------------------------------

    def start(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``fn`` in the work's nursery; ``wait_idle`` waits for it."""

        async def job() -> None:
            try:
                await fn()
            finally:
                self._running -= 1
                if self._running == 0:
                    self._idle.set()

        self._running += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._jobs.start_soon(job)

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def promote(self, identity: Identity) -> None:
        """Be ``identity`` from the next turn on (a turn under way keeps its own)."""
        self.identity = identity
        self.turns.retune(identity)

    def run_task(self, msg: Task) -> None:
        """Serve a ``Task`` in the background; its result goes out through ``report``."""
        if msg.task_id in self._tasks or msg.task_id in self._unsent:
            log.warning("task %d: already held; not run twice", msg.task_id)
            return
        self._tasks.add(msg.task_id)
        self.start(lambda: self.turns.task(msg))

    # --- results -------------------------------------------------------------------

    async def _emit(self, msg: GuestMessage) -> None:
        """What the turns report: a task's result (held until a host takes it), or an
        audit line (best effort: without a session it is dropped)."""
        if isinstance(msg, TaskDone):
            await self.report(msg)
        elif self._outlet is not None:
            try:
                await self._outlet(msg)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                log.info("an audit line was lost with the connection")

    async def report(self, done: TaskDone) -> None:
        """Send a task's result through the attached session, or keep it for the next."""
        self._tasks.discard(done.task_id)
        outlet = self._outlet
        if outlet is None:
            self.undelivered(done)
            return
        try:
            await outlet(done)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self.undelivered(done)

    def undelivered(self, done: TaskDone) -> None:
        """A result that did not reach a host: kept for the next session (in a VM)."""
        if self.keep and not self._ended:
            log.info("task %d: result kept until the host is back", done.task_id)
            self._unsent[done.task_id] = done
        else:
            log.warning("task %d: result lost with the connection", done.task_id)

    def resume(self) -> Resume | None:
        """What the next Hello says this guest is; None before any promotion."""
        if self.identity is None or not self.keep:
            return None
        held = sorted(self._tasks | set(self._unsent))
        return Resume(agent=self.identity.name, tasks=held[:MAX_RESUMED_TASKS])

    def attach(self, send: Send) -> list[TaskDone]:
        """Results go out through ``send`` from now on; returns those kept so far,
        for the caller to send first."""
        self._outlet = send
        kept, self._unsent = list(self._unsent.values()), {}
        return kept

    def detach(self) -> None:
        self._outlet = None

    # --- the end -------------------------------------------------------------------

    async def end(self, why: str) -> None:
        """Leave IRC, end the harnesses, give their tasks ``REPORT_GRACE`` to report.

        Idempotent; results that cannot be sent any more are dropped."""
        if self._ended:
            return
        self._ended = True
        if self.presence is not None:
            with trio.move_on_after(QUIT_GRACE):
                await self.presence.leave(why)
        await self.children.terminate(KILL_GRACE)
        with trio.move_on_after(REPORT_GRACE):
            await self.wait_idle()
        self.turns.close()
