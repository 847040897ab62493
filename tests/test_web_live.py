"""The dashboard's view of agents at work, on a real swarm: a real ``fireclaw-swarm up``
(process-backend VMs, each in its own network namespace), its managed ngircd, an
operator on IRC played by the independent ``irc`` library, and a SCRIPTED
OpenAI-compatible model server (``scripted_model.py``, a test double named as such)
behind the VMs' gateways, so that a chat call is quick and its tokens known.

What an agent and a person say in #agents comes out of ``/v1/chat`` as plain
text, secrets redacted; the chat call moves the gateway latency histogram; the
usage chart's buckets sum to what the ledger holds.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from ircperson import Person
from scripted_model import ScriptedModel, text
from swarmctl import NOTHING, WAIT, Swarm, swarm_yaml
from test_chat_irc import AGENTS, CONTROL, chat_role, invoke_alice, served
from test_swarm import free_port
from test_web import READ, TIMEOUT, bearer, http_yaml, url_of
from test_web_metrics import scrape

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="VMs in their own namespaces need root"),
]

#: The model the shipped config serves, served here by the scripted server.
MODEL = "smollm2"
#: One long poll of /v1/chat; the test's own deadline is WAIT.
CHAT_WAIT = 20
#: The chat harness answering with what the model wrote: native mode, no tools.
HARNESS = "{kind: chat, tool_mode: native, tools: [], max_steps: 2, max_tokens: 64, timeout: 120}"


def live_irc_yaml(port: int) -> str:
    # Who may command is not what this test is about: a hostmask is enough here.
    return (
        f"server: managed\n  managed: {{port: {port}}}\n"
        "  operator_auth: hostmask\n  operators: ['op!*@127.0.0.1']\n"
        "  password_file: irc-server.pw"
    )


def chat_until(
    url: str, pred: Callable[[list[dict[str, Any]]], bool], what: str
) -> list[dict[str, Any]]:
    """Every line of /v1/chat, long-polled until ``pred`` holds of them all."""
    deadline = time.monotonic() + WAIT
    lines: list[dict[str, Any]] = []
    last = 0
    while not pred(lines):
        assert time.monotonic() < deadline, f"timed out waiting for {what} in /v1/chat: {lines}"
        answer = requests.get(
            f"{url}/v1/chat?after={last}&wait={CHAT_WAIT}",
            headers=bearer(READ),
            timeout=CHAT_WAIT + TIMEOUT,
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["channel"] == AGENTS
        lines += body["lines"]
        last = body["last"]
    return lines


def test_agents_talk_and_their_calls_show_in_chat_metrics_and_usage(tmp_path: Path) -> None:
    irc_password = "pw-" + os.urandom(12).hex()
    pw_file = tmp_path / "irc-server.pw"
    pw_file.write_text(irc_password + "\n")
    pw_file.chmod(0o600)
    model = ScriptedModel([text("Hello from alice.")], models=(MODEL,))
    port = free_port()
    op: Person | None = None
    with served(model) as (model_url, _):
        config = (
            f"models:\n  server: {model_url}\n"
            + swarm_yaml(chat_role(MODEL, HARNESS), irc=live_irc_yaml(port))
            + http_yaml(tmp_path)
        )
        swarm = Swarm(tmp_path, config)
        try:
            swarm.start()
            url = url_of(swarm)
            op = Person(("127.0.0.1", port), "op", password=irc_password).start(CONTROL, AGENTS)
            invoke_alice(op, swarm, WAIT)
            before = scrape(url)

            # A person says something that is HTML, a secret and a token; alice answers.
            said = f"alice: <img src=x onerror=alert(1)> & {irc_password} {READ}"
            op.say(AGENTS, said)
            op.said(AGENTS, "op: Hello from alice.")
            lines = chat_until(
                url, lambda ls: any(x["nick"] == "alice" for x in ls), "alice's answer"
            )
            by_op = [x for x in lines if x["nick"] == "op"]
            assert [x["text"] for x in by_op] == [
                "alice: <img src=x onerror=alert(1)> & [redacted] [redacted]"
            ]
            assert [x["text"] for x in lines if x["nick"] == "alice"] == ["op: Hello from alice."]
            assert all(x["action"] is False for x in lines)
            ids = [x["id"] for x in lines]
            assert ids == sorted(ids) and len(set(ids)) == len(ids)
            # A reader that has seen them all waits; one that asks for the newest gets it.
            newest = requests.get(
                f"{url}/v1/chat?limit=1", headers=bearer(READ), timeout=TIMEOUT
            ).json()
            assert [x["id"] for x in newest["lines"]] == [ids[-1]] == [newest["last"]]

            # Her call went through her gateway: once it is in the ledger (the answer's
            # first line reaches IRC before the call ends), the histogram has it.
            def calls() -> list[dict[str, Any]]:
                return [e["detail"] for e in swarm.events("model_call")]

            swarm.wait_for("alice's model call in the audit trail", lambda _: len(calls()) == 1)
            (call,) = calls()
            assert (call["role"], call["model"], call["outcome"]) == ("worker", MODEL, "ok")
            after = scrape(url)
            labels = (("model", MODEL), ("outcome", "ok"), ("role", "worker"))
            assert "fireclaw_gateway_latency_seconds_count" not in before
            assert after["fireclaw_gateway_latency_seconds_count"] == {labels: 1.0}
            assert after["fireclaw_gateway_latency_seconds_sum"][labels] == pytest.approx(
                call["duration"]
            )

            # The usage chart's buckets hold what the ledger holds.
            usage = requests.get(
                f"{url}/v1/usage?window=3600&buckets=30", headers=bearer(READ), timeout=TIMEOUT
            ).json()
            ledger = json.loads(swarm.cli("usage", "--by", "role", "--json").stdout)
            (row,) = ledger["rows"]
            assert row["key"] == "worker" and row["tokens"] == 15  # 10 + 5, as scripted
            assert list(usage["roles"]) == ["worker"]
            assert len(usage["roles"]["worker"]) == usage["buckets"] == 30
            assert sum(usage["roles"]["worker"]) == row["tokens"]
            assert usage["step"] == 120 and usage["start"] % 120 == 0
            assert usage["start"] <= time.time() < usage["start"] + 30 * 120

            # Nothing said in #agents reaches the logs or the events either.
            assert irc_password not in swarm.tail(10_000)
            assert irc_password not in json.dumps(swarm.events())
            assert swarm.stop() == 0
            assert swarm.leftovers() == NOTHING
        finally:
            if op is not None:
                op.stop()
            swarm.close()
