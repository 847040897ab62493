"""The control API: HTTP/1.1 with JSON bodies over a unix socket.

The CLI talks to a running supervisor only through ``<state_dir>/api.sock``. The
socket is created with mode 0600: whoever can open it controls the swarm. The
server is a thin adapter (STYLE.md 3): h11 parses and frames HTTP, each route
validates its input with a msgspec Struct and calls one ``Controller`` method (the
supervisor implements it), and the answer goes back as JSON.

Routes::

    GET  /health                      {"ok": true, "pid": N}   (answered here, no controller call)
    GET  /status[?since=V&wait=S]     controller.status(), after a change past version V
    POST /run     {"role", "argv"}    ndjson stream, see below
    POST /tasks   {"role", "prompt"}  controller.submit_task()
    GET  /tasks[?state=S]             {"tasks": controller.list_tasks(S)}
    GET  /tasks/<id>                  controller.get_task(id)
    POST /scale   {"role", "n"}       controller.scale()
    POST /reset   {"name"}            controller.reset()
    POST /agents  {"role", "name"?, "model"?}   controller.invoke()    a named agent
    POST /agents/<name> {"model"?, "persona"?}  controller.retune()
    DELETE /agents/<name>             controller.destroy()
    POST /agents/<name>/stop (no body or {})  controller.cancel(): end its current turn
    POST /reload  (no body or {})     controller.reload()
    GET  /events[?after=N&limit=N]    {"events": controller.events(after, limit)}
    GET  /usage[?by=B&since=T&key=K]  controller.usage(): the model-call ledger summed per B
                                      (agent, role, task, model or vm) since unix time T
    POST /down    {"leave_vms"?}      controller.down(): stop the fleet, or hand it over
    GET  /openapi.json                this API as an OpenAPI 3.1 document (supervisor/openapi.py)

Every error is ``{"error": "<one line>"}`` with its status: 400 bad JSON, wrong
field types, unknown fields or query parameters; 404 unknown route; 405 wrong
method (with ``Allow``); 408 request not received within the idle timeout; 413
body over ``MAX_BODY_BYTES``; 431 request head too large; a ``ControllerError``'s
own status; 507 when the state disk refuses what the request needs written or
read (full, read-only, failing: ``StateUnwritable``), to be tried again once
it has room; 500 for anything unexpected (logged; the server keeps serving).

One request per connection: every response says ``Connection: close``.

``POST /run`` answers ``200`` with ``Content-Type: application/x-ndjson``, chunked.
Each ``await emit(obj)`` by the controller writes one JSON line and flushes it
before returning; when ``run`` returns, a last line ``{"exit": code}`` ends the
stream. The response head is only sent with the first line, so a
``ControllerError`` raised before anything was emitted (an unknown role, say) is
an ordinary error response with its status; raised later it becomes a last line
``{"error": "..."}``.

A client that goes away mid-run cancels the run: the run is called inside a cancel
scope, which is cancelled when the client's end of the socket reaches EOF (a
client that half-closes its side counts as gone) or when a write to it fails or
stalls for the idle timeout. The controller therefore sees ``trio.Cancelled`` at
its next checkpoint, typically inside ``emit``, and must let it propagate so its
``finally`` blocks stop the command. An ``emit`` from a task outside the run's
scope (one the controller started elsewhere) raises ``StreamClosed`` instead.

Exceptions::

    ControllerError     raised by a Controller: the request is refused (status + one line)
    StreamClosed        emit() after the /run client went away, from outside the run's scope
    ApiServerError      the socket cannot be set up (serve_api)
"""

from __future__ import annotations

import errno
import http
import logging
import os
import pathlib
import re
import stat
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Annotated, Final, Protocol, TypeVar

import h11
import msgspec
import trio
from fireclaw.supervisor.state import StateUnwritable
from msgspec import Meta

__all__ = [
    "IDLE_TIMEOUT",
    "MAX_BODY_BYTES",
    "ApiServerError",
    "Controller",
    "ControllerError",
    "Emit",
    "StreamClosed",
    "serve_api",
]

logger = logging.getLogger(__name__)

#: Largest request body accepted.
MAX_BODY_BYTES: Final = 64 * 1024
#: Largest request line plus headers accepted.
MAX_HEAD_BYTES: Final = 16 * 1024
#: How long a client may take to send its request, and to accept each write.
IDLE_TIMEOUT: Final = 30.0

_RECV_SIZE: Final = 64 * 1024
# After the response, read and discard what the client still sends (an unread
# oversized body) for a bounded time before closing, so that closing with unread
# data does not reset the connection before the client has read our answer.
_LINGER_TIMEOUT: Final = 2.0
_LINGER_BYTES: Final = 1024 * 1024
_SUN_PATH_MAX: Final = 107
_NDJSON: Final = "application/x-ndjson"
_TASK_STATES: Final = frozenset({"queued", "claimed", "done", "failed"})
_MAX_EVENTS_LIMIT: Final = 1000

Emit = Callable[[dict[str, object]], Awaitable[None]]
_T = TypeVar("_T")


class ControllerError(Exception):
    """A request the controller refuses; ``message`` is one line, ``status`` an HTTP status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class StreamClosed(Exception):
    """``emit`` was called after the /run client went away (and outside the run's scope)."""


#: Longest a status long-poll may wait, well inside the connection's idle timeout.
_MAX_STATUS_WAIT = 25.0


class ApiServerError(Exception):
    """The API socket cannot be set up; the message is one line naming the path."""


class Controller(Protocol):
    """What the API needs from the supervisor. Raise ``ControllerError`` to refuse a request."""

    async def status(self, since: int | None = None, wait: float = 0.0) -> dict[str, object]:
        """The fleet. With ``since`` (a ``version`` from an earlier answer), first wait up
        to ``wait`` seconds for anything to change after it: a long poll."""
        ...

    async def run(self, role: str | None, argv: list[str], emit: Emit, user: str = "") -> int: ...

    async def submit_task(self, role: str, prompt: str) -> dict[str, object]: ...

    async def get_task(self, task_id: int) -> dict[str, object]: ...

    async def list_tasks(self, state: str | None) -> list[dict[str, object]]: ...

    async def scale(self, role: str, n: int) -> dict[str, object]: ...

    async def reset(self, name: str) -> dict[str, object]: ...

    async def reload(self) -> dict[str, object]: ...

    async def invoke(
        self, role: str, name: str | None = None, model: str | None = None
    ) -> dict[str, object]: ...

    async def retune(
        self, name: str, *, model: str | None = None, persona: str | None = None
    ) -> dict[str, object]: ...

    async def destroy(self, name: str) -> dict[str, object]: ...

    async def cancel(self, name: str, reason: str) -> dict[str, object]:
        """End the current turn(s) of the agent (or task-running VM) ``name``."""
        ...

    async def events(self, after: int, limit: int) -> list[dict[str, object]]: ...

    async def usage(self, by: str, since: int, key: str | None) -> dict[str, object]: ...

    async def down(self, leave_vms: bool = False) -> dict[str, object]: ...


#: How ``GET /usage`` may sum the ledger.
USAGE_BY: Final = ("agent", "role", "task", "model", "vm")

# ---------------------------------------------------------------- request bodies

_Name = Annotated[str, Meta(min_length=1, max_length=64)]
_Argv = Annotated[list[Annotated[str, Meta(max_length=8192)]], Meta(min_length=1, max_length=256)]


class RunRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    role: _Name | None = None
    argv: _Argv
    #: Who runs it in the guest: empty for the unprivileged agent user, or a user name.
    user: Annotated[str, Meta(max_length=32, pattern=r"^([a-z_][a-z0-9_-]*)?$")] = ""


class TaskRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    role: _Name
    prompt: Annotated[str, Meta(min_length=1, max_length=MAX_BODY_BYTES)]


class ScaleRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    role: _Name
    n: Annotated[int, Meta(ge=0, le=1000)]


class InvokeRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    role: _Name
    name: _Name | None = None
    model: Annotated[str, Meta(min_length=1, max_length=256)] | None = None


class RetuneRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    persona: Annotated[str, Meta(max_length=16384)] | None = None


class ResetRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: _Name


class EmptyRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The body of POST /reload and POST /agents/<name>/stop: nothing, or an empty
    JSON object."""


class DownRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The body of POST /down: nothing, an empty object, or ``leave_vms: true`` (the
    supervisor exits and leaves its VMs running for the next one to adopt)."""

    leave_vms: bool = False


_RUN_DECODER: Final = msgspec.json.Decoder(RunRequest)
_TASK_DECODER: Final = msgspec.json.Decoder(TaskRequest)
# Lax: JSON may write a whole number as 4.0 (or a client "4"); either is the number 4.
_SCALE_DECODER: Final = msgspec.json.Decoder(ScaleRequest, strict=False)
_RESET_DECODER: Final = msgspec.json.Decoder(ResetRequest)
_INVOKE_DECODER: Final = msgspec.json.Decoder(InvokeRequest)
_RETUNE_DECODER: Final = msgspec.json.Decoder(RetuneRequest)
_EMPTY_DECODER: Final = msgspec.json.Decoder(EmptyRequest)
_DOWN_DECODER: Final = msgspec.json.Decoder(DownRequest)
_ENCODER: Final = msgspec.json.Encoder()


# ---------------------------------------------------------------- HTTP plumbing


class _HttpError(Exception):
    def __init__(self, status: int, message: str, *, allow: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.allow = allow


class _ClientGone(Exception):
    """The client closed, reset, or stopped reading: nothing more can be sent."""


class _Request(msgspec.Struct, frozen=True, kw_only=True):
    method: str
    path: str
    query: dict[str, str]
    body: bytes


def _one_line(text: str, limit: int = 1000) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _error_body(message: str) -> bytes:
    return _ENCODER.encode({"error": _one_line(message) or "error"})


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def _decode(decoder: msgspec.json.Decoder[_T], body: bytes, *, optional: bool = False) -> _T:
    if not body.strip():
        if optional:
            return decoder.decode(b"{}")
        raise _HttpError(400, "invalid request body: a JSON object is required")
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise _HttpError(400, f"invalid request body: {exc}") from exc


def _query(request: _Request, allowed: frozenset[str]) -> dict[str, str]:
    unknown = sorted(set(request.query) - allowed)
    if unknown:
        raise _HttpError(400, f"unknown query parameter {unknown[0]!r}")
    return request.query


def _int_param(query: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw, 10)
    except ValueError:
        raise _HttpError(400, f"query parameter {name} must be an integer") from None
    if not lo <= value <= hi:
        raise _HttpError(400, f"query parameter {name} must be between {lo} and {hi}")
    return value


def _parse_target(target: bytes) -> tuple[str, dict[str, str]]:
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        raise _HttpError(400, "request target is not ASCII") from None
    split = urllib.parse.urlsplit(text)
    query: dict[str, str] = {}
    try:
        pairs = urllib.parse.parse_qsl(
            split.query, keep_blank_values=True, strict_parsing=False, max_num_fields=16
        )
    except ValueError:
        raise _HttpError(400, "too many query parameters") from None
    for key, value in pairs:
        if key in query:
            raise _HttpError(400, f"query parameter {key!r} given twice")
        query[key] = value
    return urllib.parse.unquote(split.path), query


async def _send(stream: trio.abc.Stream, data: bytes | None, idle_timeout: float) -> None:
    if not data:
        return
    with trio.move_on_after(idle_timeout) as scope:
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _ClientGone("client closed the connection") from exc
    if scope.cancelled_caught:
        raise _ClientGone("client stopped reading")


def _head(
    status: int, content_type: str, length: int | None, *, allow: str | None = None
) -> h11.Response:
    headers = [
        ("content-type", content_type),
        ("connection", "close"),
        ("cache-control", "no-store"),
    ]
    if allow is not None:
        headers.append(("allow", allow))
    if length is None:
        headers.append(("transfer-encoding", "chunked"))
    else:
        headers.append(("content-length", str(length)))
    return h11.Response(status_code=status, headers=headers, reason=_reason(status))


async def _respond(
    conn: h11.Connection,
    stream: trio.abc.Stream,
    status: int,
    body: bytes,
    idle_timeout: float,
    *,
    allow: str | None = None,
) -> None:
    data = conn.send(_head(status, "application/json", len(body) + 1, allow=allow)) or b""
    data += conn.send(h11.Data(data=body + b"\n")) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await _send(stream, data, idle_timeout)


async def _read_request(
    conn: h11.Connection, stream: trio.abc.Stream, idle_timeout: float
) -> _Request | None:
    """Read one request; ``None`` if the client closed without sending one."""
    request: h11.Request | None = None
    body = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise _HttpError(exc.error_status_hint, f"bad request: {exc}") from exc
        if event is h11.NEED_DATA:
            if conn.they_are_waiting_for_100_continue:
                await _send(
                    stream,
                    conn.send(h11.InformationalResponse(status_code=100, headers=[])),
                    idle_timeout,
                )
            try:
                data = await stream.receive_some(_RECV_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _ClientGone("client reset the connection") from exc
            conn.receive_data(bytes(data))
        elif isinstance(event, h11.Request):
            request = event
            # h11 caps only a head that arrives in pieces; one read can hold a whole big one.
            head_size = (
                len(event.method)
                + len(event.target)
                + 12
                + sum(len(name) + len(value) + 4 for name, value in event.headers)
            )
            if head_size > MAX_HEAD_BYTES:
                raise _HttpError(431, f"request head over {MAX_HEAD_BYTES} bytes")
            for name, value in event.headers:
                if name == b"content-length" and int(value) > MAX_BODY_BYTES:
                    raise _HttpError(413, f"request body over {MAX_BODY_BYTES} bytes")
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY_BYTES:
                raise _HttpError(413, f"request body over {MAX_BODY_BYTES} bytes")
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            path, query = _parse_target(request.target)
            return _Request(
                method=request.method.decode("ascii", "replace"),
                path=path,
                query=query,
                body=bytes(body),
            )
        elif isinstance(event, h11.ConnectionClosed):
            if request is None:
                return None
            raise _ClientGone("client closed the connection mid-request")


async def _linger(stream: trio.SocketStream) -> None:
    with trio.move_on_after(_LINGER_TIMEOUT):
        try:
            await stream.send_eof()
            received = 0
            while received < _LINGER_BYTES:
                data = await stream.receive_some(_RECV_SIZE)
                if not data:
                    return
                received += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return


# ---------------------------------------------------------------- /run streaming


class _NdjsonWriter:
    """Writes a /run response line by line; all writes go through here, one at a time."""

    def __init__(
        self,
        conn: h11.Connection,
        stream: trio.abc.Stream,
        run_scope: trio.CancelScope,
        idle_timeout: float,
    ) -> None:
        self._conn = conn
        self._stream = stream
        self._run_scope = run_scope
        self._timeout = idle_timeout
        self._lock = trio.Lock()
        self.started = False
        self.gone = False
        self.finished = False

    async def emit(self, obj: dict[str, object]) -> None:
        line = _ENCODER.encode(obj) + b"\n"
        async with self._lock:
            if self.finished:
                raise StreamClosed("the run has already finished")
            await self._write(line)

    async def finish(self, last: dict[str, object]) -> None:
        line = _ENCODER.encode(last) + b"\n"
        async with self._lock:
            self.finished = True
            await self._write(line)
            await self._push(self._conn.send(h11.EndOfMessage()))

    async def _write(self, line: bytes) -> None:
        if self.gone:
            await self._abort()
        data = b""
        if not self.started:
            self.started = True
            data += self._conn.send(_head(200, _NDJSON, None)) or b""
        data += self._conn.send(h11.Data(data=line)) or b""
        await self._push(data)

    async def _push(self, data: bytes | None) -> None:
        try:
            await _send(self._stream, data, self._timeout)
        except _ClientGone:
            self.gone = True
            await self._abort()

    async def _abort(self) -> None:
        self._run_scope.cancel()
        await trio.lowlevel.checkpoint()
        raise StreamClosed("the client of this run went away")


async def _cancel_on_disconnect(stream: trio.abc.Stream, scope: trio.CancelScope) -> None:
    # The client sends nothing after its request; EOF or a reset means it left.
    try:
        while await stream.receive_some(_RECV_SIZE):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()


# ---------------------------------------------------------------- the server

_Handler = Callable[[_Request, "re.Match[str]"], Awaitable[object]]


class _ApiServer:
    def __init__(self, controller: Controller, idle_timeout: float) -> None:
        self._controller = controller
        self._timeout = idle_timeout
        self._routes: list[tuple[re.Pattern[str], dict[str, _Handler]]] = [
            (re.compile(r"/health"), {"GET": self._health}),
            (re.compile(r"/status"), {"GET": self._status}),
            (re.compile(r"/run"), {"POST": self._streamed}),
            (re.compile(r"/tasks"), {"GET": self._list_tasks, "POST": self._submit_task}),
            (re.compile(r"/tasks/(?P<id>[^/]+)"), {"GET": self._get_task}),
            (re.compile(r"/scale"), {"POST": self._scale}),
            (re.compile(r"/reset"), {"POST": self._reset}),
            (re.compile(r"/agents"), {"POST": self._invoke}),
            (
                re.compile(r"/agents/(?P<name>[^/]+)"),
                {"POST": self._retune, "DELETE": self._destroy},
            ),
            (re.compile(r"/agents/(?P<name>[^/]+)/stop"), {"POST": self._cancel}),
            (re.compile(r"/reload"), {"POST": self._reload}),
            (re.compile(r"/events"), {"GET": self._events}),
            (re.compile(r"/usage"), {"GET": self._usage}),
            (re.compile(r"/down"), {"POST": self._down}),
            (re.compile(r"/openapi\.json"), {"GET": self._openapi}),
        ]

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one connection. Never raises except for cancellation."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        try:
            await self._exchange(conn, stream)
        except _ClientGone as exc:
            logger.debug("api: %s", exc)
            return
        except Exception:
            logger.exception("api: unexpected error while serving a connection")
            return
        await _linger(stream)

    async def _exchange(self, conn: h11.Connection, stream: trio.SocketStream) -> None:
        request: _Request | None = None
        with trio.move_on_after(self._timeout) as read_scope:
            try:
                request = await _read_request(conn, stream, self._timeout)
            except _HttpError as exc:
                await _respond(conn, stream, exc.status, _error_body(exc.message), self._timeout)
                return
        if read_scope.cancelled_caught:
            message = f"request not received within {self._timeout:g} s"
            await _respond(conn, stream, 408, _error_body(message), self._timeout)
            return
        if request is None:
            return
        try:
            handler, match = self._route(request)
        except _HttpError as exc:
            await _respond(
                conn, stream, exc.status, _error_body(exc.message), self._timeout, allow=exc.allow
            )
            return
        if request.path == "/run":
            await self._run(conn, stream, request)
            return
        status, body = await self._call(handler, request, match)
        await _respond(conn, stream, status, body, self._timeout)

    def _route(self, request: _Request) -> tuple[_Handler, re.Match[str]]:
        for pattern, methods in self._routes:
            match = pattern.fullmatch(request.path)
            if match is None:
                continue
            handler = methods.get(request.method)
            if handler is None:
                allow = ", ".join(sorted(methods))
                raise _HttpError(
                    405,
                    f"{request.method} not allowed on {request.path} (use {allow})",
                    allow=allow,
                )
            return handler, match
        raise _HttpError(404, f"no such endpoint: {request.path}")

    async def _call(
        self, handler: _Handler, request: _Request, match: re.Match[str]
    ) -> tuple[int, bytes]:
        """Run a handler and encode its answer; every failure becomes an error answer."""
        try:
            return 200, _ENCODER.encode(await handler(request, match))
        except _HttpError as exc:
            return exc.status, _error_body(exc.message)
        except ControllerError as exc:
            status = exc.status if 400 <= exc.status <= 599 else 500
            return status, _error_body(exc.message)
        except StateUnwritable as exc:
            return 507, _error_body(f"the state disk is {exc.why}: request not served ({exc.path})")
        except Exception as exc:
            logger.exception("api: %s %s failed", request.method, request.path)
            return 500, _error_body(f"internal error: {type(exc).__name__}: {exc}")

    # -- routes

    async def _health(self, request: _Request, match: re.Match[str]) -> object:
        _query(request, frozenset())
        return {"ok": True, "pid": os.getpid()}

    async def _status(self, request: _Request, match: re.Match[str]) -> object:
        query = _query(request, frozenset({"since", "wait"}))
        if "since" not in query:
            return await self._controller.status()
        since = _int_param(query, "since", 0, 0, 2**63 - 1)
        try:
            wait = float(query.get("wait", "10"))
        except ValueError:
            raise _HttpError(400, f"wait: expected seconds, got {query['wait']!r}") from None
        if not 0 <= wait <= _MAX_STATUS_WAIT:
            raise _HttpError(400, f"wait: expected 0..{_MAX_STATUS_WAIT:g} seconds, got {wait:g}")
        return await self._controller.status(since, wait)

    async def _streamed(self, request: _Request, match: re.Match[str]) -> object:
        raise AssertionError("streamed routes are answered by their own method")

    async def _submit_task(self, request: _Request, match: re.Match[str]) -> object:
        _query(request, frozenset())
        body = _decode(_TASK_DECODER, request.body)
        return await self._controller.submit_task(body.role, body.prompt)

    async def _list_tasks(self, request: _Request, match: re.Match[str]) -> object:
        state = _query(request, frozenset({"state"})).get("state") or None
        if state is not None and state not in _TASK_STATES:
            allowed = ", ".join(sorted(_TASK_STATES))
            raise _HttpError(400, f"query parameter state must be one of {allowed}")
        return {"tasks": await self._controller.list_tasks(state)}

    async def _get_task(self, request: _Request, match: re.Match[str]) -> object:
        _query(request, frozenset())
        raw = match.group("id")
        if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
            raise _HttpError(400, f"task id must be a positive integer, not {raw!r}")
        return await self._controller.get_task(int(raw))

    async def _scale(self, request: _Request, match: re.Match[str]) -> object:
        _query(request, frozenset())
        body = _decode(_SCALE_DECODER, request.body)
        return await self._controller.scale(body.role, body.n)

    async def _reset(self, request: _Request, match: re.Match[str]) -> object:
        _query(request, frozenset())
        body = _decode(_RESET_DECODER, request.body)
        return await self._controller.reset(body.name)

    async def _invoke(self, request: _Request, match: re.Match[str]) -> object:
        _query(request, frozenset())
        body = _decode(_INVOKE_DECODER, request.body)
        return await self._controller.invoke(body.role, body.name, body.model)

    async def _retune(self, request: _Request, match: re.Match[str]) -> object:
        _query(request, frozenset())
        body = _decode(_RETUNE_DECODER, request.body)
        if body.model is None and body.persona is None:
            raise _HttpError(400, "give a model, a persona or both")
        return await self._controller.retune(match["name"], model=body.model, persona=body.persona)

    async def _destroy(self, request: _Request, match: re.Match[str]) -> object:
        _query(request, frozenset())
        return await self._controller.destroy(match["name"])

    async def _cancel(self, request: _Request, match: re.Match[str]) -> object:
        _query(request, frozenset())
        _decode(_EMPTY_DECODER, request.body, optional=True)
        return await self._controller.cancel(match["name"], "stopped through the API")

    async def _reload(self, request: _Request, match: re.Match[str]) -> object:
        _query(request, frozenset())
        _decode(_EMPTY_DECODER, request.body, optional=True)
        return await self._controller.reload()

    async def _events(self, request: _Request, match: re.Match[str]) -> object:
        query = _query(request, frozenset({"after", "limit"}))
        after = _int_param(query, "after", 0, 0, 2**63 - 1)
        limit = _int_param(query, "limit", 100, 1, _MAX_EVENTS_LIMIT)
        return {"events": await self._controller.events(after, limit)}

    async def _usage(self, request: _Request, match: re.Match[str]) -> object:
        query = _query(request, frozenset({"by", "since", "key"}))
        by = query.get("by", "agent")
        if by not in USAGE_BY:
            raise _HttpError(400, f"query parameter by must be one of: {', '.join(USAGE_BY)}")
        since = _int_param(query, "since", 0, 0, 2**63 - 1)
        key = query.get("key")
        if key is not None and not 1 <= len(key) <= 200:
            raise _HttpError(400, "query parameter key must be 1 to 200 characters")
        return await self._controller.usage(by, since, key)

    async def _openapi(self, request: _Request, match: re.Match[str]) -> object:
        from fireclaw.supervisor.openapi import document  # built on first use

        _query(request, frozenset())
        return document()

    async def _down(self, request: _Request, match: re.Match[str]) -> object:
        _query(request, frozenset())
        body = _decode(_DOWN_DECODER, request.body, optional=True)
        return await self._controller.down(body.leave_vms)

    # -- /run

    async def _run(
        self, conn: h11.Connection, stream: trio.SocketStream, request: _Request
    ) -> None:
        try:
            _query(request, frozenset())
            body = _decode(_RUN_DECODER, request.body)
        except _HttpError as exc:
            await _respond(conn, stream, exc.status, _error_body(exc.message), self._timeout)
            return

        run_scope = trio.CancelScope()
        writer = _NdjsonWriter(conn, stream, run_scope, self._timeout)
        code: int | None = None
        failure: tuple[int, str] | None = None
        with run_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_disconnect, stream, run_scope)
                try:
                    code = await self._controller.run(
                        body.role, list(body.argv), writer.emit, user=body.user
                    )
                except ControllerError as exc:
                    status = exc.status if 400 <= exc.status <= 599 else 500
                    failure = (status, exc.message)
                except StreamClosed:
                    pass
                except Exception as exc:
                    logger.exception("api: POST /run failed")
                    failure = (500, f"internal error: {type(exc).__name__}: {exc}")
                finally:
                    nursery.cancel_scope.cancel()
        if run_scope.cancelled_caught or writer.gone or (code is None and failure is None):
            raise _ClientGone("client of POST /run went away; the run was cancelled")

        if failure is not None and not writer.started:
            await _respond(conn, stream, failure[0], _error_body(failure[1]), self._timeout)
            return
        last: dict[str, object]
        if failure is not None:
            last = {"error": _one_line(failure[1]) or "error"}
        else:
            last = {"exit": code}
        try:
            await writer.finish(last)
        except StreamClosed as exc:
            raise _ClientGone("client of POST /run went away at the end") from exc


# ---------------------------------------------------------------- socket setup


def _check_replaceable(path: pathlib.Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ApiServerError(f"cannot listen on {path}: it exists and is not a socket")


async def _listen(path: pathlib.Path) -> tuple[trio.socket.SocketType, int]:
    """Bind, chmod 0600 and listen, then move the socket into place atomically.

    Binding a temporary name and renaming it over ``path`` means nobody can ever
    connect to a socket with looser permissions, and a stale socket left by a
    crashed supervisor is replaced in the same step.
    """
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise ApiServerError(f"cannot listen on {path}: path longer than {_SUN_PATH_MAX} bytes")
    _check_replaceable(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    direct = len(os.fsencode(tmp)) > _SUN_PATH_MAX
    target = path if direct else tmp
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        try:
            os.unlink(target)
        except FileNotFoundError:
            pass
        await sock.bind(os.fspath(target))
        os.chmod(target, 0o600)
        sock.listen(128)
        if not direct:
            os.replace(tmp, path)
        inode = os.stat(path).st_ino
    except OSError as exc:
        sock.close()
        if not direct:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
        raise ApiServerError(f"cannot listen on {path}: {reason}") from exc
    return sock, inode


def _unlink_if_ours(path: pathlib.Path, inode: int) -> None:
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass


async def serve_api(
    path: pathlib.Path,
    controller: Controller,
    *,
    idle_timeout: float = IDLE_TIMEOUT,
    task_status: trio.TaskStatus[pathlib.Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control API on a unix socket at ``path`` until cancelled.

    Replaces a stale socket at ``path``, reports ``path`` through ``task_status``
    once it accepts connections, serves each connection in its own task, and
    removes the socket when it stops. Raises ``ApiServerError`` if the socket
    cannot be set up.
    """
    sock, inode = await _listen(path)
    server = _ApiServer(controller, idle_timeout)
    try:
        listener = trio.SocketListener(sock)
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, server.handle, [listener])
            logger.info("api: listening on %s", path)
            task_status.started(path)
    finally:
        _unlink_if_ours(path, inode)
        sock.close()
