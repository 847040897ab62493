"""Accounts with failover, end to end: a real ``fireclaw-swarm up`` on the process
backend (guests in their own network namespaces), its managed ngircd, and a
role of two accounts whose CLI is ``fake_gemini`` below: a FAKE gemini-cli,
written here, that speaks gemini-cli's stream-json and answers or refuses by
the key its account gave it (gemini-cli cannot go through the gateway, so the
account's key goes to the CLI itself).

- The first account's first run is rate-limited ("try again in 45s"): the
  account rests until then (event, #control line), and the task runs again
  on the second account and is done once, the task naming that account.
- The second account's next run is rate-limited for an hour: with both
  resting the next task waits, which ``status`` shows, until the first
  account is back at its time; then it runs there.
- A restarted supervisor still knows that the second account rests.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ircperson import Person
from swarmctl import NOTHING, WAIT, Swarm, idle, role_yaml, swarm_yaml
from test_chat_irc import CONTROL, irc_yaml
from test_swarm import free_port

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="VMs in their own namespaces need root"),
]

#: How long the first account's provider asks it to rest. Long enough that the
#: second task is claimed while it rests (a retry and a claim take seconds here);
#: every wait below allows it and a loaded machine's headroom.
WORK_REST = 45
#: The second account's rest: longer than the test.
HOME_REST = "1 hour"

FAKE_GEMINI = f'''#!/usr/bin/python3
"""A FAKE gemini-cli for tests/test_accounts_swarm.py: it prints gemini-cli's
stream-json and never calls a model. The account is known by its key
(GEMINI_API_KEY): the first run with the key of "work" is rate-limited for
{WORK_REST}s, the second run with the key of "home" for {HOME_REST}; any other
run answers. Each run is one line "KEY" in calls/log, beside this script."""
import json, os, sys

here = os.path.dirname(os.path.realpath(__file__))
key = os.environ.get("GEMINI_API_KEY", "")
log = os.path.join(here, "calls", "log")
with open(log) as f:
    before = [line.strip() for line in f].count(key)
with open(log, "a") as f:
    f.write(key + "\\n")
account = {{"fake-key-work": "work", "fake-key-home": "home"}}.get(key, "no account")


def say(obj):
    print(json.dumps(obj), flush=True)


say({{"type": "init", "session_id": "5a4b3c2d-1e0f-4a9b-8c7d-6e5f4a3b2c1d", "model": "fake"}})
waits = {{("work", 0): "{WORK_REST}s", ("home", 1): "{HOME_REST}"}}
wait = waits.get((account, before))
if wait is not None:
    message = f"[API Error: 429 Too Many Requests. Please try again in {{wait}}.]"
    say({{"type": "result", "status": "error", "error": {{"type": "Error", "message": message}},
         "stats": {{"input_tokens": 0, "output_tokens": 0, "cached": 0}}}})
    sys.exit(1)
say({{"type": "message", "role": "assistant", "content": f"answered on {{account}}"}})
say({{"type": "result", "status": "success",
     "stats": {{"input_tokens": 3, "output_tokens": 2, "cached": 0}}}})
'''


@pytest.fixture
def fake_gemini() -> Iterator[Path]:
    """A folder holding the fake ``gemini`` and its ``calls/log``, which the agent
    user (nobody) may run and write; pytest's own temp dir is root's alone."""
    folder = Path(tempfile.mkdtemp(prefix="fireclaw-fake-gemini-"))
    try:
        folder.chmod(0o755)
        program = folder / "gemini"
        program.write_text(FAKE_GEMINI)
        program.chmod(0o755)
        calls = folder / "calls"
        calls.mkdir()
        calls.chmod(0o777 | stat.S_ISVTX)
        (calls / "log").write_text("")
        (calls / "log").chmod(0o666)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def accounts_role(keys: Path) -> str:
    return role_yaml(
        "coder",
        min_idle=2,
        max_active=2,
        extra=(
            "harness:\n"
            "  kind: gemini-cli\n"
            "  timeout: 120\n"
            "  secrets: [GEMINI_API_KEY]\n"
            "  accounts:\n"
            f"    - {{name: work, secrets_dir: {keys / 'work'}}}\n"
            f"    - {{name: home, secrets_dir: {keys / 'home'}}}\n"
        ),
    )


def write_keys(keys: Path) -> None:
    for name in ("work", "home"):
        (keys / name).mkdir(parents=True)
        secret = keys / name / "GEMINI_API_KEY"
        secret.write_text(f"fake-key-{name}\n")
        secret.chmod(0o600)


def wait_task(swarm: Swarm, task_id: int, state: str, timeout: float) -> dict[str, Any]:
    def task() -> dict[str, Any]:
        got: dict[str, Any] = swarm.api.get(f"/tasks/{task_id}")
        return got

    swarm.wait_for(f"task {task_id} {state}", lambda _: task()["state"] == state, timeout)
    return task()


def test_a_rate_limited_account_fails_over_rests_and_comes_back(
    tmp_path: Path, fake_gemini: Path
) -> None:
    keys = tmp_path / "keys"
    write_keys(keys)
    port = free_port()
    path = f"{fake_gemini}:{os.environ.get('PATH', os.defpath)}"
    config = swarm_yaml(accounts_role(keys), irc=irc_yaml(port))
    swarm = Swarm(tmp_path, config, env={"PATH": path})
    op: Person | None = None
    log = fake_gemini / "calls" / "log"
    try:
        swarm.start(timeout=WAIT)
        op = Person(("127.0.0.1", port), "op").start(CONTROL)
        swarm.wait_for("two idle coders", idle("coder", 2))

        # The first account is refused; the task runs again on the second, once.
        first = swarm.api.post("/tasks", {"role": "coder", "prompt": "first"})
        refused = time.time()
        done = wait_task(swarm, first["id"], "done", WAIT + WORK_REST)
        assert done["result"] == "answered on home" and done["account"] == "home", done
        assert done["attempts"] == 0, done  # the account's refusal cost the task nothing
        assert log.read_text().split() == ["fake-key-work", "fake-key-home"]
        (rest,) = swarm.events("account_exhausted")
        detail = rest["detail"]
        assert (rest["subject"], detail["account"], detail["refusal"]) == (
            "coder",
            "work",
            "rate_limit",
        )
        assert detail["said"] is True and detail["rest"] == WORK_REST
        assert refused <= detail["until"] - WORK_REST <= time.time()
        line = op.said(CONTROL, "account work of role coder is rate-limited", timeout=WAIT)
        assert "as its provider said" in line.arguments[0]
        claims = [e["detail"].get("account") for e in swarm.events("task_claimed")]
        assert claims == ["work", "home"]
        assert [e["detail"]["task_id"] for e in swarm.events("task_deferred")] == [first["id"]]

        # The second account is refused for an hour while the first still rests:
        # the next task waits, as status says, until the first is back.
        second = swarm.api.post("/tasks", {"role": "coder", "prompt": "second"})
        waiting = swarm.wait_for(
            "tasks waiting for an account",
            lambda s: s["roles"]["coder"].get("waiting_for_account") is not None,
            WAIT,
        )
        coder = waiting["roles"]["coder"]
        assert coder["waiting_for_account"] == detail["until"], coder
        assert set(coder["accounts_resting"]) == {"work", "home"}, coder
        text = swarm.cli("status").stdout.decode()
        assert "account coder/home: resting until" in text, text
        assert "tasks of coder wait for an account until" in text, text
        assert swarm.api.get(f"/tasks/{second['id']}")["state"] == "queued"
        op.said(CONTROL, "every account of role coder rests: its tasks wait until", timeout=WAIT)

        done = wait_task(swarm, second["id"], "done", WAIT + WORK_REST)
        assert time.time() >= detail["until"]
        assert done["result"] == "answered on work" and done["account"] == "work", done
        assert log.read_text().split() == [
            "fake-key-work",
            "fake-key-home",
            "fake-key-home",
            "fake-key-work",
        ]
        home_until = [
            e for e in swarm.events("account_exhausted") if e["detail"]["account"] == "home"
        ]
        assert len(home_until) == 1 and home_until[0]["detail"]["rest"] == 3600
        assert swarm.stop() == 0

        # A restarted supervisor knows that home rests, and until when.
        swarm.start(timeout=WAIT)
        resting = swarm.wait_for("the coder role", lambda s: "coder" in s["roles"])
        assert resting["roles"]["coder"]["accounts_resting"] == {
            "home": home_until[0]["detail"]["until"]
        }
        assert swarm.stop() == 0
        assert swarm.leftovers() == NOTHING
    finally:
        if op is not None:
            op.stop()
        swarm.close()
