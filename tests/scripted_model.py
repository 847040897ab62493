"""A scripted OpenAI-compatible model server, for tests: real HTTP on loopback.

``ScriptedModel`` answers each ``POST .../chat/completions`` with the next
entry of its script, as a server-sent event stream (or whole JSON, or an
error status), and ``GET /props`` with llama-server's ``chat_template_caps``.
``GET .../models`` lists ``models``. It keeps every chat request body it got.
It is a test double for llama-server, Ollama or vLLM: what it sends is what the
script says, quirks included.

    async with trio.open_nursery() as nursery:
        model = ScriptedModel([tool_call("run_shell", {"command": "id -u"}), text("done")])
        base_url = await nursery.start(model.serve)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import h11
import trio


@dataclass
class Stream:
    """An SSE answer: each chunk one ``data:`` event (a string is sent as it is),
    then ``[DONE]`` unless ``hang`` (then the server keeps the stream open until
    the client closes it). With ``hold``, the server stops after ``hold_after``
    chunks, sets ``ScriptedModel.holding``, and sends the rest once ``hold`` is set."""

    chunks: list[dict[str, Any] | str]
    hang: bool = False
    hold: trio.Event | None = None
    hold_after: int = 0


@dataclass
class Whole:
    """A whole (unstreamed) JSON answer."""

    body: dict[str, Any]


@dataclass
class Status:
    """An error answer."""

    code: int
    body: dict[str, Any] = field(default_factory=dict)


Entry = Stream | Whole | Status


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def text(content: str, *, finish: str = "stop", pieces: int = 3) -> Stream:
    """``content`` streamed in ``pieces``, then an empty-choices usage chunk."""
    size = max(1, -(-len(content) // pieces))
    parts = [content[i : i + size] for i in range(0, len(content), size)] or [""]
    chunks = [_chunk({"role": "assistant", "content": parts[0]})]
    chunks += [_chunk({"content": part}) for part in parts[1:]]
    chunks.append(_chunk({}, finish))
    chunks.append({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 5}})
    return Stream(chunks)


def action(value: dict[str, Any], *, finish: str = "stop") -> Stream:
    """A JSON-mode answer: ``value`` as the content."""
    return text(json.dumps(value), finish=finish)


def tool_call(
    name: str, arguments: dict[str, Any] | str, *, call_id: str | None = "call_1", index: int = 0
) -> Stream:
    """A native tool call, its arguments streamed in three pieces merged by index."""
    raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
    third = max(1, len(raw) // 3)
    pieces = [raw[:third], raw[third : 2 * third], raw[2 * third :]]
    first: dict[str, Any] = {"index": index, "type": "function", "function": {"name": name}}
    if call_id is not None:
        first["id"] = call_id
    chunks = [_chunk({"role": "assistant", "tool_calls": [first]})]
    chunks += [
        _chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
        for piece in pieces
    ]
    chunks.append(_chunk({}, "tool_calls"))
    return Stream(chunks)


class ScriptedModel:
    """See the module docstring. ``stream_closed`` is set when a client closes a
    hanging stream; ``requests`` holds every chat request body."""

    def __init__(
        self,
        script: Sequence[Entry],
        *,
        supports_tools: bool | None = None,
        models: Sequence[str] = ("scripted",),
    ) -> None:
        self.script = list(script)
        self.models = list(models)
        self.supports_tools = supports_tools
        self.requests: list[dict[str, Any]] = []
        self.stream_closed = trio.Event()
        self.hanging = trio.Event()
        self.holding = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(f"http://127.0.0.1:{port}/v1")
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            conn = h11.Connection(h11.SERVER)
            request: h11.Request | None = None
            body = b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            assert request is not None
            if request.target == b"/props":
                props: dict[str, Any] = {"model_path": "scripted"}
                if self.supports_tools is not None:
                    props["chat_template_caps"] = {"supports_tool_calls": self.supports_tools}
                await self._send_json(stream, conn, 200, props)
                return
            if request.method == b"GET" and request.target.endswith(b"/models"):
                listing = [{"id": m, "object": "model", "owned_by": "test"} for m in self.models]
                await self._send_json(stream, conn, 200, {"object": "list", "data": listing})
                return
            self.requests.append(json.loads(body))
            entry = self.script.pop(0) if self.script else Status(500, {"error": "script ended"})
            match entry:
                case Status(code=code, body=error):
                    await self._send_json(stream, conn, code, error)
                case Whole(body=whole):
                    await self._send_json(stream, conn, 200, whole)
                case Stream(chunks=chunks, hang=hang, hold=hold, hold_after=hold_after):
                    headers = [("Content-Type", "text/event-stream")]
                    await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)))
                    for n, chunk in enumerate(chunks):
                        if hold is not None and n == hold_after:
                            self.holding.set()
                            await hold.wait()
                        data = chunk if isinstance(chunk, str) else json.dumps(chunk)
                        line = f"data: {data}\r\n\r\n".encode()
                        await stream.send_all(conn.send(h11.Data(data=line)))
                    if hang:
                        self.hanging.set()
                        try:
                            while await stream.receive_some(65536):
                                pass  # nothing is expected: wait for the close
                        except trio.BrokenResourceError:
                            pass  # a reset (the client closed with bytes unread) is a close too
                        self.stream_closed.set()
                        return
                    await stream.send_all(conn.send(h11.Data(data=b"data: [DONE]\n\n")))
                    await stream.send_all(conn.send(h11.EndOfMessage()))

    @staticmethod
    async def _send_json(
        stream: trio.SocketStream, conn: h11.Connection, code: int, value: dict[str, Any]
    ) -> None:
        data = json.dumps(value).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
        await stream.send_all(conn.send(h11.Response(status_code=code, headers=headers)))
        await stream.send_all(conn.send(h11.Data(data=data)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
