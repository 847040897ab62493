"""Who leads the fleet's overseers: the pure transitions (``cluster.Leadership``)
and the lock behind them, a PostgreSQL session-level advisory lock held on a
connection of its own, on a real server (``pg.py``)."""

from __future__ import annotations

import pathlib

from fireclaw.supervisor.cluster import Leadership
from fireclaw.supervisor.state import Store
from fireclaw.supervisor.state_pg import PgStore
from fireclaw.supervisor.state_pg_registry import LEAD_LOCK
from pg import PgCluster


def test_nobody_leads_until_the_lock_is_held_and_each_change_is_said_once() -> None:
    lead = Leadership()
    assert not lead.leading
    assert lead.held(False) is None  # another host leads: nothing to do
    assert lead.held(True) == "took"
    assert lead.leading
    assert lead.held(True) is None  # still held: said once only
    assert lead.held(False) == "lost"
    assert not lead.leading
    assert lead.held(False) is None
    assert lead.held(True) == "took"


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
