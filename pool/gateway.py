"""A VM's model gateway: the one way its agent reaches a model, metered and bounded.

The supervisor opens one listener per VM incarnation inside the VM's network
namespace (loopback without isolation) and serves it here. Whoever connects to
that listener is that VM: which VM, role, agent and task a call belongs to is
read from ``Who`` (kept by the supervisor), never from the request. Behind it::

    guest --HTTP/1.1--> gateway --HTTP/1.1--> model server (loopback) or upstream URL
                        |  POST /v1/chat/completions   (streamed or not)
                        |  GET  /v1/models
                        |  GET  /props                 (llama-server's; only whether
                        |                               the model's template takes tools)
                        +- size cap, calls-at-once cap, budget check (429 + OpenAI error)
                        +- the upstream's API key added here; the guest never sees it
                        +- usage read from the upstream's answer -> one ledger row

The request handling is sans-I/O (``plan``, ``UsageMeter``): bytes and values
in, decisions out. ``serve_gateway`` is the thin trio adapter: one request per
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
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import h11
import msgspec
import trio
from fireclaw.pool.store import CallRecord

__all__ = [
    "Forward",
    "Limits",
    "Meter",
    "ModelRoute",
    "Refuse",
    "ToolCaps",
    "Upstream",
    "UpstreamError",
    "UsageMeter",
    "fetch_models",
    "Who",
    "error_body",
    "plan",
    "serve_gateway",
]

log = logging.getLogger("fireclaw.gateway")

CHAT: Final = "/v1/chat/completions"
MODELS: Final = "/v1/models"
#: llama-server's own route beside ``/v1``: what a chat harness asks in ``tool_mode: auto``.
PROPS: Final = "/props"
#: Seconds a guest has to send its request (headers and body).
REQUEST_TIMEOUT: Final = 30.0
#: Connections one VM may hold open at once; beyond it they are closed unanswered.
MAX_CONNECTIONS_FACTOR: Final = 4
_MAX_HEADER_BYTES: Final = 16 * 1024
_CHUNK: Final = 64 * 1024
#: Of an SSE stream, the longest line kept for reading usage (a chunk of JSON).
_MAX_EVENT_BYTES: Final = 1 << 20

_json_decode = msgspec.json.Decoder(Any).decode
_json_encode = msgspec.json.Encoder().encode


@dataclass
class Who:
    """Whose calls a gateway carries now. Mutable: promotion and task code update it
    as the VM becomes an agent or takes a task; ``model`` is the role's or the
    agent's, used when a request names none."""

    vm: str
    role: str
    agent: str | None = None
    task: int | None = None
    model: str = ""


@dataclass(frozen=True)
class Upstream:
    """Where calls go: an OpenAI-compatible API at ``scheme://host:port{prefix}``.
    ``prefix`` ends at ``/v1`` (``/v1/models`` is ``prefix + '/models'``).
    ``api_key`` is sent as a bearer token; it never reaches a guest."""

    scheme: str
    host: str
    port: int
    prefix: str
    api_key: str | None = None

    def __repr__(self) -> str:  # the key never shows up in a log or a traceback
        return f"Upstream({self.scheme}://{self.host}:{self.port}{self.prefix})"


class Meter(Protocol):
    """What a gateway (and a role group) asks of the supervisor: budgets and the ledger."""

    def refusal(self, role: str) -> str | None:
        """Why ``role`` may not call now (its budget or the swarm's is spent), or None."""

    def record(self, call: CallRecord) -> None:
        """Keep the record of one finished call."""

    async def wait_changed(self) -> None:
        """Return when what ``refusal`` says may have changed."""


@dataclass
class Limits:
    """Per VM: request size, calls at once, and how long a call may take."""

    max_request_bytes: int = 1 << 20
    max_concurrent: int = 2
    call_timeout: float = 300.0


@dataclass
class ModelRoute:
    """What every VM's gateway shares: where calls go, who meters them, the limits.
    ``upstream()`` is asked at each call (None: no model server now)."""

    upstream: Callable[[], Upstream | None]
    meter: Meter
    limits: Limits = field(default_factory=Limits)


# --- the sans-I/O core -------------------------------------------------------------


@dataclass(frozen=True)
class Refuse:
    """Answer the guest with ``status`` and an OpenAI-style error; nothing goes upstream."""

    status: int
    message: str
    type: str
    code: str

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code)


@dataclass(frozen=True)
class Forward:
    """Send ``method path`` with ``body`` upstream; ``stream``: the answer is SSE.
    ``path`` follows the upstream's ``/v1`` prefix, or its root with ``root``."""

    method: str
    path: str
    body: bytes
    model: str
    stream: bool
    metered: bool  # a chat completion: a ledger row and a budget check
    root: bool = False


@dataclass(frozen=True)
class ToolCaps:
    """Answer with what the upstream's ``/props`` says of tool calls, and nothing
    else of it (it names files and settings of the host)."""


def error_body(message: str, type_: str, code: str) -> bytes:
    """The error JSON OpenAI's API and its clients use."""
    return _json_encode({"error": {"message": message, "type": type_, "code": code}})


def plan(
    method: str, target: str, body: bytes, who: Who, *, max_bytes: int
) -> Forward | ToolCaps | Refuse:
    """Decide what to do with one request the guest sent (its body read in full,
    at most ``max_bytes`` + 1 bytes of it). Only the three routes are served; a
    chat request must be a JSON object; a streamed one is made to report usage."""
    path = target.split("?", 1)[0]
    if path == PROPS:
        if method != "GET":
            return Refuse(405, f"{path} takes GET", "invalid_request_error", "method_not_allowed")
        return ToolCaps()
    if path == MODELS:
        if method != "GET":
            return Refuse(405, f"{path} takes GET", "invalid_request_error", "method_not_allowed")
        return Forward("GET", "/models", b"", model="", stream=False, metered=False)
    if path != CHAT:
        return Refuse(
            404,
            f"no route {path[:100]!r}: the gateway serves {CHAT}, {MODELS} and {PROPS}",
            "invalid_request_error",
            "not_found",
        )
    if method != "POST":
        return Refuse(405, f"{path} takes POST", "invalid_request_error", "method_not_allowed")
    if len(body) > max_bytes:
        return Refuse(
            413,
            f"request larger than {max_bytes} bytes",
            "invalid_request_error",
            "request_too_large",
        )
    try:
        request = _json_decode(body)
    except msgspec.DecodeError as exc:
        return Refuse(400, f"body is not JSON: {exc}", "invalid_request_error", "invalid_json")
    if not isinstance(request, dict):
        return Refuse(400, "body must be a JSON object", "invalid_request_error", "invalid_json")
    model = request.get("model") or who.model
    if not isinstance(model, str) or not model:
        return Refuse(400, "model must be a string", "invalid_request_error", "invalid_model")
    request["model"] = model
    stream = request.get("stream") is True
    if stream:
        # Usage is read from the upstream's own answer, so it must send it.
        options = request.get("stream_options")
        options = dict(options) if isinstance(options, dict) else {}
        options["include_usage"] = True
        request["stream_options"] = options
    return Forward("POST", "/chat/completions", _json_encode(request), model, stream, True)


def upstream_request(fwd: Forward, upstream: Upstream) -> h11.Request:
    """The request line and headers sent upstream: built anew, nothing of the guest's
    headers passes (its own Authorization, cookies, Host) except what the body says."""
    headers = [
        ("Host", f"{upstream.host}:{upstream.port}"),
        ("Connection", "close"),
        ("Accept", "text/event-stream" if fwd.stream else "application/json"),
        ("User-Agent", "fireclaw-gateway"),
    ]
    if fwd.method == "POST":
        headers += [("Content-Type", "application/json"), ("Content-Length", str(len(fwd.body)))]
    if upstream.api_key:
        headers.append(("Authorization", f"Bearer {upstream.api_key}"))
    base = upstream.prefix.removesuffix("/v1") if fwd.root else upstream.prefix
    return h11.Request(method=fwd.method, target=base + fwd.path, headers=headers)


class UsageMeter:
    """Reads the token counts out of an upstream answer, fed as it arrives.

    For a JSON answer, the ``usage`` object of the whole body; for server-sent
    events, the last ``usage`` any ``data:`` event carried (with
    ``include_usage`` the last chunk before ``[DONE]``). Counts that are not
    non-negative integers are taken as 0."""

    def __init__(self, *, stream: bool) -> None:
        self.stream = stream
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.found = False
        #: How the call ended: ``ok``, ``upstream_error``, or ``cancelled`` while it
        #: has not ended by itself. Set before the guest is told, so that a guest that
        #: hangs up at the last byte does not change what the ledger says.
        self.outcome = "cancelled"
        #: A stream's ``data: [DONE]`` went by: the answer is whole, whatever the
        #: HTTP framing after it.
        self.done = False
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data
        if not self.stream:
            return
        *lines, rest = bytes(self._buffer).split(b"\n")
        self._buffer = bytearray(rest[-_MAX_EVENT_BYTES:])
        for line in lines:
            line = line.rstrip(b"\r")
            if line.startswith(b"data:"):
                self._take(line[5:].strip())

    def close(self) -> None:
        """The body has ended."""
        if self.stream:
            self.feed(b"\n")
        else:
            self._take(bytes(self._buffer))
        self._buffer.clear()

    def _take(self, payload: bytes) -> None:
        if payload == b"[DONE]":
            self.done = True
            return
        if not payload:
            return
        try:
            data = _json_decode(payload)
        except msgspec.DecodeError:
            return
        usage = data.get("usage") if isinstance(data, dict) else None
        if isinstance(usage, dict):
            self.found = True
            self.prompt_tokens = _count(usage.get("prompt_tokens"))
            self.completion_tokens = _count(usage.get("completion_tokens"))


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


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
                    await _one_request(stream, who, upstream, meter, limits, calls)
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
    up = upstream_of()
    if up is None:
        await _answer(
            stream, conn, Refuse(503, "no model server is running", "server_error", "unavailable")
        )
        return
    if isinstance(decision, ToolCaps):
        await _answer_tool_caps(stream, conn, up, limits)
        return
    busy = Refuse(
        429,
        f"{limits.max_concurrent} calls are already running for this VM",
        "rate_limit_exceeded",
        "too_many_concurrent_calls",
    )
    if not decision.metered:
        if calls.available_tokens == 0:
            await _answer(stream, conn, busy)
            return
        async with calls:
            await _proxy(stream, conn, decision, up, limits, UsageMeter(stream=False))
        return
    started = trio.current_time()
    # Who made the call is fixed when it starts: a task that ends meanwhile does
    # not move the call to the next one.
    record = dict(agent=who.agent, role=who.role, vm=who.vm, task=who.task, model=decision.model)
    why = meter.refusal(who.role)
    if why is not None:
        # Recorded before the answer: once the guest has it, the ledger says so.
        _record(meter, record, None, "refused", 0.0)
        await _answer(stream, conn, Refuse(429, why, "insufficient_quota", "budget_exceeded"))
        return
    if calls.available_tokens == 0:
        await _answer(stream, conn, busy)  # no call was made: nothing for the ledger
        return
    usage = UsageMeter(stream=decision.stream)
    try:
        async with calls:
            await _proxy(stream, conn, decision, up, limits, usage)
    finally:
        _record(meter, record, usage, usage.outcome, trio.current_time() - started)


def _record(
    meter: Meter, who: dict[str, Any], usage: UsageMeter | None, outcome: str, duration: float
) -> None:
    meter.record(
        CallRecord(
            at=time.time(),
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            duration=round(duration, 3),
            outcome=outcome,
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
) -> None:
    """Send ``fwd`` upstream and pass its answer back as it arrives; how it ended goes
    into ``usage.outcome``."""
    with trio.move_on_after(limits.call_timeout) as scope:
        try:
            upstream = await _open_upstream(up)
        except (OSError, trio.BrokenResourceError) as exc:
            log.warning("model server %r unreachable: %s", up, exc)
            usage.outcome = "upstream_error"
            await _answer(
                guest,
                gconn,
                Refuse(502, "the model server is unreachable", "server_error", "bad_gateway"),
            )
            return
        async with upstream:
            uconn = h11.Connection(h11.CLIENT)
            data = uconn.send(upstream_request(fwd, up))
            if fwd.body:
                data += uconn.send(h11.Data(data=fwd.body))
            data += uconn.send(h11.EndOfMessage())
            await upstream.send_all(data)
            await _relay_until_hangup(guest, gconn, upstream, uconn, usage)
            return
    assert scope.cancelled_caught
    usage.outcome = "upstream_error"
    if gconn.our_state is h11.SEND_RESPONSE:
        await _answer(
            guest,
            gconn,
            Refuse(504, f"no answer within {limits.call_timeout:g}s", "server_error", "timeout"),
        )


async def _relay_until_hangup(
    guest: trio.SocketStream,
    gconn: h11.Connection,
    upstream: trio.abc.Stream,
    uconn: h11.Connection,
    usage: UsageMeter,
) -> None:
    """``_relay``, ended early when the guest hangs up.

    A guest sends nothing after its request, so its EOF means it went away (a
    cancelled turn closes its stream): the upstream call is then closed at once,
    rather than left generating until its next token or the call timeout. A guest
    that hangs up once it has a stream's ``[DONE]`` had the whole answer: the call
    is ``ok`` if the upstream said 2xx. Raises _GuestGone if the guest went away."""
    gone = False
    status: list[int] = []
    async with trio.open_nursery() as nursery:

        async def relay() -> None:
            nonlocal gone
            try:
                await _relay(guest, gconn, upstream, uconn, usage, status)
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
                    Refuse(502, "bad answer from the model server", "server_error", "bad_gateway"),
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
                    if len(body) > _MAX_EVENT_BYTES:
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
