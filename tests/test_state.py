"""The state store's contract, checked on both implementations: the SQLite
store of one host and the PostgreSQL store of a cluster (``store``, ``stores``
are parametrised over both; ``pg.py`` starts a real server). What is about one
of them only (SQLite's file, pragmas and migrations) takes ``sqlite_store`` or
``db_path``; PostgreSQL's own tests are in ``test_state_pg.py``."""

from __future__ import annotations

import os
import pathlib
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import pytest
from fireclaw.supervisor import state_schema
from fireclaw.supervisor.state import (
    SCHEMA_VERSION,
    AgentRecord,
    CallRecord,
    ServiceRecord,
    StateError,
    Store,
    TaskConflict,
    TaskFenced,
    TaskNotFound,
    VmRecord,
)
from fireclaw.supervisor.state_pg import PgStore


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db_path(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "state" / "swarm.db"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


#: Opens a store of the same shared state as the host named ``host``, with its
#: own local database at ``local``: another host of a cluster (one host, for SQLite,
#: is the same file opened again).
OpenStore = Callable[[str, pathlib.Path], Store]


@pytest.fixture(params=["sqlite", "postgresql"])
def stores(
    request: pytest.FixtureRequest, db_path: pathlib.Path, clock: FakeClock
) -> Iterator[OpenStore]:
    opened: list[Store] = []

    def open_store(host: str, local: pathlib.Path) -> Store:
        if request.param == "sqlite":
            s = Store.open(db_path, clock=clock, host=host)
        else:
            cluster = request.getfixturevalue("pg_cluster")
            s = PgStore.connect(
                request.getfixturevalue("pg_dsn"),
                host=host,
                local=local,
                password_file=cluster.password_file,
                clock=clock,
            )
        opened.append(s)
        return s

    try:
        yield open_store
    finally:
        for s in opened:
            s.close()


@pytest.fixture
def store(stores: OpenStore, db_path: pathlib.Path) -> Store:
    return stores("here", db_path)


@pytest.fixture
def sqlite_store(db_path: pathlib.Path, clock: FakeClock) -> Iterator[Store]:
    with Store.open(db_path, clock=clock) as s:
        yield s


# --- opening ---------------------------------------------------------------


def test_open_creates_private_dir_file_and_schema(db_path: pathlib.Path) -> None:
    with Store.open(db_path) as store:
        assert store.path == db_path
        assert (db_path.parent.stat().st_mode & 0o777) == 0o700
        assert (db_path.stat().st_mode & 0o777) == 0o600
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        conn.close()
    assert {"tasks", "events", "restarts", "vms", "scales"} <= tables


def test_connection_settings(sqlite_store: Store) -> None:
    conn = sqlite_store._conn
    assert conn.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
    assert conn.execute("PRAGMA foreign_keys").fetchone() == (1,)
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] > 0


def test_task_changes_commit_fully_synced_and_the_rest_normally(sqlite_store: Store) -> None:
    """Each task change runs with synchronous=FULL; registry and events do not."""
    store = sqlite_store
    seen: list[str] = []
    store._conn.set_trace_callback(seen.append)

    def levels(fn: Callable[[], object]) -> list[str]:
        seen.clear()
        fn()
        return [s.split("=")[1].strip() for s in seen if "PRAGMA synchronous" in s]

    task = store.add_task("worker", "p")
    assert levels(lambda: store.add_task("worker", "q")) == ["FULL", "NORMAL"]
    assert levels(lambda: store.claim_task("worker", "worker-0")) == ["FULL", "NORMAL"]
    finish = lambda: store.finish_task(task.id, epoch=1, ok=True, exit_code=0, result="")  # noqa: E731
    assert levels(finish) == [
        "FULL",
        "NORMAL",
    ]
    assert levels(lambda: store.event("crashed", "worker-0")) == []
    assert levels(lambda: store.drop_vm("worker-0")) == []
    assert store._conn.execute("PRAGMA synchronous").fetchone() == (1,)


def test_one_host_claims_under_a_fixed_name_not_the_machines(sqlite_store: Store) -> None:
    """A renamed machine must still find the tasks it claimed its own."""
    sqlite_store.add_task("worker", "x")
    claim = sqlite_store.claim_task("worker", "worker-0")
    assert claim is not None and claim.host == "local"
    assert [t.id for t in sqlite_store.requeue_orphans(set(), max_attempts=3)] == [claim.id]


def test_reopen_keeps_data_and_does_not_migrate_again(db_path: pathlib.Path) -> None:
    with Store.open(db_path) as store:
        task = store.add_task("coder", "hello")
    with Store.open(db_path) as store:
        assert store.get_task(task.id) == task


def test_corrupt_file_is_one_line_naming_it(db_path: pathlib.Path) -> None:
    db_path.parent.mkdir()
    db_path.write_bytes(b"this is not a database, just some text\n" * 200)
    with pytest.raises(StateError) as info:
        Store.open(db_path)
    message = str(info.value)
    assert str(db_path) in message and "\n" not in message
    assert "not a database" in message


def test_directory_in_place_of_file(db_path: pathlib.Path) -> None:
    db_path.mkdir(parents=True)
    with pytest.raises(StateError, match="swarm.db") as info:
        Store.open(db_path)
    assert "\n" not in str(info.value)


def test_unreadable_file(db_path: pathlib.Path) -> None:
    Store.open(db_path).close()
    db_path.chmod(0)
    try:
        os.close(os.open(db_path, os.O_RDONLY))
    except PermissionError:
        pass
    else:
        pytest.skip("this user reads any file (root with CAP_DAC_OVERRIDE)")
    with pytest.raises(StateError, match="swarm.db"):
        Store.open(db_path)


def test_newer_schema_is_refused(db_path: pathlib.Path) -> None:
    Store.open(db_path).close()
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StateError, match="schema version 99 is newer"):
        Store.open(db_path)


def test_closed_store_raises_state_error(db_path: pathlib.Path) -> None:
    store = Store.open(db_path)
    store.close()
    store.close()  # idempotent
    with pytest.raises(StateError, match="swarm.db"):
        store.add_task("coder", "x")


# --- tasks -----------------------------------------------------------------


def test_task_round_trip(store: Store, clock: FakeClock) -> None:
    task = store.add_task("coder", "write a haiku")
    assert task.role == "coder" and task.prompt == "write a haiku"
    assert task.state == "queued" and task.attempts == 0
    assert task.owner is None and task.exit_code is None and task.result is None
    assert (task.epoch, task.host) == (0, None)
    assert task.created_at == task.updated_at == 1000.0
    assert store.get_task(task.id) == task
    assert store.get_task(task.id + 1) is None

    clock.now = 1001.0
    claimed = store.claim_task("coder", "coder-0")
    assert claimed is not None
    assert (claimed.id, claimed.state, claimed.owner) == (task.id, "claimed", "coder-0")
    assert (claimed.epoch, claimed.host) == (1, "here")
    assert claimed.updated_at == 1001.0 and claimed.created_at == 1000.0

    clock.now = 1002.0
    done = store.finish_task(task.id, epoch=1, ok=True, exit_code=0, result="five seven five")
    assert (done.state, done.exit_code, done.result) == ("done", 0, "five seven five")
    assert done.owner == "coder-0" and done.updated_at == 1002.0
    assert store.get_task(task.id) == done


def test_failed_finish(store: Store) -> None:
    task = store.add_task("coder", "x")
    claim = store.claim_task("coder", "coder-0")
    assert claim is not None
    failed = store.finish_task(task.id, epoch=claim.epoch, ok=False, exit_code=2, result="boom")
    assert (failed.state, failed.exit_code, failed.result) == ("failed", 2, "boom")


def test_finish_needs_a_claimed_task(store: Store) -> None:
    task = store.add_task("coder", "x")
    with pytest.raises(TaskConflict, match=f"task {task.id} is queued"):
        store.finish_task(task.id, epoch=0, ok=True, exit_code=0, result="")
    with pytest.raises(TaskNotFound):
        store.finish_task(task.id + 100, epoch=0, ok=True, exit_code=0, result="")
    store.claim_task("coder", "coder-0")
    store.finish_task(task.id, epoch=1, ok=True, exit_code=0, result="")
    with pytest.raises(TaskConflict, match="is done") as refused:
        store.finish_task(task.id, epoch=1, ok=False, exit_code=1, result="late")
    assert not isinstance(refused.value, TaskFenced)
    assert store.get_task(task.id).result == ""  # type: ignore[union-attr]


def test_a_write_of_an_older_claim_is_fenced(store: Store) -> None:
    """Each claim is a new epoch; the writer of an older one changes nothing."""
    task = store.add_task("coder", "x")
    first = store.claim_task("coder", "coder-0")
    assert first is not None and first.epoch == 1
    store.requeue_task(task.id, epoch=1, reason="vm lost", max_attempts=5)
    second = store.claim_task("coder", "coder-1")
    assert second is not None and (second.id, second.epoch) == (task.id, 2)
    with pytest.raises(TaskFenced, match=f"task {task.id} was claimed again .epoch 2.*epoch 1"):
        store.finish_task(task.id, epoch=1, ok=True, exit_code=0, result="stale")
    with pytest.raises(TaskFenced):
        store.requeue_task(task.id, epoch=1, reason="stale", max_attempts=5)
    assert store.get_task(task.id) == second  # nothing changed
    done = store.finish_task(task.id, epoch=2, ok=True, exit_code=0, result="fresh")
    assert (done.state, done.owner, done.result) == ("done", "coder-1", "fresh")
    with pytest.raises(TaskFenced):  # a fenced write is a conflict to those who ask no more
        store.finish_task(task.id, epoch=1, ok=True, exit_code=0, result="stale")
    assert issubclass(TaskFenced, TaskConflict)


def test_claim_takes_the_oldest_of_the_role(store: Store) -> None:
    a = store.add_task("coder", "a")
    r = store.add_task("reviewer", "r")
    b = store.add_task("coder", "b")
    assert store.claim_task("tester", "t-0") is None
    assert store.claim_task("coder", "coder-0").id == a.id  # type: ignore[union-attr]
    assert store.claim_task("coder", "coder-1").id == b.id  # type: ignore[union-attr]
    assert store.claim_task("coder", "coder-2") is None
    assert store.claim_task("reviewer", "reviewer-0").id == r.id  # type: ignore[union-attr]
    assert store.count_queued("coder") == 0


def test_two_claimers_never_get_the_same_task(db_path: pathlib.Path) -> None:
    with Store.open(db_path) as store:
        ids = {store.add_task("coder", f"t{i}").id for i in range(300)}
    start = threading.Barrier(2)
    claimed: dict[str, list[int]] = {"a": [], "b": []}

    def claimer(owner: str) -> None:
        # Separate connections, as two processes would have.
        with Store.open(db_path) as own:
            start.wait(timeout=10)
            while (task := own.claim_task("coder", owner)) is not None:
                assert task.owner == owner
                claimed[owner].append(task.id)

    threads = [threading.Thread(target=claimer, args=(o,)) for o in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive()
    a, b = set(claimed["a"]), set(claimed["b"])
    assert len(a) == len(claimed["a"]) and len(b) == len(claimed["b"])
    assert not a & b
    assert a | b == ids


def test_requeue_counts_attempts_until_failed(store: Store) -> None:
    task = store.add_task("coder", "x")
    for attempt in (1, 2):
        claim = store.claim_task("coder", "coder-0")
        assert claim is not None and claim.epoch == attempt
        again = store.requeue_task(task.id, epoch=attempt, reason="vm crashed", max_attempts=3)
        assert (again.state, again.attempts, again.owner) == ("queued", attempt, None)
        assert again.result == "vm crashed"
    store.claim_task("coder", "coder-0")
    final = store.requeue_task(task.id, epoch=3, reason="vm crashed again", max_attempts=3)
    assert (final.state, final.attempts, final.result) == ("failed", 3, "vm crashed again")
    assert final.owner == "coder-0"
    assert store.claim_task("coder", "coder-1") is None


def test_requeue_needs_a_claimed_task(store: Store) -> None:
    task = store.add_task("coder", "x")
    with pytest.raises(TaskConflict):
        store.requeue_task(task.id, epoch=0, reason="r", max_attempts=3)
    with pytest.raises(TaskNotFound):
        store.requeue_task(999, epoch=0, reason="r", max_attempts=3)
    with pytest.raises(ValueError):
        store.requeue_task(task.id, epoch=0, reason="r", max_attempts=0)
    assert store.get_task(task.id) == task


def test_requeue_orphans(store: Store) -> None:
    a = store.add_task("coder", "a")
    b = store.add_task("coder", "b")
    c = store.add_task("coder", "c")
    queued = store.add_task("coder", "queued")
    done = store.add_task("reviewer", "done")
    store.claim_task("coder", "coder-0")
    store.claim_task("coder", "coder-1")
    store.claim_task("coder", "coder-2")
    store.claim_task("reviewer", "coder-0")
    store.finish_task(done.id, epoch=1, ok=True, exit_code=0, result="ok")

    orphans = store.requeue_orphans({"coder-1"}, max_attempts=2)
    assert [(t.id, t.state, t.attempts, t.owner) for t in orphans] == [
        (a.id, "queued", 1, None),
        (c.id, "queued", 1, None),
    ]
    assert orphans[0].result == "owner coder-0 is gone"
    assert store.get_task(b.id).state == "claimed"  # type: ignore[union-attr]
    assert store.get_task(queued.id).attempts == 0  # type: ignore[union-attr]
    assert store.get_task(done.id).state == "done"  # type: ignore[union-attr]

    # Same accounting as requeue_task: the second loss exhausts max_attempts.
    assert store.claim_task("coder", "coder-3").id == a.id  # type: ignore[union-attr]
    (again,) = store.requeue_orphans({"coder-1"}, max_attempts=2)
    assert (again.id, again.state, again.attempts) == (a.id, "failed", 2)
    assert store.requeue_orphans({"coder-1"}, max_attempts=2) == []


def test_requeue_orphans_leaves_other_hosts_tasks(
    stores: OpenStore, tmp_path: pathlib.Path
) -> None:
    """A host starting again requeues the tasks of its own gone VMs only: the
    same VM name on another host is another VM."""
    here = stores("here", tmp_path / "here.db")
    there = stores("there", tmp_path / "there.db")
    mine = here.add_task("coder", "mine")
    theirs = here.add_task("coder", "theirs")
    assert here.claim_task("coder", "coder-0").id == mine.id  # type: ignore[union-attr]
    claimed = there.claim_task("coder", "coder-0")
    assert claimed is not None and (claimed.id, claimed.host) == (theirs.id, "there")
    assert [t.id for t in here.requeue_orphans(set(), max_attempts=3)] == [mine.id]
    assert here.get_task(theirs.id).state == "claimed"  # type: ignore[union-attr]
    assert there.count_queued("coder") == 1


def test_a_live_host_keeps_its_tasks(stores: OpenStore, tmp_path: pathlib.Path) -> None:
    here = stores("here", tmp_path / "here.db")
    there = stores("there", tmp_path / "there.db")
    here.add_task("coder", "x")
    there.heartbeat()
    assert there.claim_task("coder", "coder-0") is not None
    here.heartbeat()
    assert here.requeue_silent(silent_after=3600, max_attempts=3) == []
    assert here.count_tasks()["claimed"] == 1
    with pytest.raises(ValueError):
        here.requeue_silent(silent_after=3600, max_attempts=0)


def test_hosts_heartbeat(store: Store) -> None:
    assert store.hosts() == []
    store.heartbeat()
    store.heartbeat()
    (host,) = store.hosts()
    assert host.name == "here"
    assert host.started_at <= host.heartbeat_at
    assert 0 <= host.age < 60  # counted by the database's clock, not the test's


def test_list_and_count(store: Store) -> None:
    none = {"queued": 0, "claimed": 0, "waiting_for_input": 0, "done": 0, "failed": 0}
    assert store.count_tasks() == none
    tasks = [store.add_task("coder", str(i)) for i in range(5)]
    store.claim_task("coder", "coder-0")
    assert store.count_tasks() == {**none, "queued": 4, "claimed": 1}
    assert [t.id for t in store.list_tasks()] == [t.id for t in reversed(tasks)]
    assert [t.id for t in store.list_tasks(limit=2)] == [tasks[4].id, tasks[3].id]
    assert [t.id for t in store.list_tasks(state="claimed")] == [tasks[0].id]
    assert store.list_tasks(state="done") == []


# --- durability --------------------------------------------------------------

CRASHER = """
import os, signal, sqlite3, sys
from pathlib import Path
from fireclaw.supervisor.state import Store

path = Path(sys.argv[1])
store = Store.open(path)
store.add_task("coder", "committed before the crash")
# A second writer is mid-transaction when the process dies.
raw = sqlite3.connect(path, isolation_level=None)
raw.execute("BEGIN IMMEDIATE")
raw.execute(
    "INSERT INTO tasks (role, prompt, state, attempts, created_at, updated_at)"
    " VALUES ('coder', 'never committed', 'queued', 0, 0, 0)"
)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_committed_tasks_survive_kill_9(db_path: pathlib.Path) -> None:
    with Store.open(db_path) as store:
        before = [store.add_task("coder", f"before {i}") for i in range(3)]
        result = subprocess.run(
            [sys.executable, "-c", CRASHER, str(db_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == -signal.SIGKILL, result.stderr
        # The dead writer's lock is gone: this connection can still write.
        store.add_task("coder", "after")
    with Store.open(db_path) as store:
        prompts = [t.prompt for t in reversed(store.list_tasks())]
    assert prompts == [t.prompt for t in before] + ["committed before the crash", "after"]


# --- events, restarts, vms, scales -------------------------------------------


def test_events_are_ordered_and_paged(store: Store, clock: FakeClock) -> None:
    for i in range(5):
        clock.now = 2000.0 + i
        store.event("vm.started", f"coder-{i}", pid=100 + i, disk=pathlib.Path("/x"), ok=True)
    events = store.events()
    assert [e.subject for e in events] == [f"coder-{i}" for i in range(5)]
    assert [e.at for e in events] == [2000.0 + i for i in range(5)]
    ids = [e.id for e in events]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert events[0].kind == "vm.started"
    assert events[0].detail == {"pid": 100, "disk": "/x", "ok": True}
    page = store.events(after=ids[1], limit=2)
    assert [e.id for e in page] == ids[2:4]
    assert store.events(after=ids[-1]) == []


def test_event_without_detail(store: Store) -> None:
    store.event("supervisor.up", "swarm")
    (event,) = store.events()
    assert event.detail == {}


def test_the_ledger_sums_model_calls(store: Store) -> None:
    def call(at: float, agent: str | None, role: str, task: int | None, p: int, c: int) -> None:
        store.record_call(
            CallRecord(
                at=at, agent=agent, role=role, vm=f"{role}-0", task=task, model="m",
                prompt_tokens=p, completion_tokens=c, duration=0.5, outcome="ok",
            )  # fmt: skip
        )

    call(10.0, "alice", "coder", None, 100, 20)
    call(20.0, None, "worker", 7, 5, 5)
    call(30.0, "alice", "coder", None, 1, 2)
    assert store.spent(since=0.0) == 133
    assert store.spent(since=15.0) == 13
    assert store.spent(since=0.0, role="worker") == 10
    by_agent = store.usage(by="agent")
    assert [(u.key, u.calls, u.tokens) for u in by_agent] == [("alice", 2, 123), (None, 1, 10)]
    assert [(u.key, u.tokens) for u in store.usage(by="task", key="7")] == [("7", 10)]
    assert store.usage(by="role", since=25.0)[0].key == "coder"
    calls = store.calls()
    assert [(c.at, c.agent, c.task) for c in calls] == [
        (10.0, "alice", None),
        (20.0, None, 7),
        (30.0, "alice", None),
    ]
    assert calls[1].vm == "worker-0" and calls[1].duration == 0.5
    assert store.calls(limit=1) == calls[:1]


def test_a_task_names_its_account_and_a_deferral_costs_no_attempt(store: Store) -> None:
    task = store.add_task("coder", "fix it")
    assert task.account is None
    claimed = store.claim_task("coder", "coder-0")
    assert claimed is not None
    assert store.assign_account(task.id, epoch=claimed.epoch, account="work").account == "work"
    back = store.defer_task(task.id, epoch=claimed.epoch, reason="account work rate-limited")
    assert (back.state, back.attempts, back.owner) == ("queued", 0, None)
    assert back.account == "work" and back.result == "account work rate-limited"
    with pytest.raises(TaskConflict):
        store.defer_task(task.id, epoch=claimed.epoch, reason="again")
    again = store.claim_task("coder", "coder-1")
    assert again is not None and again.epoch == claimed.epoch + 1
    with pytest.raises(TaskFenced):
        store.assign_account(task.id, epoch=claimed.epoch, account="home")
    store.assign_account(task.id, epoch=again.epoch, account="home")
    done = store.finish_task(task.id, epoch=again.epoch, ok=True, exit_code=0, result="ok")
    assert (done.state, done.account) == ("done", "home")
    assert store.get_task(task.id) == done


def test_account_exhaustion_is_kept_and_replaced(stores: OpenStore, db_path: pathlib.Path) -> None:
    store = stores("here", db_path)
    assert store.exhausted_accounts("coder") == {}
    store.exhaust_account("coder", "work", until=2000.0, reason="429")
    store.exhaust_account("worker", "work", until=3000.0, reason="credit")
    store.exhaust_account("coder", "work", until=2500.0, reason="429 again")
    assert store.exhausted_accounts("coder") == {"work": 2500.0}
    store.close()
    # Another opening of the same state (a restarted supervisor) sees it.
    assert stores("here", db_path).exhausted_accounts("worker") == {"work": 3000.0}


def test_the_ledger_sums_each_account(store: Store) -> None:
    def call(at: float, role: str, account: str | None, tokens: int) -> None:
        store.record_call(
            CallRecord(
                at=at, agent=None, role=role, vm=f"{role}-0", task=None, model="m",
                prompt_tokens=tokens, completion_tokens=1, duration=0.1, outcome="ok",
                account=account,
            )  # fmt: skip
        )

    call(10.0, "coder", "work", 10)
    call(20.0, "coder", "home", 20)
    call(30.0, "coder", "work", 30)
    call(30.0, "worker", "work", 99)
    call(30.0, "coder", None, 99)
    assert store.account_spent("coder", since=0.0) == {"work": 42, "home": 21}
    assert store.account_spent("coder", since=15.0) == {"work": 31, "home": 21}
    assert [c.account for c in store.calls()] == ["work", "home", "work", "work", None]


def test_restarts(store: Store) -> None:
    assert store.restart_count("coder-0") == 0
    store.record_restart("coder-0", "coder", reason="backoff", exit_code=1, delay=2.0)
    store.record_restart("coder-0", "coder", reason="stable run", exit_code=None, delay=0.0)
    store.record_restart("coder-1", "coder", reason="backoff", exit_code=137, delay=1.0)
    assert store.restart_count("coder-0") == 2
    assert store.restart_count("coder-1") == 1


def vm(name: str, **kw: object) -> VmRecord:
    base: dict[str, object] = {
        "name": name,
        "role": "coder",
        "pid": 4242,
        "start_time": 123456,
        "boot_id": "b" * 36,
        "spec_hash": "f" * 64,
    }
    return VmRecord(**(base | kw))  # type: ignore[arg-type]


def test_vm_registry(db_path: pathlib.Path) -> None:
    with Store.open(db_path) as store:
        assert store.vms() == []
        b = vm("coder-1", netns="fc-coder-1", cgroup="/sys/fs/cgroup/fc/coder-1")
        a = vm("coder-0", socket="/run/fc/coder-0.sock", log="/var/log/fc/coder-0.log")
        store.put_vm(b)
        store.put_vm(a)
        assert store.vms() == [a, b]
        moved = vm("coder-0", pid=5000, start_time=999)
        store.put_vm(moved)
        assert store.vms() == [moved, b]
        store.drop_vm("coder-0")
        store.drop_vm("no-such-vm")
    with Store.open(db_path) as store:
        assert store.vms() == [b]


def test_service_registry_is_written_ahead_then_identified_then_dropped(
    db_path: pathlib.Path,
) -> None:
    ahead = ServiceRecord(name="ircd", command="/usr/sbin/ngircd", address="127.0.0.1:6667")
    model = ServiceRecord(
        name="model", command="/usr/bin/llama-server", pid=77, start_time=5, boot_id="b" * 36
    )
    with Store.open(db_path) as store:
        assert store.services() == []
        store.put_service(ahead)
        store.put_service(model)
        assert store.services() == [ahead, model]
        assert (ahead.pid, ahead.start_time, ahead.boot_id) == (0, 0, "")
        spawned = ServiceRecord(
            name="ircd",
            command="/usr/sbin/ngircd",
            pid=4242,
            start_time=123456,
            boot_id="b" * 36,
            address="127.0.0.1:6667",
        )
        store.put_service(spawned)  # the same name: replaced, not added
        assert store.services() == [spawned, model]
    with Store.open(db_path) as store:  # it survives the supervisor
        assert store.services() == [spawned, model]
        store.drop_service("ircd")
        store.drop_service("no-such-service")
        assert store.services() == [model]
        with pytest.raises(StateError, match="CHECK constraint"):
            store.put_service(ServiceRecord(name="bad", command="x", pid=-1))


def test_a_vm_row_keeps_what_adoption_needs(db_path: pathlib.Path) -> None:
    rec = vm(
        "worker-1",
        netns="fireclaw-abc123-worker-1-f00",
        socket="/state/logs/run/abc123-worker-1-f00/qmp.sock",
        vm_id="abc123-worker-1-f00",
        port=7000,
        irc_port=41234,
        veth="fcabc123v0a1b2c",
        address="10.240.0.3",
        disk="/state/disks/abc123-worker-1-f00.qcow2",
        guest_id="abc123-tpl-0011-aa",
        guest_token="t" * 32,
        claimed=True,
        agent="alice",
        workspace=True,
        started_as="restored 0011223344556677",
    )
    with Store.open(db_path) as store:
        store.put_vm(rec)
    with Store.open(db_path) as store:
        assert store.vms() == [rec]
    # It holds a guest's token: readable by its owner only.
    assert db_path.stat().st_mode & 0o077 == 0


def test_scales(store: Store) -> None:
    assert store.scales() == {}
    store.set_scale("coder", 3)
    store.set_scale("reviewer", 0)
    store.set_scale("coder", 5)
    assert store.scales() == {"coder": 5, "reviewer": 0}
    store.clear_scale("coder")
    store.clear_scale("nobody")
    assert store.scales() == {"reviewer": 0}
    with pytest.raises(ValueError):
        store.set_scale("coder", -1)


def test_named_agents_round_trip_and_update(store: Store) -> None:
    store.put_agent(AgentRecord(name="alice", role="coder"))
    store.put_agent(AgentRecord(name="bob", role="worker", model="m1"))
    store.put_agent(AgentRecord(name="alice", role="coder", persona="terse"))
    assert store.agents() == [
        AgentRecord(name="alice", role="coder", persona="terse"),
        AgentRecord(name="bob", role="worker", model="m1"),
    ]
    store.drop_agent("alice")
    assert [a.name for a in store.agents()] == ["bob"]


def test_a_version_1_database_is_migrated_with_its_data(db_path: pathlib.Path) -> None:
    db_path.parent.mkdir()
    conn = sqlite3.connect(db_path)
    for statement in state_schema.MIGRATIONS[0]:  # the version 1 schema, as it shipped
        conn.execute(statement)
    conn.execute("INSERT INTO scales VALUES ('worker', 3)")
    conn.execute(
        "INSERT INTO vms (name, role, pid, start_time, boot_id, spec_hash)"
        " VALUES ('worker-0', 'worker', 42, 7, 'boot', 'hash')"
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with Store.open(db_path) as store:
        assert store.scales() == {"worker": 3}
        assert store.agents() == []
        # A VM row of before adoption: nothing to adopt it with, so it is reclaimed.
        (vm,) = store.vms()
        assert (vm.name, vm.pid, vm.start_time) == ("worker-0", 42, 7)
        assert (vm.vm_id, vm.port, vm.guest_token, vm.claimed, vm.agent) == ("", 0, "", False, None)
        store.put_agent(AgentRecord(name="alice", role="coder"))
    with Store.open(db_path) as store:
        assert [a.name for a in store.agents()] == ["alice"]


def test_a_version_2_database_gains_the_service_registry(db_path: pathlib.Path) -> None:
    db_path.parent.mkdir()
    conn = sqlite3.connect(db_path)
    for migration in state_schema.MIGRATIONS[:2]:  # the schema as version 2 made it
        for statement in migration:
            conn.execute(statement)
    conn.execute("INSERT INTO agents VALUES ('alice', 'coder', NULL, NULL, 1.0)")
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    with Store.open(db_path) as store:
        assert [a.name for a in store.agents()] == ["alice"]
        assert store.services() == []
        store.put_service(ServiceRecord(name="ircd", command="ngircd"))
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    conn.close()


#: Another process (``doctor``, ``gc``, a second ``up``) opens the database and closes it.
OTHER_PROCESS = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
print(conn.execute("SELECT count(*) FROM tasks").fetchone()[0])
conn.close()
"""


def test_a_second_store_in_the_same_process_keeps_the_first_ones_writes_visible(
    db_path: pathlib.Path,
) -> None:
    def seen_by_another_process() -> int:
        done = subprocess.run(
            [sys.executable, "-c", OTHER_PROCESS, str(db_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return int(done.stdout)

    with Store.open(db_path) as store:
        store.add_task("worker", "one")
        # As the supervisor does at start (looking for leftovers): a second Store
        # of the same file in the same process, opened and closed.
        Store.open(db_path).close()
        assert seen_by_another_process() == 1
        # That process's close must not have taken the WAL from under the first
        # Store: what it writes next reaches the file that others (and the next
        # supervisor after a crash) read.
        store.add_task("worker", "two")
        assert seen_by_another_process() == 2
        assert db_path.with_name(db_path.name + "-wal").exists()
