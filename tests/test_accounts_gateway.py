"""A VM's gateway with accounts, against a real gateway on loopback and a fake
upstream written here (``FakeKeyedUpstream``) that answers 429 with a
Retry-After to one account's key and serves the other's.

The account's key goes upstream in place of the swarm's, in the header the
route's API wants (``x-api-key`` on the Anthropic-style ``/v1/messages``, a
bearer token on OpenAI-style routes); a 429 to it is told to the supervisor
(``on_refused``) naming the role, the account and the wait; the ledger row
names the account; the key is never in the guest's answer or a repr."""

from __future__ import annotations

import email.utils
import json

import h11
import pytest
import trio
from fireclaw.pool.gateway_core import ANTHROPIC_VERSION, ModelRoute, Upstream, Who, retry_after
from test_gateway import DEADLINE, Ledger, http, open_gateway

SWARM_KEY = "sk-swarm-own-key-000000"
BUSY_KEY = "sk-account-busy-111111"
FREE_KEY = "sk-account-free-222222"
MESSAGES = {"max_tokens": 8, "messages": [{"role": "user", "content": "hello"}]}
CHAT = {"messages": [{"role": "user", "content": "hello"}]}


class FakeKeyedUpstream:
    """An upstream that speaks Anthropic Messages and OpenAI chat, written for this
    test: a call with ``BUSY_KEY`` (in either header) gets 429 with ``Retry-After:
    30`` and the error of its API; any other is answered with usage. It keeps the
    headers of every request."""

    def __init__(self) -> None:
        self.headers: list[dict[bytes, bytes]] = []

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.EndOfMessage):
                break
        assert request is not None
        headers = {k.lower(): v for k, v in request.headers}
        self.headers.append(headers)
        key = headers.get(b"x-api-key") or headers.get(b"authorization", b"").removeprefix(
            b"Bearer "
        )
        anthropic = request.target.endswith(b"/messages")
        if key == BUSY_KEY.encode():
            error = (
                {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
                if anthropic
                else {"error": {"type": "rate_limit_error", "message": "slow down"}}
            )
            await self._send(stream, conn, error, 429, [("Retry-After", "30")])
        elif anthropic:
            answer = {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "text", "text": "ok"}],
                "usage": {"input_tokens": 9, "output_tokens": 2},
            }
            await self._send(stream, conn, answer, 200)
        else:
            answer = {
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 1},
            }
            await self._send(stream, conn, answer, 200)

    async def _send(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        obj: object,
        status: int,
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        body = json.dumps(obj).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        response = h11.Response(status_code=status, headers=headers + (extra or []))
        await stream.send_all(conn.send(response) + conn.send(h11.Data(data=body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))


async def test_an_accounts_key_goes_upstream_and_a_429_to_it_rests_that_account() -> None:
    upstream, ledger = FakeKeyedUpstream(), Ledger()
    refused: list[tuple[str, str, float | None]] = []
    told = trio.Event()

    def on_refused(role: str, account: str, wait: float | None) -> None:
        refused.append((role, account, wait))
        told.set()

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            port_up = await nursery.start(upstream.serve)
            route = ModelRoute(
                upstream=lambda: Upstream("http", "127.0.0.1", port_up, "/v1", api_key=SWARM_KEY),
                meter=ledger,
                on_refused=on_refused,
            )
            who = Who(vm="coder-0", role="coder", task=5, model="m")
            who.account, who.account_key = "busy", BUSY_KEY
            port = await open_gateway(nursery, who, route)

            status, body = await http(port, "POST", "/v1/messages", MESSAGES)
            assert status == 429, body
            assert json.loads(body)["error"]["type"] == "rate_limit_error"
            # Told once the call is over: the guest may have its answer a moment before.
            await told.wait()
            assert refused == [("coder", "busy", 30.0)]

            who.account, who.account_key = "free", FREE_KEY
            status, body = await http(port, "POST", "/v1/messages", MESSAGES)
            assert status == 200 and json.loads(body)["content"][0]["text"] == "ok"
            status, body = await http(port, "POST", "/v1/chat/completions", CHAT)
            assert status == 200, body

            # A VM without an account calls with the swarm's own key.
            who.account, who.account_key = None, None
            status, _ = await http(port, "POST", "/v1/chat/completions", CHAT)
            assert status == 200
            nursery.cancel_scope.cancel()
    assert refused == [("coder", "busy", 30.0)]  # told once, for the busy key only
    busy, free_messages, free_chat, own = upstream.headers
    assert busy[b"x-api-key"] == BUSY_KEY.encode() and b"authorization" not in busy
    assert free_messages[b"x-api-key"] == FREE_KEY.encode()
    assert free_messages[b"anthropic-version"] == ANTHROPIC_VERSION.encode()
    assert free_chat[b"authorization"] == f"Bearer {FREE_KEY}".encode()
    assert b"x-api-key" not in free_chat and b"anthropic-version" not in free_chat
    assert own[b"authorization"] == f"Bearer {SWARM_KEY}".encode()
    rows = [(c.account, c.outcome, c.prompt_tokens) for c in ledger.calls]
    assert rows == [("busy", "upstream_error", 0), ("free", "ok", 9), ("free", "ok", 7)] + [
        (None, "ok", 7)
    ]


def test_who_never_shows_the_accounts_key() -> None:
    who = Who(vm="coder-0", role="coder", account="busy", account_key=BUSY_KEY)
    assert BUSY_KEY not in repr(who) and "busy" in repr(who)


@pytest.mark.parametrize(
    ("value", "wait"),
    [
        (b"30", 30.0),
        (b" 7 ", 7.0),
        (email.utils.formatdate(1_000_090.0, usegmt=True).encode(), 90.0),
        (email.utils.formatdate(999_000.0, usegmt=True).encode(), 0.0),  # already past
        (b"soon", None),
        (b"-5", None),
        (b"", None),
    ],
)
def test_retry_after_reads_seconds_and_http_dates(value: bytes, wait: float | None) -> None:
    assert retry_after(value, 1_000_000.0) == wait
