"""One command run in a VM of a role's pool, as typed events.

``run_command`` claims an idle VM of the group (waiting for one to boot when
none is idle), runs the command in its guest and yields what happens, then
retires the VM: a claimed VM serves one run and is never given back to the
pool, whatever it ran (``Child`` does not restart a claimed VM whose work is
over). The events, in order::

    RunStarted(vm)              the VM claimed for the run; always first
    RunOutput(stream, data)     a chunk of the command's stdout or stderr, zero or more
    RunExited(code, error)      the command ended: its exit code, and why it could
                                not be started (``error``, with code 126 or 127), or
    RunFailed(reason)           the VM was lost before the command ended

Nothing here is formatted for anyone: the API layer turns the events into
its lines. Leaving early, close the iterator (``contextlib.aclosing``): the
VM is retired then too.

Errors (raised before the first event; nothing was run)::

    PoolError           no VM can be handed out (pool/group.py)
    └── NotReady        none became ready within the wait
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Literal

import msgspec
import trio
from fireclaw.guest_daemon import protocol as p
from fireclaw.pool.control import GuestLost
from fireclaw.pool.group import PoolError, RoleGroup


class NotReady(PoolError):
    """No VM of the role became ready within the wait for one."""

    def __init__(self, role: str, seconds: float) -> None:
        super().__init__(f"no {role} VM became ready within {seconds:g}s")
        self.role = role
        self.seconds = seconds


class RunStarted(msgspec.Struct, frozen=True, kw_only=True):
    """The run has its VM."""

    vm: str


class RunOutput(msgspec.Struct, frozen=True, kw_only=True):
    """A chunk of the command's output, as the guest sent it."""

    stream: Literal["stdout", "stderr"]
    data: bytes


class RunExited(msgspec.Struct, frozen=True, kw_only=True):
    """The command ended. ``code`` is negative for a signal; ``error`` says why the
    guest could not start it (then ``code`` is 126 or 127), else it is empty."""

    code: int
    error: str = ""


class RunFailed(msgspec.Struct, frozen=True, kw_only=True):
    """The VM was lost before the command ended; ``reason`` is one line."""

    reason: str


RunEvent = RunStarted | RunOutput | RunExited | RunFailed


async def run_command(
    group: RoleGroup, argv: list[str], *, user: str = ""
) -> AsyncGenerator[RunEvent, None]:
    """Run ``argv`` as ``user`` (empty: the agent user) in a VM of ``group``; the
    run's events (see above). A VM is waited for as long as one may take to
    boot (``control.boot_timeout``)."""
    wait = group.rt.control.boot_timeout
    child = None
    with trio.move_on_after(wait):
        child = await group.claim()
    if child is None:
        raise NotReady(group.name, wait)
    # Taken now, while the VM is idle: should it be lost while the first event is
    # handled, its session says so when the run begins.
    session = child.session
    try:
        assert session is not None  # an idle VM has its guest connected
        yield RunStarted(vm=child.name)
        async with contextlib.aclosing(session.run(argv, user=user)) as output:
            async for msg in output:
                if isinstance(msg, p.Output):
                    yield RunOutput(stream=msg.stream, data=msg.data)
                else:
                    yield RunExited(code=msg.code, error=msg.error)
    except GuestLost as exc:
        yield RunFailed(reason=exc.reason)
    finally:
        group.retire(child, "run finished", done=True)
