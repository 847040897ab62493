"""What the managed services (ngircd, the model server) share: one child process
at a time, restarted per its policy, and recorded in the crash-only registry::

    ManagedService._supervise(on_ready)
    └─ loop: _incarnation(on_ready) -> Exit -> RestartTracker
             -> restart at once, after a backoff, or ``failed`` until reset()

A service subclasses ``ManagedService``: it names itself (``service``: its
registry row, the subject and prefix of its events; ``title``: how the log
names it), starts and watches one incarnation (``_incarnation``, which calls
``on_ready`` once the program serves), and says in one line why its first start
failed (``_first_failure``). Everything else is here, the same for every
service: states, restarts, events, the registry row, the stop.

``state`` is ``starting`` until an incarnation is ready, ``running`` while it
serves, ``backoff`` while a restart waits, ``failed`` when it is not restarted
(the circuit opened, or the policy says so) until ``reset()``.
``on_event(kind, service, detail)`` is told ``<service>_started`` (by the
subclass, which knows what to say about a ready incarnation),
``<service>_crashed`` and ``<service>_failed``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Final, Literal

import trio
from fireclaw.config import RestartPolicy
from fireclaw.pool.backoff import RestartTracker, classify_exit
from fireclaw.pool.procid import process_identity
from fireclaw.supervisor.state import ServiceRecord, Store

__all__ = ["TERM_TIMEOUT", "Exit", "ManagedService", "OnEvent", "State", "describe_exit", "stop"]

log = logging.getLogger("fireclaw.supervisor.managed")

TERM_TIMEOUT: Final = 5.0
"""Seconds a managed service has between SIGTERM and SIGKILL when stopped."""

State = Literal["starting", "running", "backoff", "failed"]
OnEvent = Callable[[str, str, dict[str, object]], None]


@dataclass(frozen=True)
class Exit:
    """How one incarnation ended."""

    code: int | None  # None: killed by a signal, or by us because it never became ready
    reason: str


class ManagedService:
    """A supervised child process; see the module docstring."""

    service: ClassVar[str]
    title: ClassVar[str]

    def __init__(
        self,
        restart: RestartPolicy,
        on_event: OnEvent | None,
        registry: Store | None,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.restart = restart
        self.tracker = RestartTracker(restart, uniform=uniform)
        self.state: State = "starting"
        self.restarts = 0
        self.pid: int | None = None
        self.reason = ""  # why it last stopped
        self._on_event = on_event
        self._registry = registry
        self._reset = trio.Event()

    def reset(self) -> None:
        """Clear ``failed`` (restart now), or cut a backoff wait short."""
        self.tracker.reset()
        self._reset.set()

    # --- what a service says -----------------------------------------------------------

    async def _incarnation(self, on_ready: Callable[[], None]) -> Exit:
        """Start the program, call ``on_ready`` once it serves, return when it has
        exited; stop it (``stop``) on the way out, whatever ends the call."""
        raise NotImplementedError

    def _first_failure(self, reason: str) -> Exception:
        """The one-line error for a first start that failed with ``reason``."""
        raise NotImplementedError

    # --- the loop ------------------------------------------------------------------------

    async def _supervise(self, on_first_ready: Callable[[], None]) -> None:
        """Run incarnation after incarnation until cancelled; ``on_first_ready()``
        once the first is ready. Raises ``_first_failure`` if the first fails."""
        started = False

        def ready() -> None:
            nonlocal started
            if not started:
                started = True
                on_first_ready()

        while True:
            self.state = "starting"
            outcome = await self._incarnation(ready)
            if not started:
                raise self._first_failure(outcome.reason)
            await self._after_exit(outcome)

    async def _after_exit(self, outcome: Exit) -> None:
        """Decide about a restart and wait it out; while failed, wait for reset()."""
        decision = self.tracker.exited(
            trio.current_time(), classify_exit(outcome.code, self.restart)
        )
        self.reason = outcome.reason
        self._event(
            "crashed",
            reason=outcome.reason,
            exit_code=outcome.code,
            restart=decision.restart,
            delay=round(decision.delay, 3),
            failed=decision.failed,
        )
        log.warning("%s stopped: %s", self.title, outcome.reason)
        if not decision.restart:
            self.state = "failed"
            self.reason = f"{outcome.reason}; not restarted: {decision.reason}"
            self._event("failed", reason=self.reason)
            log.error("%s failed: %s", self.title, self.reason)
            await self._reset.wait()
            self._reset = trio.Event()
            return
        self.restarts += 1
        if decision.delay > 0:
            self.state = "backoff"
            with trio.move_on_after(decision.delay):
                await self._reset.wait()  # a reset cuts the wait short
            self._reset = trio.Event()

    def _ready(self, pid: int, **detail: object) -> None:
        """Note an incarnation that serves: ``running``, and ``<service>_started``."""
        self.state = "running"
        self.tracker.ready(trio.current_time())
        self._event("started", pid=pid, restarts=self.restarts, **detail)

    def _event(self, kind: str, **detail: object) -> None:
        if self._on_event is not None:
            self._on_event(f"{self.service}_{kind}", self.service, detail)

    # --- the registry --------------------------------------------------------------------

    def _record(self, command: str, address: str, *, pid: int) -> None:
        """Put this incarnation in the registry: ``pid`` 0 before it exists (written
        ahead: a copy a killed supervisor started is then found by its command line)."""
        if self._registry is None:
            return
        # Not yet reaped (we are its parent), so the pid is still this process.
        ident = process_identity(pid) if pid else None
        self._registry.put_service(
            ServiceRecord(
                name=self.service,
                command=command,
                pid=pid,
                start_time=ident.start_time if ident else 0,
                boot_id=ident.boot_id if ident else "",
                address=address,
            )
        )

    def _forget(self) -> None:
        """Drop the row: the incarnation is reaped, nothing of it is left to reclaim."""
        if self._registry is not None:
            self._registry.drop_service(self.service)


async def stop(proc: trio.Process, term_timeout: float = TERM_TIMEOUT) -> None:
    """SIGTERM to its process group, up to ``term_timeout``, then SIGKILL; reap."""
    if proc.returncode is not None:
        return
    # The pid is not reused before we reap it, so the group is still ours.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with trio.move_on_after(term_timeout):
        await proc.wait()
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


def describe_exit(code: int) -> str:
    """A process's exit status in words: ``exited with status 1``, ``killed by SIGKILL``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"
