"""Who leads the fleet's overseers: the pure transitions (``cluster.Leadership``),
the lead loop's lease under a fake clock, and the lock behind them, a
PostgreSQL session-level advisory lock held on a connection of its own, on a
real server (``pg.py``)."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from fireclaw.supervisor.cluster import LEAD_LEASE, LEAD_RETRY, ClusterSide, Leadership
from fireclaw.supervisor.state import Store
from fireclaw.supervisor.state_pg import PgStore
from fireclaw.supervisor.state_pg_db import HOLDER_SILENCE
from fireclaw.supervisor.state_pg_registry import LEAD_LOCK
from pg import PgCluster


def test_nobody_leads_until_the_lock_is_held_and_each_change_is_said_once() -> None:
    lead = Leadership(lease=6.0)
    assert not lead.leading
    assert lead.held(False, 0.0, 0.1) is None  # another host leads: nothing to do
    assert lead.held(True, 3.0, 3.1) == "took"
    assert lead.leading
    assert lead.held(True, 6.0, 6.1) is None  # still held: said once only
    assert lead.held(False, 9.0, 9.1) == "lost"
    assert not lead.leading
    assert lead.held(False, 12.0, 12.1) is None
    assert lead.held(True, 15.0, 15.1) == "took"


def test_a_lead_lasts_its_lease_from_the_start_of_the_look_that_found_it() -> None:
    lead = Leadership(lease=6.0)
    assert lead.held(True, 10.0, 10.5) == "took"
    assert lead.until == 16.0
    assert lead.expire(15.999) is None
    assert lead.held(True, 13.0, 14.0) is None  # renewed by the next look
    assert lead.expire(16.0) is None
    # The look after that hangs (its host is cut off): the lease runs out.
    assert lead.expire(19.0) == "lost"
    assert not lead.leading
    assert lead.expire(30.0) is None  # said once
    # An answer later than the lease it would give gives none.
    assert lead.held(True, 16.0, 22.0) is None
    assert not lead.leading
    assert lead.held(True, 25.0, 25.1) == "took"


def test_the_lease_ends_before_the_database_can_free_a_silent_holder_s_lock() -> None:
    # The server frees a silent holder's lock HOLDER_SILENCE seconds after the
    # look that found it held began, at the soonest; the holder has stopped by then.
    assert LEAD_LEASE > LEAD_RETRY
    assert LEAD_LEASE + LEAD_RETRY / 2 < HOLDER_SILENCE


class _Overseer:
    """What the lead loop tells the overseer, and when (virtual time)."""

    nick = "overseer-a"

    def __init__(self) -> None:
        self.said: list[tuple[str, float]] = []

    async def take_lead(self) -> None:
        self.said.append(("took", trio.current_time()))

    async def lose_lead(self) -> None:
        self.said.append(("lost", trio.current_time()))


class _Side(ClusterSide):
    """The lead loop over a store that holds the lock, recording its events."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def lead_fleet(self) -> bool:
        return True

    @property  # type: ignore[override]
    def store(self) -> Any:
        return self

    def event(self, kind: str, subject: str, **detail: object) -> None:
        self.events.append(kind)


async def test_a_look_that_hangs_ends_the_lead_when_its_lease_runs_out(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    looks: list[float] = []

    async def look(fn: Callable[[], bool], **_: object) -> bool:
        # In place of the worker thread (a fake clock jumps while one runs): the
        # first look answers at once, the next never does, as on a host cut off.
        looks.append(trio.current_time())
        if len(looks) > 1:
            await trio.sleep_forever()
        return fn()

    monkeypatch.setattr(trio.to_thread, "run_sync", look)
    side, overseer = _Side(), _Overseer()
    with trio.move_on_after(LEAD_LEASE + 10 * LEAD_RETRY):
        await side._lead_overseers(overseer)  # type: ignore[arg-type]
    assert looks == [0.0, LEAD_RETRY]
    # Took at the first look; lost when its lease ran out, the second look unanswered.
    assert overseer.said == [("took", 0.0), ("lost", LEAD_LEASE)]
    assert side.events == ["fleet_lead", "fleet_lead_lost"]


def test_a_single_host_leads_itself(tmp_path: pathlib.Path) -> None:
    with Store.open(tmp_path / "state.db") as store:
        assert store.lead_fleet()


def _connect(cluster: PgCluster, dsn: str, tmp: pathlib.Path, host: str) -> PgStore:
    return PgStore.connect(
        dsn, host=host, local=tmp / f"{host}.db", password_file=cluster.password_file
    )


def _holders(cluster: PgCluster, dbname: str) -> list[int]:
    """The server processes holding the lead lock (bigint keys show as two halves)."""
    with cluster.connect(dbname) as admin:
        rows = admin.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND classid = %s AND objid = %s AND objsubid = 1",
            (LEAD_LOCK >> 32, LEAD_LOCK & 0xFFFFFFFF),
        ).fetchall()
    return [int(pid) for (pid,) in rows]  # type: ignore[call-overload]


def _until_gone(cluster: PgCluster, dbname: str, pid: int) -> None:
    """Wait (up to 60 s, on the server) until the server process ``pid`` has
    ended: a client's close does not wait for its process, nor for its locks
    to be freed. A process already gone is not an error."""
    with cluster.connect(dbname) as admin:
        admin.execute("SELECT pg_terminate_backend(%s, 60000)", (pid,))


def test_one_host_leads_until_its_connection_goes_then_another_takes_over(
    pg_cluster: PgCluster, pg_dsn: str, tmp_path: pathlib.Path
) -> None:
    dbname = pg_dsn.rsplit("/", 1)[1].split("?")[0]
    with _connect(pg_cluster, pg_dsn, tmp_path, "a") as a:
        with _connect(pg_cluster, pg_dsn, tmp_path, "b") as b:
            assert a.lead_fleet()
            assert not b.lead_fleet()
            assert a.lead_fleet()  # still held, and held once
            (holder,) = _holders(pg_cluster, dbname)
            # a's lock connection ends (its host died, or the network was cut):
            # the server frees the lock, a knows it has lost it, b takes it.
            _until_gone(pg_cluster, dbname, holder)
            assert not a.lead_fleet()
            assert b.lead_fleet()
            assert not a.lead_fleet()
            (holder,) = _holders(pg_cluster, dbname)
        # b closes (its supervisor stops): its server process ends a moment
        # later; once it has, a takes the lead at its next try.
        _until_gone(pg_cluster, dbname, holder)
        assert a.lead_fleet()
        (holder,) = _holders(pg_cluster, dbname)
    _until_gone(pg_cluster, dbname, holder)
    assert _holders(pg_cluster, dbname) == []
