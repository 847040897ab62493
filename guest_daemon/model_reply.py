"""What a model said: a chat completion read from a stream of pieces or whole.

``SseDecoder`` splits a server-sent-event stream into event payloads,
``ReplyMerger`` merges the chunks of a streamed completion (or takes a whole
one) into a ``Reply``: the text, the ``finish_reason`` and the ``ToolCall``s.

Servers differ (Ollama, vLLM, llama.cpp, OpenAI): a tool call may come
without an id, with arguments as a string or as an object, in streamed pieces
to be merged by ``index``; a chunk may have no ``choices`` (the usage chunk).
All of that is read defensively: nothing a server sends raises here, except
an event line longer than ``MAX_SSE_LINE`` (``ModelReplyError``).

This module imports only the standard library: it ships inside VM images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "MAX_SSE_LINE",
    "ModelReplyError",
    "Reply",
    "ReplyMerger",
    "SseDecoder",
    "ToolCall",
    "parse_arguments",
]

#: Longest line SseDecoder buffers before it gives up on the stream.
MAX_SSE_LINE: Final = 1 << 20


class ModelReplyError(Exception):
    """What the server sent cannot be a chat completion (one line)."""


@dataclass
class ToolCall:
    """One call the model asked for. ``arguments`` is None when they were not a
    JSON object; ``error`` then says why."""

    id: str
    name: str
    arguments: dict[str, Any] | None
    raw_arguments: str
    error: str = ""


@dataclass
class Reply:
    """One model reply, merged from a stream or read whole."""

    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None


@dataclass
class _CallPieces:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class ReplyMerger:
    """Merges streamed chunks (or one whole response) into a ``Reply``."""

    def __init__(self) -> None:
        self._content: list[str] = []
        self._calls: dict[int, _CallPieces] = {}
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None

    def feed(self, chunk: object) -> None:
        """One decoded JSON chunk; anything unexpected in it is skipped."""
        if not isinstance(chunk, dict):
            return
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return  # the usage chunk, or a server's keep-alive
        choice = choices[0]
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            delta = choice.get("message")  # a whole, unstreamed response
        if isinstance(delta, dict):
            if isinstance(delta.get("content"), str):
                self._content.append(delta["content"])
            calls = delta.get("tool_calls")
            if isinstance(calls, list):
                for position, piece in enumerate(calls):
                    self._merge_call(position, piece)
        if isinstance(choice.get("finish_reason"), str):
            self._finish = choice["finish_reason"]

    def _merge_call(self, position: int, piece: object) -> None:
        if not isinstance(piece, dict):
            return
        index = piece.get("index")
        # Without an index (some servers send whole calls), the place in the list says.
        key = index if isinstance(index, int) and not isinstance(index, bool) else position
        call = self._calls.setdefault(key, _CallPieces())
        if isinstance(piece.get("id"), str) and piece["id"] and not call.id:
            call.id = piece["id"]
        function = piece.get("function")
        if not isinstance(function, dict):
            return
        name = function.get("name")
        if isinstance(name, str) and name and not call.name:
            call.name = name
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            call.arguments.append(arguments)
        elif isinstance(arguments, dict):  # Ollama sends an object, not a string
            call.arguments.append(json.dumps(arguments))

    def reply(self) -> Reply:
        calls = []
        for _, pieces in sorted(self._calls.items()):
            raw = "".join(pieces.arguments)
            arguments, error = parse_arguments(raw)
            calls.append(ToolCall(pieces.id, pieces.name, arguments, raw, error))
        return Reply("".join(self._content), calls, self._finish, self._usage)


def parse_arguments(raw: str) -> tuple[dict[str, Any] | None, str]:
    """Tool arguments as a JSON object, or ``(None, why not)``; empty means ``{}``."""
    if not raw.strip():
        return {}, ""
    try:
        value = json.loads(raw)
    except ValueError as exc:
        return None, f"arguments are not valid JSON ({exc})"
    if isinstance(value, str):  # arguments encoded twice, as some servers do
        return parse_arguments(value) if value.strip().startswith("{") else (None, "not an object")
    if not isinstance(value, dict):
        return None, f"arguments must be a JSON object, got {type(value).__name__}"
    return value, ""


class SseDecoder:
    """Server-sent events: bytes in, the ``data`` of each complete event out.

    Lines end in LF, CRLF or CR; ``data:`` lines of one event are joined by LF;
    comments and other fields are skipped. Raises ModelReplyError for a line
    longer than ``MAX_SSE_LINE``.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []

    def feed(self, data: bytes) -> list[str]:
        self._buffer += data
        events: list[str] = []
        while True:
            cut = min(
                (i for i in (self._buffer.find(b"\n"), self._buffer.find(b"\r")) if i >= 0),
                default=-1,
            )
            if cut < 0:
                if len(self._buffer) > MAX_SSE_LINE:
                    raise ModelReplyError(f"an event line longer than {MAX_SSE_LINE} bytes")
                return events
            if self._buffer[cut : cut + 1] == b"\r" and cut + 1 == len(self._buffer):
                return events  # a CR that may be half of a CRLF: wait for the next byte
            line = self._buffer[:cut].decode("utf-8", errors="replace")
            step = 2 if self._buffer[cut : cut + 2] == b"\r\n" else 1
            self._buffer = self._buffer[cut + step :]
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif line.startswith("data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(" ") else value)

    def close(self) -> list[str]:
        """The last event when the stream ended without a blank line."""
        events = self.feed(b"\n\n") if self._buffer or self._data else []
        return events
