"""The life of one VM child, as a transition table.

A child is a named slot (``worker-0``) that holds one VM incarnation at a time.
Its state only moves through ``TRANSITIONS[state][event]``; anything else is a
bug and raises ``IllegalTransition``::

    restoring -> idle -> promoting -> active -> draining -> stopped
          \\________\\__________\\__________\\-> crashed -> (backoff) -> restoring
                                                   \\-> failed -> (reset) -> restoring

``backoff`` is ``crashed`` waiting out its restart delay; ``failed`` is the
circuit breaker open (or a fatal exit): no restarts until a reset.
"""

from __future__ import annotations

import enum
from typing import Final


class State(enum.Enum):
    RESTORING = "restoring"
    IDLE = "idle"
    PROMOTING = "promoting"
    ACTIVE = "active"
    DRAINING = "draining"
    STOPPED = "stopped"
    CRASHED = "crashed"
    BACKOFF = "backoff"
    FAILED = "failed"


class Event(enum.Enum):
    READY = "ready"  # the guest said hello with the right token
    CLAIM = "claim"  # handed out by the pool (run, or promotion follows)
    PROMOTE = "promote"
    PROMOTED = "promoted"
    STOP = "stop"  # asked to stop: scale down, retire, shutdown
    EXIT = "exit"  # the VM is gone after a stop
    CRASH = "crash"  # VMM exited, heartbeat missed, protocol broken, timed out
    RETRY = "retry"  # restart after a delay
    RESTART = "restart"  # the delay is over (or was zero)
    GIVE_UP = "give_up"  # no restart: policy, fatal exit or circuit open
    RESET = "reset"  # operator or reload cleared a failed child


S, E = State, Event

TRANSITIONS: Final[dict[State, dict[Event, State]]] = {
    S.RESTORING: {E.READY: S.IDLE, E.CRASH: S.CRASHED, E.STOP: S.DRAINING},
    S.IDLE: {E.CLAIM: S.ACTIVE, E.PROMOTE: S.PROMOTING, E.CRASH: S.CRASHED, E.STOP: S.DRAINING},
    S.PROMOTING: {E.PROMOTED: S.ACTIVE, E.CRASH: S.CRASHED, E.STOP: S.DRAINING},
    S.ACTIVE: {E.PROMOTE: S.PROMOTING, E.CRASH: S.CRASHED, E.STOP: S.DRAINING},
    S.DRAINING: {E.EXIT: S.STOPPED, E.CRASH: S.STOPPED},
    S.CRASHED: {
        E.RETRY: S.BACKOFF,
        E.RESTART: S.RESTORING,
        E.GIVE_UP: S.FAILED,
        E.STOP: S.STOPPED,
    },
    S.BACKOFF: {E.RESTART: S.RESTORING, E.STOP: S.STOPPED},
    S.FAILED: {E.RESET: S.RESTORING, E.STOP: S.STOPPED},
    S.STOPPED: {},
}

#: States in which the child counts toward its role's warm pool.
POOL_STATES: Final = frozenset({S.RESTORING, S.IDLE, S.CRASHED, S.BACKOFF, S.FAILED})
#: States in which the child holds (or is about to hold) work.
BUSY_STATES: Final = frozenset({S.PROMOTING, S.ACTIVE})


class IllegalTransition(RuntimeError):
    """A state machine was asked to make a move its table does not allow."""


class Lifecycle:
    """The current state of one child plus a record of when it entered it."""

    __slots__ = ("state", "since")

    def __init__(self, now: float, state: State = State.RESTORING) -> None:
        self.state = state
        self.since = now

    def fire(self, event: Event, now: float) -> State:
        try:
            new = TRANSITIONS[self.state][event]
        except KeyError:
            raise IllegalTransition(
                f"{event.value} is not allowed in state {self.state.value}"
            ) from None
        if new is not self.state:
            self.since = now
        self.state = new
        return new

    def can(self, event: Event) -> bool:
        return event in TRANSITIONS[self.state]
