"""fireclaw.pool.gateway and fireclaw.supervisor.budget: the per-VM model gateway
and budgets, against a scripted OpenAI-compatible upstream written here (named
``ScriptedUpstream``); the real model server is in test_modelserver.py."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sqlite3
from pathlib import Path
from typing import Any

import h11
import msgspec
import pytest
import trio
import trio.testing
from fireclaw.config.llm import BudgetSpec
from fireclaw.guest_daemon.openai_client import tool_support
from fireclaw.pool.gateway import serve_gateway
from fireclaw.pool.gateway_core import (
    Forward,
    Limits,
    ModelRoute,
    Refuse,
    Upstream,
    UsageMeter,
    Who,
    plan,
)
from fireclaw.supervisor.budget import Budgets, period_bounds
from fireclaw.supervisor.state import CallRecord, Store
from fireclaw.supervisor.state_schema import MIGRATIONS

#: Generous for a loaded machine; nothing here waits for a model.
DEADLINE = 30.0
KEY = "sk-test-upstream-key-0123456789"


# --- the sans-I/O core ---------------------------------------------------------------


def test_plan_asks_a_stream_for_usage_and_fills_in_the_model() -> None:
    who = Who(vm="worker-0", role="worker", model="smollm2")
    body = json.dumps({"messages": [], "stream": True, "stream_options": {"x": 1}}).encode()
    fwd = plan("POST", "/v1/chat/completions", body, who, max_bytes=1 << 20)
    assert isinstance(fwd, Forward) and fwd.stream and fwd.metered
    sent = json.loads(fwd.body)
    assert sent["stream_options"] == {"x": 1, "include_usage": True}
    assert sent["model"] == "smollm2" and fwd.model == "smollm2"


@pytest.mark.parametrize(
    ("method", "target", "body", "status", "code"),
    [
        ("GET", "/admin", b"", 404, "not_found"),
        ("GET", "/v1/chat/completions", b"", 405, "method_not_allowed"),
        ("POST", "/v1/chat/completions", b"x" * 2000, 413, "request_too_large"),
        ("POST", "/v1/chat/completions", b"{nope", 400, "invalid_json"),
        ("POST", "/v1/chat/completions", b"[1]", 400, "invalid_json"),
        ("POST", "/v1/chat/completions", b'{"model": 5}', 400, "invalid_model"),
    ],
)
def test_plan_refuses_what_it_does_not_serve(
    method: str, target: str, body: bytes, status: int, code: str
) -> None:
    out = plan(method, target, body, Who(vm="v", role="r"), max_bytes=1024)
    assert isinstance(out, Refuse) and (out.status, out.code) == (status, code)
    assert json.loads(out.body())["error"]["code"] == code


def test_usage_meter_reads_the_last_usage_of_a_stream_split_anywhere() -> None:
    stream = (
        b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":31,"completion_tokens":7}}\n\n'
        b"data: [DONE]\n\n"
    )
    meter = UsageMeter(stream=True)
    for i in range(0, len(stream), 5):
        meter.feed(stream[i : i + 5])
    meter.close()
    assert (meter.found, meter.prompt_tokens, meter.completion_tokens) == (True, 31, 7)


def test_usage_meter_ignores_counts_that_are_not_counts() -> None:
    meter = UsageMeter(stream=False)
    meter.feed(b'{"usage": {"prompt_tokens": -4, "completion_tokens": "9"}}')
    meter.close()
    assert (meter.prompt_tokens, meter.completion_tokens) == (0, 0)


def test_upstream_repr_hides_the_key() -> None:
    assert KEY not in repr(Upstream("http", "127.0.0.1", 1, "/v1", api_key=KEY))


# --- budgets ---------------------------------------------------------------------------


def call(role: str, tokens: int, at: float) -> CallRecord:
    return CallRecord(
        at=at,
        agent=None,
        role=role,
        vm=f"{role}-0",
        task=None,
        model="m",
        prompt_tokens=tokens,
        completion_tokens=0,
        duration=0.1,
        outcome="ok",
    )


def test_the_ledger_says_which_calls_the_gateway_counted(tmp_path: Path) -> None:
    """A database of before the ``host_counted`` column keeps its rows, read as the
    server's count; a new row says it was the gateway's."""
    db = tmp_path / "swarm.db"
    conn = sqlite3.connect(db)
    for migration in MIGRATIONS[:5]:  # the schema as version 5 made it
        for statement in migration:
            conn.execute(statement)
    conn.execute(
        "INSERT INTO model_calls (at, agent, role, vm, task, model, prompt_tokens,"
        " completion_tokens, duration, outcome) VALUES (1, NULL, 'a', 'a-0', NULL, 'm', 5, 2,"
        " 0.1, 'ok')"
    )
    conn.execute("PRAGMA user_version = 5")
    conn.commit()
    conn.close()
    with Store.open(db) as store:
        store.record_call(msgspec.structs.replace(call("a", 9, 2.0), host_counted=True))
        calls = store.calls()
        spent = store.spent(since=0.0)
    assert [(c.prompt_tokens, c.host_counted) for c in calls] == [(5, False), (9, True)]
    assert spent == 5 + 2 + 9


def test_period_bounds_are_utc_calendar_periods() -> None:
    now = dt.datetime(2026, 2, 18, 13, 45, tzinfo=dt.UTC).timestamp()  # a Wednesday
    day = period_bounds("day", now)
    assert day == (
        dt.datetime(2026, 2, 18, tzinfo=dt.UTC).timestamp(),
        dt.datetime(2026, 2, 19, tzinfo=dt.UTC).timestamp(),
    )
    assert period_bounds("week", now)[0] == dt.datetime(2026, 2, 16, tzinfo=dt.UTC).timestamp()
    assert period_bounds("month", now)[1] == dt.datetime(2026, 3, 1, tzinfo=dt.UTC).timestamp()
    assert period_bounds("hour", now)[0] == dt.datetime(2026, 2, 18, 13, tzinfo=dt.UTC).timestamp()


async def test_a_spent_budget_refuses_until_the_next_period(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Unix time follows trio's (fake) clock from 23:00 UTC: the day ends in an hour.
    base = dt.datetime(2026, 2, 18, 23, 0, tzinfo=dt.UTC).timestamp()

    def clock() -> float:
        return base + trio.current_time()

    seen: list[tuple[str, str]] = []
    with Store.open(tmp_path / "db", clock=clock) as store:
        budgets = Budgets(
            BudgetSpec(period="day", roles={"worker": 100}),
            store,
            on_event=lambda kind, scope, _: seen.append((kind, scope)),
            clock=clock,
        )
        budgets.record(call("worker", 60, clock()))
        assert budgets.refusal("worker") is None
        budgets.record(call("coder", 500, clock()))  # another role's spend does not count
        assert budgets.refusal("worker") is None
        budgets.record(call("worker", 40, clock()))
        why = budgets.refusal("worker")
        assert why is not None and "100 tokens per day" in why
        budgets.record(call("worker", 5, clock()))
        assert seen == [("budget_exhausted", "role:worker")]  # announced once
        async with trio.open_nursery() as nursery:
            nursery.start_soon(budgets.run)
            await budgets.wait_changed()
            assert trio.current_time() == pytest.approx(3600.0, abs=0.01)
            assert budgets.refusal("worker") is None
            nursery.cancel_scope.cancel()
        assert seen[-1] == ("budget_resumed", "role:worker")


async def test_raising_a_limit_by_reload_resumes_at_once(tmp_path: Path) -> None:
    with Store.open(tmp_path / "db") as store:
        budgets = Budgets(BudgetSpec(swarm=10), store)
        budgets.record(call("worker", 10, 1e12))
        budgets.record(call("worker", 0, 1e12))
        assert budgets.refusal("coder") is not None  # the swarm's limit holds every role
        budgets.update(BudgetSpec(swarm=1000))
        assert budgets.refusal("coder") is None


# --- the trio adapter, against a scripted upstream ----------------------------------------


class ScriptedUpstream:
    """An OpenAI-compatible server written for these tests: answers chat completions
    with a fixed text and usage (streamed as SSE when asked), and records what it
    was sent. With ``hold`` set, it keeps each chat call open until ``release``."""

    def __init__(self, *, hold: bool = False) -> None:
        self.requests: list[tuple[h11.Request, bytes]] = []
        self.hold = hold
        self.release = trio.Event()
        self.arrived = 0
        self.arrival = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        assert request is not None
        self.requests.append((request, body))
        if request.target.endswith(b"/models"):
            await self._send(stream, conn, b'{"object":"list","data":[{"id":"scripted"}]}')
            return
        if request.target == b"/props":  # not llama-server: no such route
            await self._send(stream, conn, b'{"error":"not found"}', status=404)
            return
        self.arrived += 1
        self.arrival.set()
        self.arrival = trio.Event()
        if self.hold:
            await self.release.wait()
        sent = json.loads(body)
        usage = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
        if sent.get("stream"):
            events = [
                {"choices": [{"index": 0, "delta": {"content": "scripted"}}]},
                {"choices": [], "usage": usage},
            ]
            data = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
            await self._send(stream, conn, data + b"data: [DONE]\n\n", "text/event-stream")
        else:
            answer = {
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
                "usage": usage,
            }
            await self._send(stream, conn, json.dumps(answer).encode())

    async def _send(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        body: bytes,
        kind: str = "",
        status: int = 200,
    ) -> None:
        headers = [("Content-Type", kind or "application/json"), ("Content-Length", str(len(body)))]
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
        await stream.send_all(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))


class Ledger:
    """A Meter that keeps records in a list and refuses when told to."""

    def __init__(self) -> None:
        self.calls: list[CallRecord] = []
        self.refuse: str | None = None
        self.recorded = trio.Event()

    def refusal(self, role: str) -> str | None:
        return self.refuse

    def record(self, call: CallRecord) -> None:
        self.calls.append(call)
        self.recorded.set()
        self.recorded = trio.Event()

    async def wait_changed(self) -> None:
        await trio.sleep_forever()


async def http(port: int, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
    """One request to 127.0.0.1:port; (status, body)."""
    data = json.dumps(body).encode() if body is not None else b""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        headers = [("Host", "gw"), ("Content-Length", str(len(data))), ("Authorization", "x")]
        out = conn.send(h11.Request(method=method, target=path, headers=headers))
        out += conn.send(h11.Data(data=data)) + conn.send(h11.EndOfMessage())
        await stream.send_all(out)
        status, got = 0, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                got += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return status, got


async def open_gateway(nursery: trio.Nursery, who: Who, route: ModelRoute) -> int:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(serve_gateway, listeners[0], who, route)
    port: int = listeners[0].socket.getsockname()[1]
    return port


CHAT = {"messages": [{"role": "user", "content": "hello"}]}


async def test_gateway_meters_calls_from_the_upstream_answer_and_adds_the_key() -> None:
    upstream, ledger = ScriptedUpstream(), Ledger()
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            up_port = await nursery.start(upstream.serve)
            route = ModelRoute(
                upstream=lambda: Upstream("http", "127.0.0.1", up_port, "/v1", api_key=KEY),
                meter=ledger,
            )
            who = Who(vm="worker-3", role="worker", agent="alice", task=7, model="scripted")
            port = await open_gateway(nursery, who, route)
            status, body = await http(port, "POST", "/v1/chat/completions", CHAT)
            assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "ok"
            status, body = await http(
                port, "POST", "/v1/chat/completions", {**CHAT, "stream": True}
            )
            assert status == 200 and body.endswith(b"data: [DONE]\n\n")
            status, body = await http(port, "GET", "/v1/models")
            assert status == 200 and b"scripted" in body
            nursery.cancel_scope.cancel()
    assert [(c.agent, c.role, c.vm, c.task, c.model) for c in ledger.calls] == [
        ("alice", "worker", "worker-3", 7, "scripted")
    ] * 2
    assert [(c.prompt_tokens, c.completion_tokens, c.outcome) for c in ledger.calls] == [
        (11, 3, "ok")
    ] * 2
    (req, _), (sreq, sbody), _ = upstream.requests
    headers = dict(req.headers)
    assert headers[b"authorization"] == f"Bearer {KEY}".encode()  # the guest's own is dropped
    assert json.loads(sbody)["stream_options"] == {"include_usage": True}


async def test_props_of_a_server_that_has_none_is_404_and_no_call() -> None:
    upstream, ledger = ScriptedUpstream(), Ledger()
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            up_port = await nursery.start(upstream.serve)
            route = ModelRoute(
                upstream=lambda: Upstream("http", "127.0.0.1", up_port, "/v1", api_key=KEY),
                meter=ledger,
            )
            port = await open_gateway(nursery, Who(vm="w-0", role="worker", model="m"), route)
            status, body = await http(port, "GET", "/props")
            assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
            assert await tool_support(f"http://127.0.0.1:{port}/v1") is False
            status, _ = await http(port, "POST", "/props", CHAT)
            assert status == 405
            nursery.cancel_scope.cancel()
    # Asked at the upstream's root (beside /v1), with its key; never a chat call.
    targets = [(r.target, dict(r.headers).get(b"authorization")) for r, _ in upstream.requests]
    assert targets == [(b"/props", f"Bearer {KEY}".encode())] * 2
    assert ledger.calls == [] and upstream.arrived == 0


async def test_over_budget_a_call_gets_429_with_an_openai_error() -> None:
    upstream, ledger = ScriptedUpstream(), Ledger()
    ledger.refuse = "the swarm's budget of 10 tokens per day is spent (12 used)"
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            up_port = await nursery.start(upstream.serve)
            route = ModelRoute(
                upstream=lambda: Upstream("http", "127.0.0.1", up_port, "/v1"), meter=ledger
            )
            port = await open_gateway(nursery, Who(vm="w-0", role="worker", model="m"), route)
            status, body = await http(port, "POST", "/v1/chat/completions", CHAT)
            nursery.cancel_scope.cancel()
    assert status == 429
    assert json.loads(body)["error"] == {
        "message": ledger.refuse,
        "type": "insufficient_quota",
        "code": "budget_exceeded",
    }
    assert upstream.requests == []  # nothing went upstream
    assert [c.outcome for c in ledger.calls] == ["refused"]


async def test_a_flooding_vm_is_capped_while_another_vm_is_served() -> None:
    upstream, ledger = ScriptedUpstream(hold=True), Ledger()
    limits = Limits(max_concurrent=2)
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            up_port = await nursery.start(upstream.serve)

            def up() -> Upstream:
                return Upstream("http", "127.0.0.1", up_port, "/v1")

            route = ModelRoute(upstream=up, meter=ledger, limits=limits)
            flood = await open_gateway(nursery, Who(vm="a-0", role="a", model="m"), route)
            calm = await open_gateway(nursery, Who(vm="b-0", role="b", model="m"), route)
            results: list[int] = []

            async def one(port: int) -> None:
                status, _ = await http(port, "POST", "/v1/chat/completions", CHAT)
                results.append(status)

            for _ in range(2):
                nursery.start_soon(one, flood)
            while upstream.arrived < 2:
                await upstream.arrival.wait()
            # Both of its slots are busy: the flooding VM's next calls are refused at once.
            for _ in range(5):
                status, body = await http(flood, "POST", "/v1/chat/completions", CHAT)
                assert status == 429
                assert json.loads(body)["error"]["code"] == "too_many_concurrent_calls"
            # The other VM has its own slots: its call reaches the upstream.
            nursery.start_soon(one, calm)
            while upstream.arrived < 3:
                await upstream.arrival.wait()
            upstream.release.set()
            while len(results) < 3:
                await ledger.recorded.wait()
                await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert results == [200, 200, 200]
    assert sorted(c.vm for c in ledger.calls if c.outcome == "ok") == ["a-0", "a-0", "b-0"]


async def test_a_stream_reaches_the_guest_event_by_event() -> None:
    """A scripted upstream sends one server-sent event and then waits: the guest has
    that event before the upstream sends the rest."""
    go = trio.Event()
    ledger = Ledger()

    async def drip(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
        headers = [("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked")]
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)))
        await stream.send_all(conn.send(h11.Data(data=b'data: {"choices":[]}\n\n')))
        await go.wait()
        last = b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":1}}\n\n'
        await stream.send_all(conn.send(h11.Data(data=last + b"data: [DONE]\n\n")))
        await stream.send_all(conn.send(h11.EndOfMessage()))

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            up_listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            up_port = up_listeners[0].socket.getsockname()[1]
            nursery.start_soon(trio.serve_listeners, drip, up_listeners)
            route = ModelRoute(
                upstream=lambda: Upstream("http", "127.0.0.1", up_port, "/v1"), meter=ledger
            )
            port = await open_gateway(nursery, Who(vm="v-0", role="r", model="m"), route)
            guest = await trio.open_tcp_stream("127.0.0.1", port)
            body = json.dumps({**CHAT, "stream": True}).encode()
            conn = h11.Connection(h11.CLIENT)
            head = [("Host", "gw"), ("Content-Length", str(len(body)))]
            await guest.send_all(
                conn.send(h11.Request(method="POST", target="/v1/chat/completions", headers=head))
                + conn.send(h11.Data(data=body))
                + conn.send(h11.EndOfMessage())
            )
            got = b""
            while b"data: {" not in got:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await guest.receive_some(65536))
                elif isinstance(event, h11.Data):
                    got += event.data
            assert not go.is_set() and b"usage" not in got  # the first event, alone
            go.set()
            while not isinstance(event := conn.next_event(), h11.EndOfMessage):
                if event is h11.NEED_DATA:
                    conn.receive_data(await guest.receive_some(65536))
                elif isinstance(event, h11.Data):
                    got += event.data
            await guest.aclose()
            while not ledger.calls:
                await ledger.recorded.wait()
            nursery.cancel_scope.cancel()
    assert got.endswith(b"data: [DONE]\n\n")
    assert (ledger.calls[0].prompt_tokens, ledger.calls[0].completion_tokens) == (2, 1)


#: A stream's end as a guest sees it: the usage chunk, then ``[DONE]``.
STREAM_END = (
    b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}\n\ndata: [DONE]\n\n'
)


#: The same for the Messages API: its usage in message_start and message_delta.
MESSAGES_END = (
    b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
    b'{"input_tokens":3,"cache_read_input_tokens":4,"output_tokens":0}}}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":2}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)


#: Chat pieces of an answer, before its usage chunk.
CHAT_PIECES = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n' * 3


@pytest.mark.parametrize(
    ("path", "sent", "outcome", "tokens"),
    [
        # Mid-answer: the model is still thinking. Its prompt is charged (the body's
        # bytes / 4, rounded up), not the guest's choice to hang up.
        ("/v1/chat/completions", b'data: {"choices":[]}\n\n', "cancelled", None),
        # Three pieces of the answer went to the guest: three tokens.
        ("/v1/chat/completions", CHAT_PIECES, "cancelled", None),
        # The whole answer, the HTTP message not ended yet: nothing was cut.
        ("/v1/chat/completions", STREAM_END, "ok", (7, 2)),
        # Its last event not yet sent: what was counted so far stays counted.
        (
            "/v1/messages",
            MESSAGES_END[: MESSAGES_END.index(b"event: message_stop")],
            "cancelled",
            (7, 2),
        ),
        ("/v1/messages", MESSAGES_END, "ok", (7, 2)),
    ],
)
async def test_a_guest_that_hangs_up_mid_stream_closes_the_upstream_call(
    path: str, sent: bytes, outcome: str, tokens: tuple[int, int] | None
) -> None:
    """A cancelled turn closes its stream while the model is still thinking: the
    upstream call is closed at once (not at its next token, nor at the call timeout,
    an hour here), and the ledger says the call was cancelled. A guest that hangs up
    once it has ``[DONE]`` got the whole answer: that call is ``ok``. Without the
    upstream's final usage (``tokens`` None) the gateway counts: the prompt by the
    size of the request the upstream received, one token a piece of the answer."""
    ledger = Ledger()
    upstream_closed = trio.Event()
    thinking = trio.Event()
    received = bytearray()

    async def silent(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Data):
                received.extend(event.data)
        headers = [("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked")]
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)))
        await stream.send_all(conn.send(h11.Data(data=sent)))
        thinking.set()
        while await stream.receive_some(65536):
            pass
        upstream_closed.set()

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            up_listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            up_port = up_listeners[0].socket.getsockname()[1]
            nursery.start_soon(trio.serve_listeners, silent, up_listeners)
            route = ModelRoute(
                upstream=lambda: Upstream("http", "127.0.0.1", up_port, "/v1"),
                meter=ledger,
                limits=Limits(call_timeout=3600.0),
            )
            port = await open_gateway(nursery, Who(vm="v-0", role="r", model="m"), route)
            guest = await trio.open_tcp_stream("127.0.0.1", port)
            body = json.dumps({**CHAT, "stream": True}).encode()
            conn = h11.Connection(h11.CLIENT)
            head = [("Host", "gw"), ("Content-Length", str(len(body)))]
            await guest.send_all(
                conn.send(h11.Request(method="POST", target=path, headers=head))
                + conn.send(h11.Data(data=body))
                + conn.send(h11.EndOfMessage())
            )
            await thinking.wait()
            got = b""
            while sent[-10:] not in got:  # the guest has what was sent
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await guest.receive_some(65536))
                elif isinstance(event, h11.Data):
                    got += event.data
            await guest.aclose()
            await upstream_closed.wait()
            while not ledger.calls:
                await ledger.recorded.wait()
            nursery.cancel_scope.cancel()
    assert [c.outcome for c in ledger.calls] == [outcome]
    (row,) = ledger.calls
    if tokens is None:
        assert row.host_counted
        pieces = sent.count(b'"content":"')
        assert (row.prompt_tokens, row.completion_tokens) == (-(-len(received) // 4), pieces)
    else:
        assert not row.host_counted
        assert (row.prompt_tokens, row.completion_tokens) == tokens


ANSWERS = Path(__file__).parent / "data" / "model_answers"


@pytest.mark.parametrize(
    ("path", "name", "usage_event", "piece"),
    [
        ("/v1/chat/completions", "chat.sse", b'data: {"choices":[],', b'"delta":{"content":"'),
        (
            "/v1/responses",
            "responses.sse",
            b"event: response.completed",
            b'"type":"response.output_text.delta"',
        ),
        ("/v1/messages", "messages.sse", b"event: message_delta", b'"type":"content_block_delta"'),
    ],
)
async def test_a_guest_that_hangs_up_right_before_the_usage_event_is_charged_what_it_read(
    path: str, name: str, usage_event: bytes, piece: bytes
) -> None:
    """A replaying upstream (written here) sends a real llama.cpp answer
    (tests/data/model_answers) up to its usage event and holds the rest; the guest
    reads all of it and hangs up. The ledger charges every piece of the answer the
    guest read, counted by the gateway, and a prompt: the upstream's where it said
    it (Messages' message_start), else the request's bytes / 4, rounded up."""
    recorded = (ANSWERS / name).read_bytes()
    before = recorded[: recorded.index(usage_event)]
    ledger = Ledger()
    upstream_closed = trio.Event()
    received = bytearray()

    async def replay(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Data):
                received.extend(event.data)
        headers = [("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked")]
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)))
        for event_bytes in before.split(b"\n\n"):  # one event a write, as llama.cpp does
            await stream.send_all(conn.send(h11.Data(data=event_bytes + b"\n\n")))
        while await stream.receive_some(65536):
            pass
        upstream_closed.set()

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            up_listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            up_port = up_listeners[0].socket.getsockname()[1]
            nursery.start_soon(trio.serve_listeners, replay, up_listeners)
            route = ModelRoute(
                upstream=lambda: Upstream("http", "127.0.0.1", up_port, "/v1"),
                meter=ledger,
                limits=Limits(call_timeout=3600.0),
            )
            port = await open_gateway(nursery, Who(vm="v-0", role="r", model="m"), route)
            guest = await trio.open_tcp_stream("127.0.0.1", port)
            body = json.dumps({**CHAT, "input": "hi", "max_tokens": 24, "stream": True}).encode()
            conn = h11.Connection(h11.CLIENT)
            head = [("Host", "gw"), ("Content-Length", str(len(body)))]
            await guest.send_all(
                conn.send(h11.Request(method="POST", target=path, headers=head))
                + conn.send(h11.Data(data=body))
                + conn.send(h11.EndOfMessage())
            )
            got = b""
            while len(got) < len(before) + 2:  # every event before the usage event
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await guest.receive_some(65536))
                elif isinstance(event, h11.Data):
                    got += event.data
            await guest.aclose()
            await upstream_closed.wait()
            while not ledger.calls:
                await ledger.recorded.wait()
            nursery.cancel_scope.cancel()
    # All of the answer before its usage event, and nothing of that event.
    assert got == before + b"\n\n"
    read = got.count(piece)
    assert read > 0
    (row,) = ledger.calls
    assert (row.outcome, row.host_counted) == ("cancelled", True)
    assert row.completion_tokens >= read
    if name == "messages.sse":
        start = json.loads(before.split(b"data: ", 2)[1].split(b"\n")[0])
        usage = start["message"]["usage"]
        assert row.prompt_tokens == usage["input_tokens"] + usage["cache_read_input_tokens"]
    else:
        assert row.prompt_tokens == -(-len(received) // 4) > 0


async def test_a_call_past_its_timeout_gets_504_and_a_ledger_row(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream, ledger = ScriptedUpstream(hold=True), Ledger()
    async with trio.open_nursery() as nursery:
        up_port = await nursery.start(upstream.serve)
        route = ModelRoute(
            upstream=lambda: Upstream("http", "127.0.0.1", up_port, "/v1"),
            meter=ledger,
            limits=Limits(call_timeout=300.0),
        )
        port = await open_gateway(nursery, Who(vm="v-0", role="r", model="m"), route)
        started = trio.current_time()
        status, body = await http(port, "POST", "/v1/chat/completions", CHAT)
        assert trio.current_time() - started == pytest.approx(300.0, abs=0.5)
        nursery.cancel_scope.cancel()
    assert status == 504 and json.loads(body)["error"]["code"] == "timeout"
    assert [c.outcome for c in ledger.calls] == ["upstream_error"]
    # The upstream had the request for 300 s: its prompt is charged, by its size.
    ((_, sent),) = upstream.requests
    (row,) = ledger.calls
    assert (row.prompt_tokens, row.completion_tokens, row.host_counted) == (
        -(-len(sent) // 4),
        0,
        True,
    )


async def test_a_stream_cut_by_the_call_timeout_is_charged_what_went_by(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An upstream (written here) sends three pieces of an answer and then nothing, a
    model stuck mid-answer: at the call timeout the gateway closes both sides, and
    the ledger charges the three pieces and the prompt, counted by the gateway."""
    ledger = Ledger()
    received = bytearray()

    async def stuck(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Data):
                received.extend(event.data)
        headers = [("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked")]
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)))
        await stream.send_all(conn.send(h11.Data(data=CHAT_PIECES)))
        with contextlib.suppress(trio.BrokenResourceError):
            while await stream.receive_some(65536):
                pass

    async with trio.open_nursery() as nursery:
        up_listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        up_port = up_listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, stuck, up_listeners)
        route = ModelRoute(
            upstream=lambda: Upstream("http", "127.0.0.1", up_port, "/v1"),
            meter=ledger,
            limits=Limits(call_timeout=300.0),
        )
        port = await open_gateway(nursery, Who(vm="v-0", role="r", model="m"), route)
        guest = await trio.open_tcp_stream("127.0.0.1", port)
        body = json.dumps({**CHAT, "stream": True}).encode()
        conn = h11.Connection(h11.CLIENT)
        head = [("Host", "gw"), ("Content-Length", str(len(body)))]
        started = trio.current_time()
        await guest.send_all(
            conn.send(h11.Request(method="POST", target="/v1/chat/completions", headers=head))
            + conn.send(h11.Data(data=body))
            + conn.send(h11.EndOfMessage())
        )
        got = b""
        while chunk := await guest.receive_some(65536):  # until the gateway closes
            got += chunk
        assert trio.current_time() - started == pytest.approx(300.0, abs=0.5)
        await guest.aclose()
        while not ledger.calls:
            await ledger.recorded.wait()
        nursery.cancel_scope.cancel()
    assert got.count(b'"content":"') == 3 and b"[DONE]" not in got
    (row,) = ledger.calls
    assert (row.outcome, row.host_counted, row.completion_tokens) == ("upstream_error", True, 3)
    assert row.prompt_tokens == -(-len(received) // 4) > 0


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\xff\r\n\r\n",
        b"POST /v1/chat/completions\xff HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n{",
        b"GET / HTTP/1.1\r\n" + b"X: " + b"y" * 20000 + b"\r\n\r\n",
    ],
)
async def test_a_hostile_request_is_answered_or_dropped_and_the_gateway_serves_on(
    garbage: bytes,
) -> None:
    upstream, ledger = ScriptedUpstream(), Ledger()
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            up_port = await nursery.start(upstream.serve)
            route = ModelRoute(
                upstream=lambda: Upstream("http", "127.0.0.1", up_port, "/v1"),
                meter=ledger,
                limits=Limits(max_request_bytes=4096),
            )
            port = await open_gateway(nursery, Who(vm="v-0", role="r", model="m"), route)
            hostile = await trio.open_tcp_stream("127.0.0.1", port)
            with contextlib.suppress(trio.BrokenResourceError):
                await hostile.send_all(garbage)
                await hostile.send_eof()
            answer = b""
            with contextlib.suppress(trio.BrokenResourceError):
                while chunk := await hostile.receive_some(65536):
                    answer += chunk
            await hostile.aclose()
            assert answer == b"" or answer.split(b" ")[1][:1] == b"4", answer[:200]
            status, _ = await http(port, "POST", "/v1/chat/completions", CHAT)
            assert status == 200
            nursery.cancel_scope.cancel()
    assert [c.outcome for c in ledger.calls] == ["ok"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
        ("/v1/responses", {"input": "hi"}),
    ],
)
async def test_the_gateways_own_errors_take_the_shape_of_the_guests_api(
    path: str, body: dict[str, Any]
) -> None:
    """No model server, then one that does not answer: a 503 and a 502 that
    claude-code reads as Anthropic errors and codex as OpenAI's; no ledger row for
    a call never made, an ``upstream_error`` row for one that failed."""
    ledger = Ledger()
    closed = await trio.open_tcp_listeners(0, host="127.0.0.1")
    dead_port = closed[0].socket.getsockname()[1]
    await closed[0].aclose()  # nothing listens there now
    servers: list[Upstream | None] = [None, Upstream("http", "127.0.0.1", dead_port, "/v1")]
    answers = []
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            route = ModelRoute(upstream=lambda: servers[0], meter=ledger)
            port = await open_gateway(nursery, Who(vm="v-0", role="r", model="m"), route)
            answers.append(await http(port, "POST", path, body))
            servers.pop(0)
            answers.append(await http(port, "POST", path, body))
            nursery.cancel_scope.cancel()
    assert [status for status, _ in answers] == [503, 502]
    errors = [json.loads(got) for _, got in answers]
    if path == "/v1/messages":
        assert [e["type"] for e in errors] == ["error", "error"]
        assert [e["error"]["type"] for e in errors] == ["overloaded_error", "api_error"]
    else:
        assert [e["error"]["code"] for e in errors] == ["unavailable", "bad_gateway"]
    # Nothing reached a model server: nothing is charged.
    assert [(c.outcome, c.prompt_tokens, c.host_counted) for c in ledger.calls] == [
        ("upstream_error", 0, False)
    ]
