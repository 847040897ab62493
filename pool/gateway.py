"""A VM's model gateway: the one way its agent reaches a model, metered and bounded.

The supervisor opens one listener per VM incarnation inside the VM's network
namespace (loopback without isolation) and serves it here. Whoever connects to
that listener is that VM: which VM, role, agent and task a call belongs to is
read from ``Who`` (kept by the supervisor), never from the request. Behind it::

    guest --HTTP/1.1--> gateway --HTTP/1.1--> model server (loopback) or upstream URL
                        |  POST /v1/chat/completions   (OpenAI chat; streamed or not)
                        |  POST /v1/responses          (OpenAI Responses: codex)
                        |  POST /v1/messages           (Anthropic Messages: claude-code)
                        |  POST /v1/messages/count_tokens   (not metered)
                        |  GET  /v1/models
                        |  GET  /props                 (llama-server's; only whether
                        |                               the model's template takes tools)
                        +- size cap, calls-at-once cap, budget check (429 + the
                        |  error of the guest's API: OpenAI's or Anthropic's)
                        +- the upstream's API key added here (an account's, when the
                        |  VM's task runs on one: x-api-key on /v1/messages, else
                        |  Bearer); the guest never sees it; a 429 to an account's
                        |  key is told to the supervisor (``on_refused``)
                        +- usage read from the upstream's answer -> one ledger row;
                           a stream cut before it is counted by the gateway

Each POST route goes to the same path upstream, untranslated: llama.cpp's
server speaks all of them (pool/gateway_formats.py says what differs).

The request handling is sans-I/O (``plan``, ``UsageMeter``: pool/gateway_core.py):
bytes and values in, decisions out. ``serve_gateway`` is the thin trio adapter: one request per
connection, h11 on both sides, the upstream's body passed to the guest chunk by
chunk as it arrives (server-sent events included).

What a gateway needs from above is the ``Meter`` protocol: whether a role may
call now, and where a finished call's record goes (the supervisor's budgets).
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Final

import h11
import msgspec
import trio
from fireclaw.pool.gateway_core import (
    MAX_EVENT_BYTES,
    PROPS,
    AccountRefused,
    Charge,
    Forward,
    Limits,
    Meter,
    ModelRoute,
    Refuse,
    ToolCaps,
    Upstream,
    UsageMeter,
    Who,
    plan,
    retry_after,
    upstream_request,
)
from fireclaw.pool.gateway_formats import CHAT, ErrorShape
from fireclaw.pool.store import CallRecord

__all__ = ["REQUEST_TIMEOUT", "UpstreamError", "fetch_models", "serve_gateway"]

log = logging.getLogger("fireclaw.gateway")

#: Seconds a guest has to send its request (headers and body).
REQUEST_TIMEOUT: Final = 30.0
#: Connections one VM may hold open at once; beyond it they are closed unanswered.
MAX_CONNECTIONS_FACTOR: Final = 4
_MAX_HEADER_BYTES: Final = 16 * 1024
_CHUNK: Final = 64 * 1024

_json_decode = msgspec.json.Decoder(Any).decode
_json_encode = msgspec.json.Encoder().encode

_NO_SERVER: Final = Refuse(503, "no model server is running", "server_error", "unavailable")


# --- the trio adapter -----------------------------------------------------------------


class _GuestGone(Exception):
    """The guest hung up or broke HTTP; nothing more can be said to it."""


async def serve_gateway(listener: trio.SocketListener, who: Who, route: ModelRoute) -> None:
    """Serve one VM's gateway on ``listener`` until cancelled, for whoever ``who`` is
    at each call. Without a model server (``route.upstream()`` None) calls get 503."""
    upstream, meter, limits = route.upstream, route.meter, route.limits
    calls = trio.CapacityLimiter(limits.max_concurrent)
    connections = trio.CapacityLimiter(limits.max_concurrent * MAX_CONNECTIONS_FACTOR)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            if connections.available_tokens == 0:
                return  # a flood: close at once rather than queue
            async with connections:
                try:
                    await _one_request(
                        stream, who, upstream, meter, limits, calls, route.on_refused
                    )
                except (_GuestGone, trio.BrokenResourceError):
                    pass
                except Exception:
                    # One request's failure must not end the gateway, nor the VM it serves.
                    log.exception("%s: gateway request failed", who.vm)

    async with listener:
        await trio.serve_listeners(handle, [listener])


async def _one_request(
    stream: trio.SocketStream,
    who: Who,
    upstream_of: Callable[[], Upstream | None],
    meter: Meter,
    limits: Limits,
    calls: trio.CapacityLimiter,
    on_refused: AccountRefused | None = None,
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEADER_BYTES)
    with trio.move_on_after(REQUEST_TIMEOUT) as scope:
        request, body = await _read_request(stream, conn, limits.max_request_bytes)
    if scope.cancelled_caught:
        return
    if request is None:
        await _answer(
            stream, conn, Refuse(400, "bad HTTP request", "invalid_request_error", "bad_request")
        )
        return
    decision = plan(
        request.method.decode("ascii", "replace"),
        request.target.decode("ascii", "replace"),
        body,
        who,
        max_bytes=limits.max_request_bytes,
    )
    if isinstance(decision, Refuse):
        await _answer(stream, conn, decision)
        return
    if isinstance(decision, ToolCaps):
        up = upstream_of()
        if up is None:
            await _answer(stream, conn, _NO_SERVER)
            return
        await _answer_tool_caps(stream, conn, up, limits)
        return
    shape = decision.errors
    up = upstream_of()
    if up is None:
        await _answer(stream, conn, replace(_NO_SERVER, errors=shape))
        return
    busy = Refuse(
        429,
        f"{limits.max_concurrent} calls are already running for this VM",
        "rate_limit_exceeded",
        "too_many_concurrent_calls",
        shape,
    )
    # The account whose key the call is made with is fixed when it starts.
    account, key = who.account, who.account_key
    if not decision.metered:
        if calls.available_tokens == 0:
            await _answer(stream, conn, busy)
            return
        async with calls:
            await _proxy(
                stream, conn, decision, up, limits, UsageMeter(stream=decision.stream), key
            )
        return
    started = trio.current_time()
    # Who made the call is fixed when it starts: a task that ends meanwhile does
    # not move the call to the next one.
    record = dict(
        agent=who.agent,
        role=who.role,
        vm=who.vm,
        task=who.task,
        model=decision.model,
        account=account,
    )
    why = meter.refusal(who.role)
    if why is not None:
        # Recorded before the answer: once the guest has it, the ledger says so.
        _record(meter, record, None, "refused", 0.0)
        # A budget comes back with the next period or a reload, not in seconds.
        refuse = Refuse(429, why, "insufficient_quota", "budget_exceeded", shape, final=True)
        await _answer(stream, conn, refuse)
        return
    if calls.available_tokens == 0:
        await _answer(stream, conn, busy)  # no call was made: nothing for the ledger
        return
    usage = UsageMeter(
        stream=decision.stream, api=decision.api or CHAT, request_bytes=len(decision.body)
    )
    try:
        async with calls:
            await _proxy(stream, conn, decision, up, limits, usage, key)
    finally:
        _record(meter, record, usage, usage.outcome, trio.current_time() - started)
        if usage.status == 429 and account is not None and on_refused is not None:
            # The upstream refused this account's key: it rests, and its task
            # runs again on another (the role group decides).
            on_refused(who.role, account, usage.retry_after)


def _record(
    meter: Meter, who: dict[str, Any], usage: UsageMeter | None, outcome: str, duration: float
) -> None:
    charge = usage.charge() if usage else Charge(0, 0)
    meter.record(
        CallRecord(
            at=time.time(),
            prompt_tokens=charge.prompt,
            completion_tokens=charge.completion,
            duration=round(duration, 3),
            outcome=outcome,
            host_counted=charge.host_counted,
            **who,
        )
    )


async def _read_request(
    stream: trio.SocketStream, conn: h11.Connection, max_bytes: int
) -> tuple[h11.Request | None, bytes]:
    request: h11.Request | None = None
    body = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return None, b""
        if event is h11.NEED_DATA:
            data = await stream.receive_some(_CHUNK)
            conn.receive_data(data)
            if not data and conn.their_state is not h11.DONE:
                raise _GuestGone
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > max_bytes:
                return request, bytes(body)  # plan() refuses it; the rest is not read
        elif isinstance(event, h11.EndOfMessage):
            return request, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            raise _GuestGone


async def _answer(stream: trio.SocketStream, conn: h11.Connection, refuse: Refuse) -> None:
    body = refuse.body()
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    if refuse.final:
        headers.append(("x-should-retry", "false"))
    with contextlib.suppress(h11.LocalProtocolError):
        await stream.send_all(conn.send(h11.Response(status_code=refuse.status, headers=headers)))
        await stream.send_all(conn.send(h11.Data(data=body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))


async def _answer_tool_caps(
    stream: trio.SocketStream, conn: h11.Connection, up: Upstream, limits: Limits
) -> None:
    """``{"chat_template_caps": {...}}`` from the upstream's ``/props``; 404 where the
    upstream has none (not llama-server: the harness then uses JSON actions)."""
    caps: object = None
    with trio.move_on_after(limits.call_timeout):
        with contextlib.suppress(UpstreamError):
            props = await _fetch_json(up, Forward("GET", PROPS, b"", "", False, False, root=True))
            caps = props.get("chat_template_caps") if isinstance(props, dict) else None
    if not isinstance(caps, dict):
        refuse = Refuse(404, "the model server says nothing of tools", "not_found", "not_found")
        await _answer(stream, conn, refuse)
        return
    flags = {k: v for k, v in caps.items() if isinstance(k, str) and isinstance(v, bool)}
    body = _json_encode({"chat_template_caps": flags})
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    with contextlib.suppress(h11.LocalProtocolError):
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)))
        await stream.send_all(conn.send(h11.Data(data=body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))


async def _open_upstream(up: Upstream) -> trio.abc.Stream:
    sock = await trio.open_tcp_stream(up.host, up.port)
    if up.scheme != "https":
        return sock
    tls = trio.SSLStream(sock, ssl.create_default_context(), server_hostname=up.host)
    await tls.do_handshake()
    return tls


async def _proxy(
    guest: trio.SocketStream,
    gconn: h11.Connection,
    fwd: Forward,
    up: Upstream,
    limits: Limits,
    usage: UsageMeter,
    key: str | None = None,
) -> None:
    """Send ``fwd`` upstream (with ``key``, an account's, else the upstream's own)
    and pass its answer back as it arrives; how it ended goes into ``usage.outcome``."""
    shape = fwd.errors
    with trio.move_on_after(limits.call_timeout) as scope:
        try:
            upstream = await _open_upstream(up)
        except (OSError, trio.BrokenResourceError) as exc:
            log.warning("model server %r unreachable: %s", up, exc)
            usage.outcome = "upstream_error"
            await _answer(
                guest,
                gconn,
                Refuse(
                    502, "the model server is unreachable", "server_error", "bad_gateway", shape
                ),
            )
            return
        async with upstream:
            uconn = h11.Connection(h11.CLIENT)
            data = uconn.send(upstream_request(fwd, up, key))
            if fwd.body:
                data += uconn.send(h11.Data(data=fwd.body))
            data += uconn.send(h11.EndOfMessage())
            # From here the upstream may be reading the prompt: a call cut now is charged.
            usage.sent = True
            await upstream.send_all(data)
            await _relay_until_hangup(guest, gconn, upstream, uconn, usage, shape)
            return
    assert scope.cancelled_caught
    usage.outcome = "upstream_error"
    if gconn.our_state is h11.SEND_RESPONSE:
        await _answer(
            guest,
            gconn,
            Refuse(
                504, f"no answer within {limits.call_timeout:g}s", "server_error", "timeout", shape
            ),
        )


async def _relay_until_hangup(
    guest: trio.SocketStream,
    gconn: h11.Connection,
    upstream: trio.abc.Stream,
    uconn: h11.Connection,
    usage: UsageMeter,
    shape: ErrorShape,
) -> None:
    """``_relay``, ended early when the guest hangs up.

    A guest sends nothing after its request, so its EOF means it went away (a
    cancelled turn closes its stream): the upstream call is then closed at once,
    rather than left generating until its next token or the call timeout. A guest
    that hangs up once it has a stream's last event had the whole answer: the call
    is ``ok`` if the upstream said 2xx. Raises _GuestGone if the guest went away."""
    gone = False
    status: list[int] = []
    async with trio.open_nursery() as nursery:

        async def relay() -> None:
            nonlocal gone
            try:
                await _relay(guest, gconn, upstream, uconn, usage, status, shape)
            except _GuestGone:
                gone = True
            nursery.cancel_scope.cancel()

        async def watch() -> None:
            nonlocal gone
            try:
                while await guest.receive_some(_CHUNK):
                    pass  # nothing is expected; whatever comes is not read as HTTP
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            gone = True
            nursery.cancel_scope.cancel()

        nursery.start_soon(relay)
        nursery.start_soon(watch)
    if gone:
        if usage.outcome == "cancelled" and usage.done and status and 200 <= status[0] < 300:
            usage.outcome = "ok"
        raise _GuestGone


async def _relay(
    guest: trio.SocketStream,
    gconn: h11.Connection,
    upstream: trio.abc.Stream,
    uconn: h11.Connection,
    usage: UsageMeter,
    seen: list[int],
    shape: ErrorShape,
) -> None:
    """Pass the upstream's answer to the guest; its status goes into ``seen``."""
    status = 502
    while True:
        try:
            event = uconn.next_event()
        except h11.RemoteProtocolError:
            usage.outcome = "upstream_error"
            if gconn.our_state is h11.SEND_RESPONSE:
                await _answer(
                    guest,
                    gconn,
                    Refuse(
                        502,
                        "bad answer from the model server",
                        "server_error",
                        "bad_gateway",
                        shape,
                    ),
                )
            return
        if event is h11.NEED_DATA:
            try:
                uconn.receive_data(bytes(await upstream.receive_some(_CHUNK)))
            except trio.BrokenResourceError:
                uconn.receive_data(b"")
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
            seen.append(status)
            usage.status = status
            if status == 429:
                waits = [v for k, v in event.headers if k.lower() == b"retry-after"]
                usage.retry_after = retry_after(waits[0], time.time()) if waits else None
            kept = [
                (k, v) for k, v in event.headers if k.lower() in (b"content-type", b"cache-control")
            ]
            # Chunked to the guest whatever the upstream used: the body is passed on as
            # it arrives, its length unknown in advance.
            headers = [*kept, (b"Transfer-Encoding", b"chunked"), (b"Connection", b"close")]
            await _send(guest, gconn, h11.Response(status_code=status, headers=headers))
        elif isinstance(event, h11.Data):
            usage.feed(bytes(event.data))
            await _send(guest, gconn, h11.Data(data=event.data))
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            usage.close()
            ended = isinstance(event, h11.EndOfMessage) and 200 <= status < 300
            usage.outcome = "ok" if ended else "upstream_error"
            if isinstance(event, h11.EndOfMessage):
                await _send(guest, gconn, h11.EndOfMessage())
            return


async def _send(guest: trio.SocketStream, gconn: h11.Connection, event: Any) -> None:
    try:
        await guest.send_all(gconn.send(event))
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise _GuestGone from exc


class UpstreamError(Exception):
    """The model server could not be asked, or answered with an error. One line."""


async def _fetch_json(up: Upstream, fwd: Forward) -> Any:
    """The JSON ``fwd`` gets from ``up``; bound it at the call site. Raises
    UpstreamError, one line without the key, when it cannot be asked or answers
    with an error or with something that is not JSON."""
    base = up.prefix.removesuffix("/v1") if fwd.root else up.prefix
    where = f"{up.scheme}://{up.host}:{up.port}{base}{fwd.path}"
    body = bytearray()
    status = 0
    try:
        stream = await _open_upstream(up)
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            await stream.send_all(
                conn.send(upstream_request(fwd, up)) + conn.send(h11.EndOfMessage())
            )
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(_CHUNK)))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_EVENT_BYTES:
                        raise UpstreamError(f"{where}: answer too large")
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
    except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
        raise UpstreamError(f"cannot ask {where}: {exc}") from None
    if status != 200:
        raise UpstreamError(f"{where} answered HTTP {status}")
    try:
        return _json_decode(bytes(body))
    except msgspec.DecodeError:
        raise UpstreamError(f"{where} did not answer JSON") from None


async def fetch_models(up: Upstream) -> list[str]:
    """The ids of the models ``up`` serves (``GET /v1/models``); bound it at the call
    site. Raises UpstreamError, one line without the key, when it cannot be asked."""
    data = await _fetch_json(
        up, Forward("GET", "/models", b"", model="", stream=False, metered=False)
    )
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list):
        where = f"{up.scheme}://{up.host}:{up.port}{up.prefix}/models"
        raise UpstreamError(f"{where}: no 'data' list in the answer")
    return [m["id"] for m in items if isinstance(m, dict) and isinstance(m.get("id"), str)]
