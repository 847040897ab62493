"""The marks a traced path says, under a fake clock: in order, from its start,
from the tasks it starts too, and nothing outside a trace."""

from __future__ import annotations

import trio
import trio.testing
from fireclaw.pool import steps


async def test_marks_are_times_from_the_start_in_the_order_said(
    autojump_clock: trio.testing.MockClock,
) -> None:
    steps.mark("before")  # no trace: nothing to record it, nothing raised
    start = trio.current_time()
    with steps.tracing() as traced:
        await trio.sleep(0.25)
        steps.mark("spawned")
        async with trio.open_nursery() as nursery:

            async def child() -> None:
                await trio.sleep(0.5)
                steps.mark("in a task")

            nursery.start_soon(child)
        steps.mark("spawned")  # said again: the first time counts
        assert steps.current() is traced
    assert steps.current() is None
    assert traced.start == start
    assert traced.as_ms() == {"spawned": 250.0, "in a task": 750.0}


async def test_two_paths_at_once_keep_their_own_marks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    found: dict[str, dict[str, float]] = {}

    async def path(name: str, delay: float) -> None:
        with steps.tracing() as traced:
            await trio.sleep(delay)
            steps.mark("done")
        found[name] = traced.as_ms()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(path, "a", 1.0)
        nursery.start_soon(path, "b", 2.0)
    assert found == {"a": {"done": 1000.0}, "b": {"done": 2000.0}}
