"""A thin HTTP client for the model gateway's OpenAI-compatible API, over trio.

HTTP/1.1 by h11 (it comes with trio-websocket, through wsproto), one
connection per call, closed when the call ends however it ends: cancelling a
call closes its stream, which tells the server to stop generating.

``complete(base_url, body)`` posts a chat completion and reads the answer,
streamed (server-sent events, merged by ``model_reply.ReplyMerger``) or whole, into
a ``model_reply.Reply``; ``on_chunk`` sees each decoded chunk as it arrives (the
answer sent on as it is written). ``tool_support(base_url)`` asks llama-server's ``/props``
whether the model's chat template takes tools.

Errors::

    ModelError              one line, for the turn's failure report; also what the
    │                       server sent when it cannot be a chat completion
    └── ModelHttpError      the server answered with a status other than 200

Connection failures are ``ModelError`` too; the caller bounds every call with
a cancel scope (the turn's deadline).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import urlsplit

import h11
import trio

from .model_reply import ModelReplyError, Reply, ReplyMerger, SseDecoder

#: Largest response body read (a chat completion is far smaller).
MAX_BODY: Final = 8 << 20
#: Largest part of an error body quoted in a ModelError.
_MAX_QUOTE: Final = 300
_RECEIVE: Final = 64 * 1024


class ModelError(Exception):
    """A model call failed; ``str()`` is one line."""


class ModelHttpError(ModelError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"model server answered {status}: {message}")
        self.status = status


def _target(base_url: str, path: str) -> tuple[str, int, str, str]:
    """``(host, port, request target, Host header)`` of ``base_url`` + ``path``."""
    parts = urlsplit(base_url)
    if parts.scheme != "http" or not parts.hostname:
        raise ModelError(f"model base URL {base_url!r}: expected http://HOST:PORT/PATH")
    return parts.hostname, parts.port or 80, parts.path.rstrip("/") + path, parts.netloc


async def _exchange(
    base_url: str, method: str, path: str, body: bytes | None
) -> tuple[h11.Response, trio.abc.Stream, h11.Connection]:
    host, port, target, netloc = _target(base_url, path)
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise ModelError(f"cannot reach the model server at {host}:{port}: {exc}") from exc
    conn = h11.Connection(h11.CLIENT)
    headers = [("Host", netloc), ("Connection", "close"), ("Accept", "text/event-stream")]
    if body is not None:
        headers += [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    try:
        await stream.send_all(conn.send(h11.Request(method=method, target=target, headers=headers)))
        if body is not None:
            await stream.send_all(conn.send(h11.Data(data=body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(_RECEIVE)))
                continue
            if isinstance(event, h11.Response):
                return event, stream, conn
            if isinstance(event, h11.ConnectionClosed):
                raise ModelError("the model server closed the connection without answering")
    except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
        await stream.aclose()
        raise ModelError(f"model server at {host}:{port}: {exc}") from exc
    except BaseException:
        await stream.aclose()
        raise


async def _body_chunks(stream: trio.abc.Stream, conn: h11.Connection) -> Any:
    """The response body, piece by piece, up to ``MAX_BODY`` bytes."""
    seen = 0
    while True:
        try:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(_RECEIVE)))
                continue
        except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
            raise ModelError(f"reading the model's answer: {exc}") from exc
        if isinstance(event, h11.Data):
            seen += len(event.data)
            if seen > MAX_BODY:
                raise ModelError(f"the model's answer is larger than {MAX_BODY} bytes")
            yield bytes(event.data)
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            return


def _error_message(body: bytes) -> str:
    """The ``error.message`` of an OpenAI-style error body, else the body, on one line."""
    text = body.decode("utf-8", errors="replace")
    try:
        value = json.loads(text)
        if isinstance(value, dict) and isinstance(value.get("error"), dict):
            text = str(value["error"].get("message", text))
        elif isinstance(value, dict) and isinstance(value.get("error"), str):
            text = value["error"]
    except ValueError:
        pass
    text = " ".join(text.split())
    return text if len(text) <= _MAX_QUOTE else text[:_MAX_QUOTE] + "..."


#: ``on_chunk(chunk)``: one decoded JSON chunk of the reply, as it arrives.
OnChunk = Callable[[object], None]


async def complete(
    base_url: str, body: dict[str, Any], *, on_chunk: OnChunk | None = None
) -> Reply:
    """POST ``body`` to ``{base_url}/chat/completions``; the model's reply.

    Reads an event stream when the server sends one (``text/event-stream``),
    a whole JSON response otherwise; each chunk goes to ``on_chunk`` too, before
    the next is read. Raises ModelError."""
    response, stream, conn = await _exchange(
        base_url, "POST", "/chat/completions", json.dumps(body).encode()
    )
    async with stream:
        if response.status_code != 200:
            data = b"".join([piece async for piece in _body_chunks(stream, conn)])
            raise ModelHttpError(response.status_code, _error_message(data))
        content_type = dict(response.headers).get(b"content-type", b"").decode("latin-1")
        merger = ReplyMerger()
        if content_type.startswith("text/event-stream"):
            decoder = SseDecoder()
            try:
                async for piece in _body_chunks(stream, conn):
                    if _feed_events(decoder.feed(piece), merger, on_chunk):
                        break
                else:
                    _feed_events(decoder.close(), merger, on_chunk)
            except ModelReplyError as exc:
                raise ModelError(str(exc)) from exc
        else:
            data = b"".join([piece async for piece in _body_chunks(stream, conn)])
            whole = _json(data.decode("utf-8", errors="replace"))
            merger.feed(whole)
            if on_chunk is not None:
                on_chunk(whole)
        return merger.reply()


def _feed_events(events: list[str], merger: ReplyMerger, on_chunk: OnChunk | None) -> bool:
    """Feed event payloads to ``merger`` (and ``on_chunk``); true once ``[DONE]`` was seen."""
    for event in events:
        if event.strip() == "[DONE]":
            return True
        chunk = _json(event)
        merger.feed(chunk)
        if on_chunk is not None:
            on_chunk(chunk)
    return False


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise ModelError(
            f"the model server sent something that is not JSON: {text[:80]!r}"
        ) from None


async def tool_support(base_url: str) -> bool:
    """Whether llama-server says the model's chat template takes ``tools``.

    Asks ``/props`` beside the ``/v1`` base URL; any failure (another server,
    a gateway that does not pass it on) means no."""
    root = base_url.rstrip("/").removesuffix("/v1")
    try:
        response, stream, conn = await _exchange(root, "GET", "/props", None)
        async with stream:
            if response.status_code != 200:
                return False
            data = b"".join([piece async for piece in _body_chunks(stream, conn)])
        props = json.loads(data)
    except (ModelError, ValueError):
        return False
    caps = props.get("chat_template_caps") if isinstance(props, dict) else None
    if isinstance(caps, dict):
        return bool(caps.get("supports_tool_calls") or caps.get("supports_tools"))
    return False
