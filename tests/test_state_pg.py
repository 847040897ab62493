"""What only the PostgreSQL store has: its server, its connection string and
password, claims from many connections at once, and fencing across hosts.
The behaviour both stores share is checked on both in ``test_state.py``."""

from __future__ import annotations

import os
import pathlib
import threading
import time

import psycopg
import pytest
from fireclaw.supervisor.state import StateError, StateUnwritable, TaskFenced
from fireclaw.supervisor.state_pg import PgStore
from fireclaw.supervisor.state_pg_schema import SCHEMA_VERSION as PG_SCHEMA_VERSION
from fireclaw.supervisor.state_pg_tasks import SILENT_LOCK
from pg import USER, PgCluster, start_cluster


def _processes_under(root: pathlib.Path) -> list[int]:
    """Processes whose command line names ``root`` (the server and its backends
    name their data folder, or were started from it)."""
    found = []
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            cwd = str((proc / "cwd").readlink())
        except OSError:
            continue
        if str(root).encode() in cmdline or cwd.startswith(str(root)):
            found.append(int(proc.name))
    return found


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to nobody needs root")
def test_a_cluster_runs_as_nobody_on_a_socket_only_and_leaves_nothing() -> None:
    cluster: PgCluster = start_cluster()
    root = cluster.root
    try:
        assert _processes_under(root), "the server runs from its folder"
        assert (root / "nobody").stat().st_uid == 65534
        with cluster.connect() as conn:
            (user,) = conn.execute("SELECT current_user").fetchone()  # type: ignore[misc]
            (listen,) = conn.execute("SHOW listen_addresses").fetchone()  # type: ignore[misc]
        assert (user, listen) == ("fireclaw", "")
        status = pathlib.Path(f"/proc/{cluster.proc.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert set(uid_line.split()[1:]) == {"65534"}  # nobody, never root
    finally:
        cluster.stop()
    assert not root.exists()
    assert _processes_under(root) == []
    try:
        psycopg.connect(cluster.dsn("postgres"), password=cluster.password, connect_timeout=5)
    except psycopg.OperationalError:
        pass
    else:
        raise AssertionError("the server still answers after stop()")


# --- connecting ----------------------------------------------------------------


def _dbname(dsn: str) -> str:
    return dsn.rsplit("/", 1)[1].split("?")[0]


def _connect(cluster: PgCluster, dsn: str, tmp: pathlib.Path, host: str = "here") -> PgStore:
    return PgStore.connect(
        dsn, host=host, local=tmp / f"{host}.db", password_file=cluster.password_file
    )


def test_the_password_comes_from_its_file_and_errors_name_the_database_only(
    pg_cluster: PgCluster, pg_dsn: str, tmp_path: pathlib.Path
) -> None:
    dbname = _dbname(pg_dsn)
    where = f"{pg_cluster.socket_dir}/{dbname}"
    with _connect(pg_cluster, pg_dsn, tmp_path) as store:
        assert store.database == where
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    wrong.chmod(0o600)
    with pytest.raises(StateError) as refused:
        PgStore.connect(pg_dsn, host="here", local=tmp_path / "x.db", password_file=wrong)
    message = str(refused.value)
    assert message.startswith(f"state database {where}: ")
    assert "password authentication failed" in message and "\n" not in message
    assert "not-the-password" not in message and pg_cluster.password not in message


def test_a_password_in_the_connection_string_is_refused(
    pg_cluster: PgCluster, pg_dsn: str, tmp_path: pathlib.Path
) -> None:
    inline = pg_dsn.replace(f"{USER}@", f"{USER}:{pg_cluster.password}@")
    with pytest.raises(StateError, match="carries a password; name a password_file") as refused:
        PgStore.connect(inline, host="here", local=tmp_path / "x.db")
    assert pg_cluster.password not in str(refused.value)


def test_a_password_file_others_may_read_is_refused(
    pg_cluster: PgCluster, pg_dsn: str, tmp_path: pathlib.Path
) -> None:
    loose = tmp_path / "loose"
    loose.write_text(pg_cluster.password + "\n")
    loose.chmod(0o644)
    with pytest.raises(StateError, match=f"password_file {loose}: group or others may use it"):
        PgStore.connect(pg_dsn, host="here", local=tmp_path / "x.db", password_file=loose)


def test_libpq_environment_gives_the_password_too(
    pg_cluster: PgCluster, pg_dsn: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGPASSWORD", pg_cluster.password)
    with PgStore.connect(pg_dsn, host="here", local=tmp_path / "x.db") as store:
        assert store.add_task("worker", "x").id == 1


def test_not_a_connection_string(tmp_path: pathlib.Path) -> None:
    with pytest.raises(StateError, match="not a PostgreSQL connection string"):
        PgStore.connect("host=/x dbname", host="here", local=tmp_path / "x.db")


def test_hosts_starting_together_migrate_once(
    pg_cluster: PgCluster, pg_dsn: str, tmp_path: pathlib.Path
) -> None:
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def host(n: int) -> None:
        start.wait(timeout=30)
        try:
            _connect(pg_cluster, pg_dsn, tmp_path, f"h{n}").close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=host, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive()
    assert errors == []
    with pg_cluster.connect(_dbname(pg_dsn)) as conn:
        assert conn.execute("SELECT version FROM fireclaw_schema").fetchall() == [
            (PG_SCHEMA_VERSION,)
        ]


def test_a_newer_schema_is_refused(
    pg_cluster: PgCluster, pg_dsn: str, tmp_path: pathlib.Path
) -> None:
    _connect(pg_cluster, pg_dsn, tmp_path).close()
    with pg_cluster.connect(_dbname(pg_dsn)) as conn:
        conn.execute("UPDATE fireclaw_schema SET version = version + 1")
    newer = f"schema version {PG_SCHEMA_VERSION + 1} is newer than this fireclaw-swarm"
    with pytest.raises(StateError, match=newer):
        _connect(pg_cluster, pg_dsn, tmp_path)


def test_a_lost_connection_holds_writes_then_reconnects(
    pg_cluster: PgCluster, pg_dsn: str, tmp_path: pathlib.Path
) -> None:
    """The server ends the store's session (as a restart or a cut would): the
    next write is ``StateUnwritable`` (the pool holds it), events are dropped
    and counted, and the call after that connects anew."""
    with _connect(pg_cluster, pg_dsn, tmp_path) as store:
        task = store.add_task("worker", "x")
        with pg_cluster.connect() as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'fireclaw-swarm'"
            )
        with pytest.raises(StateUnwritable, match="state database .*: ") as lost:
            store.claim_task("worker", "worker-0")
        assert lost.value.why == "unreachable"
        assert not store.health.writable and store.health.why == "unreachable"
        claimed = store.claim_task("worker", "worker-0")  # connected again
        assert claimed is not None and claimed.id == task.id
        assert store.health.writable


def test_nul_in_text_is_stored_as_a_replacement_character(
    pg_cluster: PgCluster, pg_dsn: str, tmp_path: pathlib.Path
) -> None:
    with _connect(pg_cluster, pg_dsn, tmp_path) as store:
        task = store.add_task("worker", "a\x00b")
        assert task.prompt == "a\ufffdb"
        store.claim_task("worker", "worker-0")
        done = store.finish_task(task.id, epoch=1, ok=True, exit_code=0, result="out\x00put")
        assert done.result == "out\ufffdput"
        store.event("task_done", "worker-0", output="x\x00y")
        assert store.events()[-1].detail == {"output": "x\x00y"}  # JSON escapes it


# --- claims across hosts ----------------------------------------------------------


def test_concurrent_claimers_take_each_task_exactly_once(
    pg_cluster: PgCluster, pg_dsn: str, tmp_path: pathlib.Path
) -> None:
    """Four hosts, each its own connection and thread, drain 500 tasks: each
    task is claimed once and finished once, none is lost."""
    n_tasks, n_hosts = 500, 4
    with _connect(pg_cluster, pg_dsn, tmp_path, "queue") as queue:
        ids = {queue.add_task("worker", f"t{i}").id for i in range(n_tasks)}
    hosts = [_connect(pg_cluster, pg_dsn, tmp_path, f"host{n}") for n in range(n_hosts)]
    start = threading.Barrier(n_hosts)
    claimed: dict[str, list[int]] = {s.host: [] for s in hosts}
    errors: list[BaseException] = []

    def claimer(store: PgStore) -> None:
        try:
            start.wait(timeout=30)
            while (task := store.claim_task("worker", f"{store.host}-vm")) is not None:
                assert (task.host, task.epoch) == (store.host, 1)
                store.finish_task(task.id, epoch=task.epoch, ok=True, exit_code=0, result="")
                claimed[store.host].append(task.id)
        except BaseException as exc:
            errors.append(exc)

    began = time.monotonic()
    threads = [threading.Thread(target=claimer, args=(s,)) for s in hosts]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
            assert not t.is_alive()
    finally:
        for s in hosts:
            s.close()
    took = time.monotonic() - began
    assert errors == []
    every = [i for got in claimed.values() for i in got]
    assert len(every) == len(set(every)) == n_tasks  # none twice
    assert set(every) == ids  # none lost
    with _connect(pg_cluster, pg_dsn, tmp_path, "queue") as queue:
        assert queue.count_tasks() == {"queued": 0, "claimed": 0, "done": n_tasks, "failed": 0}
    # The floor, in the same run: bare round trips on one connection.
    with pg_cluster.connect(_dbname(pg_dsn)) as conn:
        began = time.monotonic()
        for _ in range(n_tasks):
            conn.execute("SELECT 1")
        floor = n_tasks / (time.monotonic() - began)
    print(
        f"\n{n_tasks} claims + results by {n_hosts} hosts in {took:.2f} s:"
        f" {n_tasks / took:.0f} claims/s ({ {h: len(c) for h, c in claimed.items()} });"
        f" floor: {floor:.0f} bare round trips/s on one connection"
    )


def test_a_host_presumed_dead_cannot_finish_a_task_taken_over(
    pg_cluster: PgCluster, pg_dsn: str, tmp_path: pathlib.Path
) -> None:
    """Host a claims a task and goes silent; its task goes back to the queue and
    host b claims it. When a comes back with its result, nothing changes."""
    with (
        _connect(pg_cluster, pg_dsn, tmp_path, "a") as a,
        _connect(pg_cluster, pg_dsn, tmp_path, "b") as b,
    ):
        task = a.add_task("worker", "x")
        old = a.claim_task("worker", "worker-0")
        assert old is not None and (old.host, old.epoch) == ("a", 1)
        a.heartbeat()
        b.heartbeat()
        assert b.requeue_silent(silent_after=3600, max_attempts=3) == []  # a is not silent yet
        # Any time at all is too long here: a's heartbeat is in the database's past.
        (back,) = b.requeue_silent(silent_after=0, max_attempts=3)
        assert (back.id, back.state, back.attempts, back.owner) == (task.id, "queued", 1, None)
        assert back.result == "host a is silent"
        new = b.claim_task("worker", "worker-0")
        assert new is not None and (new.id, new.host, new.epoch) == (task.id, "b", 2)
        with pytest.raises(TaskFenced, match="claimed again"):
            a.finish_task(task.id, epoch=old.epoch, ok=True, exit_code=0, result="twice")
        with pytest.raises(TaskFenced):
            a.requeue_task(task.id, epoch=old.epoch, reason="late", max_attempts=3)
        assert a.get_task(task.id) == new
        done = b.finish_task(task.id, epoch=new.epoch, ok=True, exit_code=0, result="once")
        assert (done.state, done.host, done.result) == ("done", "b", "once")


def test_one_host_at_a_time_requeues_the_silent_ones_and_never_its_own(
    pg_cluster: PgCluster, pg_dsn: str, tmp_path: pathlib.Path
) -> None:
    with (
        _connect(pg_cluster, pg_dsn, tmp_path, "a") as a,
        _connect(pg_cluster, pg_dsn, tmp_path, "b") as b,
        _connect(pg_cluster, pg_dsn, tmp_path, "mute") as mute,
    ):
        for i in range(3):
            a.add_task("worker", f"t{i}")
        a.heartbeat()
        b.heartbeat()
        assert a.claim_task("worker", "worker-0") is not None
        assert b.claim_task("worker", "worker-0") is not None
        assert mute.claim_task("worker", "worker-0") is not None  # never heartbeat
        # Another host holds the lock: this one leaves the work to it.
        with pg_cluster.connect(_dbname(pg_dsn)) as other:
            other.execute("SELECT pg_advisory_lock(%s)", (SILENT_LOCK,))
            assert b.requeue_silent(silent_after=0, max_attempts=3) == []
            other.execute("SELECT pg_advisory_unlock(%s)", (SILENT_LOCK,))
        taken = b.requeue_silent(silent_after=0, max_attempts=3)
        assert [t.result for t in taken] == ["host a is silent"]  # not b's own, not mute's
        assert b.count_tasks() == {"queued": 1, "claimed": 2, "done": 0, "failed": 0}


def test_every_shared_method_has_its_postgresql_version() -> None:
    """``PgStore`` is a ``Store`` whose shared parts are overridden: a method added
    to the SQLite task queue or ledger without a PostgreSQL version would quietly
    keep a fleet's state on one host. Only host-local ones may stay SQLite's."""
    from fireclaw.supervisor.state_ledger import Ledger
    from fireclaw.supervisor.state_registry import Registry
    from fireclaw.supervisor.state_tasks import TaskQueue

    def public(cls: type) -> set[str]:
        return {n for n in vars(cls) if not n.startswith("_")}

    local = {"record_restart", "restart_count"} | {
        n
        for n in public(Registry)
        if n.endswith(("vm", "vms", "service", "services", "scale", "scales"))
    }
    shared = (public(TaskQueue) | public(Ledger) | public(Registry)) - local
    assert shared >= {"claim_task", "event", "record_call", "put_agent", "heartbeat"}
    for name in sorted(shared):
        owner = next(c for c in PgStore.__mro__ if name in vars(c))
        assert owner.__module__.startswith("fireclaw.supervisor.state_pg"), (name, owner)
    for name in sorted(local):
        owner = next(c for c in PgStore.__mro__ if name in vars(c))
        assert not owner.__module__.startswith("fireclaw.supervisor.state_pg"), (name, owner)


def test_a_host_hears_the_roles_another_host_queues_tasks_for(
    pg_cluster: PgCluster, pg_dsn: str, tmp_path: pathlib.Path
) -> None:
    with (
        _connect(pg_cluster, pg_dsn, tmp_path, "a") as a,
        _connect(pg_cluster, pg_dsn, tmp_path, "b") as b,
    ):
        assert a.wait_tasks(0) == set()  # listening from now on
        heard: list[set[str]] = []
        waiter = threading.Thread(target=lambda: heard.append(a.wait_tasks(120)))
        began = time.monotonic()
        waiter.start()
        b.add_task("coder", "x")
        b.add_task("reviewer", "y")
        waiter.join(timeout=120)
        assert not waiter.is_alive()
        took = time.monotonic() - began
        (roles,) = heard
        assert "coder" in roles and roles <= {"coder", "reviewer"}
        assert took < 60  # heard, not timed out
        # A requeue is news too: the task is there to claim again.
        a.wait_tasks(0)
        task = b.claim_task("coder", "coder-0")
        assert task is not None
        b.requeue_task(task.id, epoch=task.epoch, reason="vm lost", max_attempts=3)
        deadline = time.monotonic() + 120
        got: set[str] = set()
        while "coder" not in got and time.monotonic() < deadline:
            got |= a.wait_tasks(deadline - time.monotonic())
        assert "coder" in got


def test_a_database_gone_for_good_costs_little_time_per_call(tmp_path: pathlib.Path) -> None:
    """The server stops: calls fail as ``StateUnwritable`` (the pool holds its
    moves), and right after a failed reconnect they fail at once rather than
    each waiting for a connection attempt of its own."""
    cluster = start_cluster()
    try:
        cluster_dsn = cluster.dsn(cluster.create_database())
        store = _connect(cluster, cluster_dsn, tmp_path)
    finally:
        cluster.stop()
    with store:
        with pytest.raises(StateUnwritable):  # the connection it had is gone
            store.count_queued("worker")
        with pytest.raises(StateUnwritable, match="No such file|connection"):  # tried anew
            store.count_queued("worker")
        with pytest.raises(StateUnwritable, match="not connected .tried again shortly."):
            store.add_task("worker", "x")
        assert store.health.why == "unreachable"
        store.event("still", "here")  # best effort: dropped and counted, never raised
        assert store.health.dropped_events == 1
