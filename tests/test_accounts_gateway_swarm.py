"""Accounts through the gateway, end to end: a real ``fireclaw-swarm up`` on the
process backend whose model server is ``FakeUpstream`` (an OpenAI-compatible
server written here, FAKE: it answers 429 with a Retry-After to the key of the
account "busy" and serves any other), and a role of two accounts whose CLI is
a FAKE aider (written here: it asks the VM's gateway once, as aider does, and
prints what aider prints).

The CLI is given the gateway's key, never an account's; the gateway sends the
chosen account's key upstream. The upstream's 429 rests "busy" for the time
its Retry-After gave, the task runs again on "free" and is done once, and the
ledger holds both calls, each naming its account.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fireclaw.guest_daemon.cli_spec import GATEWAY_KEY
from fireclaw.supervisor.daemon import DB_NAME
from fireclaw.supervisor.state import Store
from swarmctl import NOTHING, WAIT, Swarm, idle, role_yaml, swarm_yaml

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="VMs in their own namespaces need root"),
]

MODEL = "fake-model"
BUSY_REST = 600

FAKE_AIDER = '''#!/usr/bin/python3
"""A FAKE aider for tests/test_accounts_gateway_swarm.py: one chat completion
through OPENAI_API_BASE with OPENAI_API_KEY (the VM's gateway), printed as aider
prints it: the answer and its token line, or litellm's RateLimitError."""
import json, os, sys, urllib.error, urllib.request

model = sys.argv[sys.argv.index("--model") + 1].removeprefix("openai/")
prompt = next(a for a in sys.argv if a.startswith("--message=")).removeprefix("--message=")
request = urllib.request.Request(
    os.environ["OPENAI_API_BASE"] + "/chat/completions",
    data=json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}]}).encode(),
    headers={"Authorization": "Bearer " + os.environ["OPENAI_API_KEY"],
             "Content-Type": "application/json"},
)
try:
    with urllib.request.urlopen(request, timeout=60) as answer:
        body = json.load(answer)
except urllib.error.HTTPError as exc:
    if exc.code == 429:
        print("litellm.RateLimitError: RateLimitError: OpenAIException - rate limit exceeded")
        sys.exit(1)
    raise
print(body["choices"][0]["message"]["content"])
print()
usage = body["usage"]
print(f"Tokens: {usage['prompt_tokens']} sent, {usage['completion_tokens']} received.")
'''


class FakeUpstream:
    """A FAKE OpenAI-compatible model server on loopback: lists ``MODEL``; a chat
    completion with the key of the account "busy" gets 429 and ``Retry-After``,
    any other an answer naming the key's account, with usage. It keeps the
    Authorization header of every chat call."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, obj: object, headers: dict[str, str]) -> None:
                body = json.dumps(obj).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": MODEL}]}, {})
                else:
                    self._send(404, {"error": {"message": "no such route"}}, {})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                upstream.keys.append(key)
                if key == "fake-key-busy":
                    error = {"error": {"type": "rate_limit_error", "message": "slow down"}}
                    self._send(429, error, {"Retry-After": str(BUSY_REST)})
                    return
                answer = {
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": f"ok {key}"}}
                    ],
                    "usage": {"prompt_tokens": 12, "completion_tokens": 3},
                }
                self._send(200, answer, {})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)


@pytest.fixture
def fake_aider() -> Iterator[Path]:
    """A folder with the fake ``aider``, which the agent user (nobody) may run."""
    folder = Path(tempfile.mkdtemp(prefix="fireclaw-fake-aider-"))
    try:
        folder.chmod(0o755)
        program = folder / "aider"
        program.write_text(FAKE_AIDER)
        program.chmod(0o755)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_an_upstream_429_to_one_accounts_key_fails_the_task_over_to_the_other(
    tmp_path: Path, fake_aider: Path
) -> None:
    keys = tmp_path / "keys"
    for name in ("busy", "free"):
        (keys / name).mkdir(parents=True)
        secret = keys / name / "OPENAI_API_KEY"
        secret.write_text(f"fake-key-{name}\n")
        secret.chmod(0o600)
    role = role_yaml(
        "coder",
        min_idle=2,
        max_active=2,
        extra=(
            f"model: {MODEL}\n"
            "harness:\n"
            "  kind: aider\n"
            "  timeout: 120\n"
            "  secrets: [OPENAI_API_KEY]\n"
            "  accounts:\n"
            f"    - {{name: busy, secrets_dir: {keys / 'busy'}}}\n"
            f"    - {{name: free, secrets_dir: {keys / 'free'}}}\n"
        ),
    )
    path = f"{fake_aider}:{os.environ.get('PATH', os.defpath)}"
    with FakeUpstream() as upstream:
        models = f"models:\n  server: http://127.0.0.1:{upstream.port}/v1\n"
        swarm = Swarm(tmp_path, models + swarm_yaml(role), env={"PATH": path})
        try:
            swarm.start(timeout=WAIT)
            swarm.wait_for("two idle coders", idle("coder", 2))
            task = swarm.api.post("/tasks", {"role": "coder", "prompt": "hello"})

            def state(_: object) -> bool:
                return bool(swarm.api.get(f"/tasks/{task['id']}")["state"] == "done")

            swarm.wait_for(f"task {task['id']} done", state, WAIT)
            done = swarm.api.get(f"/tasks/{task['id']}")
            assert done["result"] == "ok fake-key-free" and done["account"] == "free", done
            assert done["attempts"] == 0, done
            # The accounts' keys went upstream from the gateway; the CLI had only its own.
            assert upstream.keys == ["fake-key-busy", "fake-key-free"]
            assert GATEWAY_KEY not in upstream.keys
            rests = swarm.events("account_exhausted")
            assert [(e["detail"]["account"], e["detail"]["rest"]) for e in rests] == [
                ("busy", BUSY_REST)
            ]
            resting = swarm.status()["roles"]["coder"]["accounts_resting"]
            assert set(resting) == {"busy"}, resting
            assert swarm.stop() == 0
        finally:
            swarm.close()
    assert swarm.leftovers() == NOTHING
    with Store.open(swarm.state / DB_NAME) as store:
        calls = [(c.task, c.account, c.outcome, c.prompt_tokens) for c in store.calls()]
    assert calls == [
        (task["id"], "busy", "upstream_error", 0),
        (task["id"], "free", "ok", 12),
    ]
