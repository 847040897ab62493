"""Where the time of one path goes: named marks, in seconds from its start.

A restore runs through the supervisor, the driver and QMP; rather than handing
a recorder down every call, the path opens ``Steps`` as the current task's
context (``tracing``) and any code under it says ``mark("name")``. Child tasks
started inside inherit it (trio copies the context), and ``mark`` outside any
path does nothing, so drivers mark their steps whoever calls them.

The marks go into the ``restored`` event (``steps``), where the qemu bench's
``--trace`` reads them beside the same marks of its bare floor.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

import trio

_current: Final[contextvars.ContextVar[Steps | None]] = contextvars.ContextVar(
    "fireclaw_steps", default=None
)


class Steps:
    """Marks of one path, each the time since ``start`` when it was first said."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, trio.current_time() - self.start)

    def as_ms(self) -> dict[str, float]:
        """The marks in milliseconds, in the order they were said."""
        return {name: round(at * 1000, 1) for name, at in self.marks.items()}


@contextmanager
def tracing(start: float | None = None) -> Iterator[Steps]:
    """Record the marks said under this block (and in tasks it starts) into a new
    ``Steps`` from ``start`` (now, if not given)."""
    steps = Steps(trio.current_time() if start is None else start)
    token = _current.set(steps)
    try:
        yield steps
    finally:
        _current.reset(token)


def current() -> Steps | None:
    """The path being traced here, if any."""
    return _current.get()


def mark(name: str) -> None:
    """Mark ``name`` on the current path, if one is being traced."""
    steps = _current.get()
    if steps is not None:
        steps.mark(name)
