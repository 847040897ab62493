"""Cluster mode end to end, one host: a real ``fireclaw-swarm up`` (process
backend, each VM in its own network namespace) whose ``cluster:`` section names
a real PostgreSQL (``pg.py``: Debian's server, started by the test). Its chat
agents run tasks, each asking a model through its VM's gateway; afterwards the
tasks, their events and the ledger of those calls are read from PostgreSQL
itself, stamped with the host's name, and the host's own SQLite file holds
none of them. The model server is a test double (``scripted_model.py``)
speaking real HTTP on loopback."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from fireclaw.supervisor.cluster import HEARTBEAT
from fireclaw.supervisor.daemon import DB_NAME
from fireclaw.supervisor.state import TaskFenced
from fireclaw.supervisor.state_pg import PgStore
from pg import PgCluster, start_cluster
from scripted_model import ScriptedModel, text
from swarmctl import NOTHING, WAIT, Swarm, idle, role_yaml, swarm_yaml
from test_chat_irc import served
from test_swarm import open_dir  # noqa: F401  (a fixture)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="VMs in their own namespaces need root"),
]

HOST = "alpha"
TASKS = 3


def cluster_yaml(dsn: str, password_file: Path) -> str:
    return f"cluster:\n  database: '{dsn}'\n  host: {HOST}\n  password_file: {password_file}\n"


def other_host(name: str, cluster: PgCluster, dsn: str, tmp_path: Path) -> PgStore:
    """Another host of the fleet, as the store its supervisor would use."""
    return PgStore.connect(
        dsn, host=name, local=tmp_path / f"{name}.db", password_file=cluster.password_file
    )


def test_tasks_events_and_the_ledger_live_in_postgresql(
    tmp_path: Path, pg_cluster: PgCluster, pg_dsn: str
) -> None:
    model = ScriptedModel([text(f"answer {i}") for i in range(TASKS)])
    role = """
  worker:
    model: scripted
    pool: {min_idle: 1, max_active: 2}
    harness: {kind: chat, tool_mode: native, tools: [], max_steps: 2, max_tokens: 64,
              timeout: 300}
"""
    with served(model) as (url, _token):
        config = (
            f"models:\n  server: {url}\n"
            + swarm_yaml(role)
            + cluster_yaml(pg_dsn, pg_cluster.password_file)
        )
        swarm = Swarm(tmp_path, config)
        try:
            swarm.start()
            swarm.wait_for("an idle worker", idle("worker", 1))
            ids = [
                swarm.api.post("/tasks", {"role": "worker", "prompt": f"task {i}"})["id"]
                for i in range(TASKS)
            ]
            swarm.wait_for(
                f"{TASKS} tasks finished",
                lambda s: s["tasks"]["done"] + s["tasks"]["failed"] == TASKS,
                WAIT,
            )
            results = {swarm.api.get(f"/tasks/{i}")["result"].strip() for i in ids}
            assert swarm.stop() == 0
        finally:
            swarm.close()
    assert results == {f"answer {i}" for i in range(TASKS)}
    assert swarm.leftovers() == NOTHING

    with pg_cluster.connect(pg_dsn.rsplit("/", 1)[1].split("?")[0]) as conn:
        tasks = conn.execute(
            "SELECT id, state, host, epoch, owner FROM tasks ORDER BY id"
        ).fetchall()
        events = conn.execute("SELECT host, kind, detail FROM events").fetchall()
        calls = conn.execute(
            "SELECT host, role, task, model, prompt_tokens, completion_tokens, outcome"
            " FROM model_calls ORDER BY task"
        ).fetchall()
    assert [(i, s, h, e) for i, s, h, e, _ in tasks] == [(i, "done", HOST, 1) for i in ids]
    assert all(owner.startswith("worker-") for *_, owner in tasks)
    assert {h for h, _, _ in events} == {HOST}
    done = [json.loads(d)["task_id"] for _, kind, d in events if kind == "task_done"]
    assert sorted(done) == ids
    # One call per task, with the counts the model server reported.
    assert calls == [(HOST, "worker", i, "scripted", 10, 5, "ok") for i in ids]

    local = sqlite3.connect(tmp_path / "state" / DB_NAME)
    try:
        shared = [local.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                  for t in ("tasks", "events", "model_calls", "agents")]  # fmt: skip
    finally:
        local.close()
    assert shared == [0, 0, 0, 0]


def test_a_task_claimed_by_a_killed_host_is_done_once_after_its_restart(
    tmp_path: Path, pg_cluster: PgCluster, pg_dsn: str, request: pytest.FixtureRequest
) -> None:
    """``kill -9`` of the host's supervisor while its VM runs a task: the next start
    on the same state dir reclaims the VM and requeues the task (its own, by host
    name), which then runs again under a new epoch and is done once."""
    gate = request.getfixturevalue("open_dir") / "gate"  # the agent user can see it there
    harness = (
        'harness: {kind: command, command: ["sh", "-c", '
        f'"while [ ! -e {gate} ]; do sleep 0.05; done; echo done: $FIRECLAW_PROMPT"]}}\n'
    )
    config = swarm_yaml(role_yaml("worker", min_idle=1, extra=harness)) + cluster_yaml(
        pg_dsn, pg_cluster.password_file
    )
    swarm = Swarm(tmp_path, config)
    try:
        swarm.start()
        task = swarm.api.post("/tasks", {"role": "worker", "prompt": "survive"})
        swarm.wait_for("the task claimed", lambda s: s["tasks"]["claimed"] == 1)
        swarm.kill9()
        gate.touch()
        swarm.start()
        swarm.wait_for("the task done", lambda s: s["tasks"]["done"] == 1)
        assert swarm.stop() == 0
    finally:
        swarm.close()
    assert swarm.leftovers() == NOTHING
    with pg_cluster.connect(pg_dsn.rsplit("/", 1)[1].split("?")[0]) as conn:
        row = conn.execute(
            "SELECT state, attempts, epoch, host, result FROM tasks WHERE id = %s", (task["id"],)
        ).fetchone()
        kinds = [k for (k,) in conn.execute("SELECT kind FROM events ORDER BY id")]
    assert row is not None
    state, attempts, epoch, host, result = row
    assert (state, attempts, epoch, host) == ("done", 1, 2, HOST)
    assert result.strip() == "done: survive"
    assert kinds.count("task_done") == 1
    assert "reclaimed" in kinds and "task_requeued" in kinds


def test_tasks_another_host_queues_are_run_here(
    tmp_path: Path, pg_cluster: PgCluster, pg_dsn: str
) -> None:
    """Host beta (here the test, with the store a supervisor uses) queues tasks in
    the shared database; alpha's supervisor hears of them and runs them."""
    config = swarm_yaml(role_yaml("worker", min_idle=1)) + cluster_yaml(
        pg_dsn, pg_cluster.password_file
    )
    swarm = Swarm(tmp_path, config)
    try:
        swarm.start()
        swarm.wait_for("an idle worker", idle("worker", 1))
        with other_host("beta", pg_cluster, pg_dsn, tmp_path) as beta:
            ids = [beta.add_task("worker", f"from beta {i}").id for i in range(2)]
            swarm.wait_for("beta's tasks done", lambda s: s["tasks"]["done"] == 2, WAIT)
            rows = [beta.get_task(i) for i in ids]
            hosts = {h.name: h for h in beta.hosts()}
        assert swarm.stop() == 0
    finally:
        swarm.close()
    assert swarm.leftovers() == NOTHING
    # alpha beats (beta, which only queued, never did); stamped by the database's clock.
    assert list(hosts) == [HOST]
    assert hosts[HOST].age < WAIT
    for i, row in enumerate(rows):
        assert row is not None and (row.state, row.host) == ("done", HOST)
        assert row.result is not None and row.result.endswith(f": from beta {i}\n")


def test_the_tasks_of_a_silent_host_are_run_here_and_its_late_result_is_fenced(
    tmp_path: Path, pg_cluster: PgCluster, pg_dsn: str
) -> None:
    """Host ghost (here the test, with the store a supervisor uses) claims a task,
    heartbeats once and falls silent. Past ``silent_after`` alpha's supervisor
    requeues it and runs it; ghost's result, when it comes, changes nothing."""
    silent_after = 15.0  # the least the config allows
    config = swarm_yaml(role_yaml("worker", min_idle=1)) + cluster_yaml(
        pg_dsn, pg_cluster.password_file
    ).replace("\n  host:", f"\n  silent_after: {silent_after}\n  host:")
    swarm = Swarm(tmp_path, config)
    try:
        with other_host("ghost", pg_cluster, pg_dsn, tmp_path) as ghost:
            task = ghost.add_task("worker", "orphaned")
            claim = ghost.claim_task("worker", "worker-0")
            assert claim is not None and claim.host == "ghost"
            ghost.heartbeat()
            silent_since = time.monotonic()
            swarm.start()
            # Silence, then alpha's next heartbeat round: with headroom for load.
            swarm.wait_for(
                "the ghost's task done here",
                lambda s: s["tasks"]["done"] == 1,
                silent_after + WAIT,
            )
            took = time.monotonic() - silent_since
            print(
                f"\nfrom a host's last heartbeat to its task done elsewhere: {took:.1f} s"
                f" (silent_after {silent_after:.0f} s, heartbeats every {HEARTBEAT:.0f} s)"
            )
            assert took >= silent_after  # not before the host was silent long enough
            with pytest.raises(TaskFenced):
                ghost.finish_task(task.id, epoch=claim.epoch, ok=True, exit_code=0, result="late")
            row = ghost.get_task(task.id)
        events = swarm.events("task_requeued")
        assert swarm.stop() == 0
    finally:
        swarm.close()
    assert swarm.leftovers() == NOTHING
    assert row is not None
    assert (row.state, row.host, row.epoch, row.attempts) == ("done", HOST, 2, 1)
    assert row.result is not None and row.result.endswith(": orphaned\n")
    assert [e["detail"]["reason"] for e in events] == ["host ghost is silent"]


def test_a_host_out_of_its_database_stops_its_task_runners(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The database goes away under a running task: a beat before other hosts
    may take that task, this host stops the VM running it, so that it never
    runs on two hosts; the rest of the supervisor runs on, and stops cleanly."""
    silent_after = 15.0
    gate = request.getfixturevalue("open_dir") / "never"  # the task runs until stopped
    harness = (
        'harness: {kind: command, command: ["sh", "-c", '
        f'"while [ ! -e {gate} ]; do sleep 0.05; done"]}}\n'
    )
    cluster = start_cluster()  # its own: this test stops it
    swarm: Swarm | None = None
    try:
        dsn = cluster.dsn(cluster.create_database())
        config = swarm_yaml(role_yaml("worker", min_idle=1, extra=harness)) + cluster_yaml(
            dsn, cluster.password_file
        ).replace("\n  host:", f"\n  silent_after: {silent_after}\n  host:")
        swarm = Swarm(tmp_path, config)
        swarm.start()
        swarm.api.post("/tasks", {"role": "worker", "prompt": "long"})
        swarm.wait_for("the task running", lambda s: bool(active(s)))
        cluster.stop()
        swarm.wait_for("its runner stopped", lambda s: not active(s), silent_after + WAIT)
        assert "stopped 1 VMs running tasks, which other hosts will run" in swarm.tail(200)
        assert swarm.stop() == 0
    finally:
        if swarm is not None:
            swarm.close()
        cluster.stop()
    assert swarm.leftovers() == NOTHING


def active(status: dict[str, Any]) -> list[str]:
    return [a["name"] for a in status["agents"] if a["state"] == "active"]
