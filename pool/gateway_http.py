"""A model gateway's HTTP: the guest's request read, its answers, the upstream's relayed.

The I/O under ``gateway.py``'s rules, h11 on both sides: ``read_request``
reads one request within a size cap, ``answer`` sends a refusal in the
guest's API's error shape, ``proxy`` sends a call upstream and passes the
answer back chunk by chunk as it arrives (server-sent events included),
feeding the ``UsageMeter`` that counts it and ending the call at once if the
guest hangs up. ``fetch_models`` and ``answer_tool_caps`` ask the upstream
for the gateway itself (its model list; whether its template takes tools).

Errors: ``GuestGone`` when the guest hung up or broke HTTP; ``UpstreamError``,
one line without the key, when the gateway's own question to the upstream
fails.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import time
from typing import Any, Final

import h11
import msgspec
import trio
from fireclaw.pool.gateway_core import (
    MAX_EVENT_BYTES,
    PROPS,
    Forward,
    Limits,
    Refuse,
    Upstream,
    UsageMeter,
    retry_after,
    upstream_request,
)
from fireclaw.pool.gateway_formats import ErrorShape

log = logging.getLogger("fireclaw.gateway")

_CHUNK: Final = 64 * 1024

_json_decode = msgspec.json.Decoder(Any).decode
_json_encode = msgspec.json.Encoder().encode


class GuestGone(Exception):
    """The guest hung up or broke HTTP; nothing more can be said to it."""


async def read_request(
    stream: trio.SocketStream, conn: h11.Connection, max_bytes: int
) -> tuple[h11.Request | None, bytes]:
    """The guest's request and its body; ``(None, b"")`` for one that is not HTTP.
    Reading stops once the body passes ``max_bytes`` (what was read is returned,
    for ``plan`` to refuse). Raises GuestGone if the guest hangs up first."""
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
                raise GuestGone
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
            raise GuestGone


async def answer(stream: trio.SocketStream, conn: h11.Connection, refuse: Refuse) -> None:
    """Send ``refuse`` as the whole answer (``Connection: close``); nothing once an
    answer has started (h11 refuses a second one)."""
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


async def answer_tool_caps(
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
        await answer(stream, conn, refuse)
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


async def proxy(
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
            await answer(
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
        await answer(
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
    is ``ok`` if the upstream said 2xx. Raises GuestGone if the guest went away."""
    gone = False
    status: list[int] = []
    async with trio.open_nursery() as nursery:

        async def relay() -> None:
            nonlocal gone
            try:
                await _relay(guest, gconn, upstream, uconn, usage, status, shape)
            except GuestGone:
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
        raise GuestGone


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
                await answer(
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
        raise GuestGone from exc


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
