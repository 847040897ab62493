"""HTTP/1.1 framing for the control API: h11 over a unix socket.

The routes (supervisor/api.py) see a request as a ``Request`` (method, path, query,
body) and answer with a status and a JSON body; everything between that and the
bytes on the socket lives here: reading one request within the idle timeout and
the size limits, writing a ``Connection: close`` answer, the chunked ndjson
writer of ``POST /run``, lingering after the answer, and setting up the socket
itself (mode 0600, moved into place atomically, removed only if still ours).

Exceptions::

    HttpError           the request is refused before it reaches a route (status + one line)
    ClientGone          the client closed, reset or stopped reading: nothing more can be sent
    StreamClosed        emit() after the /run client went away, from outside the run's scope
    ApiServerError      the socket cannot be set up
"""

from __future__ import annotations

import errno
import http
import os
import pathlib
import stat
import urllib.parse
from typing import Final

import h11
import msgspec
import trio
from fireclaw.guest_daemon.lines import one_line

__all__ = [
    "IDLE_TIMEOUT",
    "MAX_BODY_BYTES",
    "MAX_HEAD_BYTES",
    "ApiServerError",
    "ClientGone",
    "HttpError",
    "NdjsonWriter",
    "Request",
    "StreamClosed",
    "cancel_on_disconnect",
    "error_body",
    "linger",
    "listen",
    "one_line",
    "read_request",
    "respond",
    "unlink_if_ours",
]

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
_ENCODER: Final = msgspec.json.Encoder()


class HttpError(Exception):
    """A request refused with ``status`` and the one-line ``message`` (and ``Allow`` on 405)."""

    def __init__(self, status: int, message: str, *, allow: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.allow = allow


class ClientGone(Exception):
    """The client closed, reset, or stopped reading: nothing more can be sent."""


class StreamClosed(Exception):
    """``emit`` was called after the /run client went away (and outside the run's scope)."""


class ApiServerError(Exception):
    """The API socket cannot be set up; the message is one line naming the path."""


class Request(msgspec.Struct, frozen=True, kw_only=True):
    """One request as the routes see it: the path unquoted, the query parsed."""

    method: str
    path: str
    query: dict[str, str]
    body: bytes


def error_body(message: str) -> bytes:
    """The JSON body of an error answer: ``{"error": "<one line>"}``."""
    return _ENCODER.encode({"error": one_line(message) or "error"})


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def _parse_target(target: bytes) -> tuple[str, dict[str, str]]:
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "request target is not ASCII") from None
    split = urllib.parse.urlsplit(text)
    query: dict[str, str] = {}
    try:
        pairs = urllib.parse.parse_qsl(
            split.query, keep_blank_values=True, strict_parsing=False, max_num_fields=16
        )
    except ValueError:
        raise HttpError(400, "too many query parameters") from None
    for key, value in pairs:
        if key in query:
            raise HttpError(400, f"query parameter {key!r} given twice")
        query[key] = value
    return urllib.parse.unquote(split.path), query


async def _send(stream: trio.abc.Stream, data: bytes | None, idle_timeout: float) -> None:
    if not data:
        return
    with trio.move_on_after(idle_timeout) as scope:
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ClientGone("client closed the connection") from exc
    if scope.cancelled_caught:
        raise ClientGone("client stopped reading")


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


async def respond(
    conn: h11.Connection,
    stream: trio.abc.Stream,
    status: int,
    body: bytes,
    idle_timeout: float,
    *,
    allow: str | None = None,
) -> None:
    """Send a whole JSON answer (``body`` and a newline) with ``Connection: close``."""
    data = conn.send(_head(status, "application/json", len(body) + 1, allow=allow)) or b""
    data += conn.send(h11.Data(data=body + b"\n")) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await _send(stream, data, idle_timeout)


async def read_request(
    conn: h11.Connection, stream: trio.abc.Stream, idle_timeout: float
) -> Request | None:
    """Read one request; ``None`` if the client closed without sending one."""
    request: h11.Request | None = None
    body = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise HttpError(exc.error_status_hint, f"bad request: {exc}") from exc
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
                raise ClientGone("client reset the connection") from exc
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
                raise HttpError(431, f"request head over {MAX_HEAD_BYTES} bytes")
            for name, value in event.headers:
                if name == b"content-length" and int(value) > MAX_BODY_BYTES:
                    raise HttpError(413, f"request body over {MAX_BODY_BYTES} bytes")
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY_BYTES:
                raise HttpError(413, f"request body over {MAX_BODY_BYTES} bytes")
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            path, query = _parse_target(request.target)
            return Request(
                method=request.method.decode("ascii", "replace"),
                path=path,
                query=query,
                body=bytes(body),
            )
        elif isinstance(event, h11.ConnectionClosed):
            if request is None:
                return None
            raise ClientGone("client closed the connection mid-request")


async def linger(stream: trio.SocketStream) -> None:
    """Half-close, then read and drop what the client still sends, for a bounded time."""
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


class NdjsonWriter:
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
        except ClientGone:
            self.gone = True
            await self._abort()

    async def _abort(self) -> None:
        self._run_scope.cancel()
        await trio.lowlevel.checkpoint()
        raise StreamClosed("the client of this run went away")


async def cancel_on_disconnect(stream: trio.abc.Stream, scope: trio.CancelScope) -> None:
    """Cancel ``scope`` once the client's end reaches EOF or breaks."""
    # The client sends nothing after its request; EOF or a reset means it left.
    try:
        while await stream.receive_some(_RECV_SIZE):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()


# ---------------------------------------------------------------- socket setup


def _check_replaceable(path: pathlib.Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ApiServerError(f"cannot listen on {path}: it exists and is not a socket")


async def listen(path: pathlib.Path) -> tuple[trio.socket.SocketType, int]:
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


def unlink_if_ours(path: pathlib.Path, inode: int) -> None:
    """Remove the socket at ``path`` unless another server has replaced it since."""
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass
