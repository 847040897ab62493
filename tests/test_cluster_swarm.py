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
from pathlib import Path

import pytest
from fireclaw.supervisor.daemon import DB_NAME
from pg import PgCluster
from scripted_model import ScriptedModel, text
from swarmctl import NOTHING, WAIT, Swarm, idle, swarm_yaml
from test_chat_irc import served

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="VMs in their own namespaces need root"),
]

HOST = "alpha"
TASKS = 3


def cluster_yaml(dsn: str, password_file: Path) -> str:
    return f"cluster:\n  database: '{dsn}'\n  host: {HOST}\n  password_file: {password_file}\n"


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
