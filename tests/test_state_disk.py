"""The state database on a disk that refuses writes: task writes raise
``StateUnwritable``, best-effort writes are dropped and counted, the outage is
logged once, and held task moves are tried again with the project's backoff."""

from __future__ import annotations

import logging
import pathlib
import random
from collections.abc import Iterator
from functools import partial

import pytest
import trio
import trio.testing
from fireclaw.pool.durable import RETRY, until_written
from fireclaw.supervisor.state import (
    ServiceRecord,
    StateError,
    StateUnwritable,
    Store,
    VmRecord,
    WriteHealth,
)
from smalldisk import fill_under, needs_root, tmpfs


@pytest.fixture
def full_store(tmp_path: pathlib.Path) -> Iterator[tuple[Store, pathlib.Path]]:
    """A store on a 1 MiB tmpfs, and the filler that makes that disk full."""
    with tmpfs(tmp_path / "disk", 1) as disk:
        store = Store.open(disk / "swarm.db", clock=lambda: 1234.5)
        try:
            store.add_task("worker", "before")
            yield store, fill_under(store.path)
        finally:
            store.close()


def _vm(name: str) -> VmRecord:
    return VmRecord(name=name, role="worker", pid=1, start_time=1, boot_id="b", spec_hash="h")


@needs_root
def test_a_full_disk_refuses_task_writes_with_one_line(
    full_store: tuple[Store, pathlib.Path],
) -> None:
    store, _ = full_store
    with pytest.raises(StateUnwritable) as info:
        store.add_task("worker", "x" * 10_000)
    assert info.value.why == "full"
    assert info.value.path == store.path
    assert str(info.value) == f"state database {store.path}: database or disk is full"
    with pytest.raises(StateUnwritable):
        store.claim_task("worker", "worker-0")
    # Reads go on: what is queued can still be seen.
    assert [t.prompt for t in store.list_tasks()] == ["before"]
    assert store.health.status() == {
        "writable": False,
        "why": "full",
        "since": 1234.5,
        "dropped_events": 0,
        "dropped_writes": 0,
        "pending_writes": 0,
    }


@needs_root
def test_best_effort_writes_are_dropped_counted_and_logged_once(
    full_store: tuple[Store, pathlib.Path], caplog: pytest.LogCaptureFixture
) -> None:
    store, filler = full_store
    caplog.set_level(logging.INFO, logger="fireclaw.state")
    for i in range(50):
        store.event("crashed", f"worker-{i}", reason="x" * 2000)
        store.record_restart(f"worker-{i}", "worker", reason="y" * 2000, exit_code=1, delay=0.5)
        store.put_vm(_vm(f"worker-{i}-{'z' * 2000}"))
        store.put_service(ServiceRecord(name=f"ircd-{i}", command="z" * 2000))
    health = store.health
    assert (health.writable, health.dropped_events, health.dropped_writes) == (False, 50, 150)
    (first,) = [r.getMessage() for r in caplog.records]
    assert first.startswith(f"state database {store.path}: database or disk is full: until")

    # A write that changes nothing proves nothing: the outage goes on.
    store.drop_vm("no-such-vm")
    assert not health.writable

    filler.unlink()
    store.event("crashed", "worker-0")
    assert health.writable and health.since is None
    assert len(caplog.records) == 2
    assert "takes writes again (dropped meanwhile: 50 events, 150 other writes)" in (
        caplog.records[1].getMessage()
    )
    assert store.claim_task("worker", "worker-0") is not None
    assert [e.subject for e in store.events()] == ["worker-0"]


def test_a_read_only_database_is_unwritable_too(tmp_path: pathlib.Path) -> None:
    with Store.open(tmp_path / "swarm.db") as store:
        store._conn.execute("PRAGMA query_only = 1")  # what a read-only mount gives
        with pytest.raises(StateUnwritable) as info:
            store.add_task("worker", "p")
        assert info.value.why == "read-only"
        store.event("k", "s")
        assert store.health.dropped_events == 1
        store._conn.execute("PRAGMA query_only = 0")
        store.add_task("worker", "p")
        assert store.health.writable


def test_other_database_errors_are_not_swallowed(tmp_path: pathlib.Path) -> None:
    store = Store.open(tmp_path / "swarm.db")
    store.close()
    with pytest.raises(StateError) as info:
        store.event("k", "s")
    assert not isinstance(info.value, StateUnwritable)
    assert store.health.writable


def test_health_reports_each_transition_once() -> None:
    health = WriteHealth()
    seen: list[bool] = []
    health.on_change = lambda: seen.append(health.writable)
    assert health.failed(10.0, "full")
    assert not health.failed(11.0, "full")
    assert health.since == 10.0
    assert health.succeeded()
    assert not health.succeeded()
    assert seen == [False, True]


class Refusing:
    """A write the disk refuses ``n`` times, then takes; when each try was made."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.tries: list[float] = []

    def __call__(self) -> str:
        self.tries.append(trio.current_time())
        if len(self.tries) <= self.n:
            raise StateUnwritable("state database x: disk full", "full", pathlib.Path("x"))
        return "written"


def _top(lo: float, hi: float) -> float:
    return hi  # the top of each jitter range, so the waits are exact


async def test_a_held_write_is_tried_again_with_the_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    health = WriteHealth()
    write = Refusing(8)
    assert await until_written(write, health, uniform=_top) == "written"
    # 0.5, 1, 2, 4, 8, then RETRY.max (10) each time: doubling, capped, no busy loop.
    waits = [b - a for a, b in zip(write.tries, write.tries[1:], strict=False)]
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, RETRY.max, RETRY.max, RETRY.max]
    assert health.pending == 0


async def test_a_held_write_counts_as_pending_until_written(
    autojump_clock: trio.testing.MockClock,
) -> None:
    health = WriteHealth()
    write = Refusing(2)
    seen: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(until_written, write, health, uniform=_top))
        await trio.sleep(0.25)  # inside the first wait (0.5 s)
        seen.append(health.pending)
        await trio.sleep(RETRY.max * 3)
        seen.append(health.pending)
    assert seen == [1, 0]
    assert len(write.tries) == 3


async def test_a_held_write_ends_when_cancelled(autojump_clock: trio.testing.MockClock) -> None:
    health = WriteHealth()
    write = Refusing(1_000)
    with trio.move_on_after(60):
        await until_written(write, health, uniform=random.Random(7).uniform)
    assert health.pending == 0
    # Full jitter below a 10 s cap: at least 60 / 10 tries, and far from a busy loop.
    assert 6 <= len(write.tries) < 60


async def test_other_errors_are_not_held(autojump_clock: trio.testing.MockClock) -> None:
    def broken() -> None:
        raise StateError("state database x: malformed")

    with pytest.raises(StateError, match="malformed"):
        await until_written(broken, WriteHealth())
    assert trio.current_time() == 0
