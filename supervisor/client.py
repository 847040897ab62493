"""A small synchronous client for the control API (see ``api.py`` for the routes).

It serves the command line, so it is built to start fast: a blocking unix
socket from the standard library framed by h11 (as the server is,
supervisor/api_http.py), and nothing else. The commands that never reach the
daemon do not import this module. One connection per request, as the server
closes every connection after its response. Whoever can
open ``<state_dir>/api.sock`` (mode 0600) controls the swarm: the client adds
nothing to that and needs nothing else.

Exceptions (every message is one line)::

    ApiError              the request failed; ``status`` is the HTTP status when the
    │                     daemon answered with an error, else None
    └── SwarmNotRunning   nothing listens on the socket (missing, or refusing)
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Generator, Iterator, Mapping
from typing import Any

import h11

__all__ = ["DEFAULT_TIMEOUT", "ApiClient", "ApiError", "SwarmNotRunning"]

#: Seconds to wait for an answer to an ordinary request.
DEFAULT_TIMEOUT = 30.0
# A /run output line carries at most one base64-encoded chunk, well below this.
_MAX_LINE = 1024 * 1024
_MAX_HEAD = 16 * 1024
_READ_SIZE = 65536


class ApiError(Exception):
    """A request to the daemon failed; ``str()`` is one line."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(" ".join(message.split()) or "request failed")
        self.status = status


class SwarmNotRunning(ApiError):
    """No daemon listens on the socket."""

    def __init__(self, path: str) -> None:
        super().__init__(
            f"no fireclaw-swarm is running on {path} (start it with `fireclaw-swarm up`)"
        )
        self.path = path


class _BadAnswer(Exception):
    """The daemon's answer is not the HTTP/1.1 it speaks."""


class _Answer:
    """The daemon's answer to one request, read off the socket through h11.

    Made once the response head is in; the body is read as it arrives. A
    malformed answer raises ``_BadAnswer``, a dead or silent socket ``OSError``
    (``TimeoutError`` past the socket's timeout)."""

    def __init__(self, sock: socket.socket, conn: h11.Connection) -> None:
        self._sock = sock
        self._conn = conn
        event = self._next_event()
        while isinstance(event, h11.InformationalResponse):
            event = self._next_event()
        if not isinstance(event, h11.Response):
            raise _BadAnswer("the connection ended before the answer")
        self.status = event.status_code
        self.reason = event.reason.decode("latin-1")

    def _next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            while True:
                event = self._conn.next_event()
                if event is not h11.NEED_DATA:
                    return event
                data = self._sock.recv(_READ_SIZE)
                if not data and self._conn.their_state is h11.SEND_RESPONSE:
                    raise _BadAnswer("the daemon closed the connection without answering")
                self._conn.receive_data(data)
        except h11.RemoteProtocolError as exc:
            if exc.error_status_hint == 431:  # h11's word for a head over the limit
                raise _BadAnswer(f"answer head over {_MAX_HEAD} bytes") from None
            raise _BadAnswer(str(exc)) from None

    def chunks(self) -> Iterator[bytes]:
        """The body, piece by piece as it arrives."""
        while True:
            event = self._next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise _BadAnswer("answer cut short")

    def read(self) -> bytes:
        return b"".join(self.chunks())

    def lines(self, limit: int) -> Iterator[bytes]:
        """The body split into lines (each ending in a newline), as they arrive."""
        pending = b""
        for chunk in self.chunks():
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                yield line + b"\n"
            if len(pending) > limit:
                raise _BadAnswer("an output line over the limit")
        if pending:
            yield pending

    def close(self) -> None:
        self._sock.close()


def _frame(conn: h11.Connection, *events: h11.Event) -> bytes:
    """The bytes that send ``events`` (none of them ConnectionClosed) on ``conn``."""
    return b"".join(conn.send(event) or b"" for event in events)


def _error_message(status: int, reason: str, data: bytes) -> str:
    try:
        payload = json.loads(data)
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), str):
        return str(payload["error"])
    return f"the daemon answered HTTP {status} {reason}".rstrip()


def _lost(exc: BaseException) -> ApiError:
    return ApiError(f"connection to fireclaw-swarm lost: {exc or type(exc).__name__}")


def _no_answer(timeout: float | None) -> ApiError:
    return ApiError(f"no answer from fireclaw-swarm within {timeout or 0:g} s")


class ApiClient:
    """Talks to the daemon listening on the unix socket at ``path``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)

    def get(self, target: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> Any:
        """GET ``target`` and return the parsed JSON answer."""
        return self._call("GET", target, None, timeout)

    def post(
        self,
        target: str,
        body: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> Any:
        """POST ``body`` (JSON) to ``target`` and return the parsed JSON answer."""
        return self._call("POST", target, body, timeout)

    def delete(self, target: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> Any:
        """DELETE ``target`` and return the parsed JSON answer."""
        return self._call("DELETE", target, None, timeout)

    def stream(self, target: str, body: Mapping[str, Any]) -> Generator[dict[str, Any], None, None]:
        """POST ``body`` and yield each line of the ndjson answer as it arrives.

        A line ``{"error": ...}`` raises ApiError. Closing the iterator early
        closes the connection, which cancels the run on the daemon's side. No
        read timeout applies: a command may be silent for as long as it likes.
        """
        resp = self._open("POST", target, body, None)
        try:
            if resp.status != 200:
                raise ApiError(_error_message(resp.status, resp.reason, resp.read()), resp.status)
            for line in resp.lines(_MAX_LINE):
                if not line.endswith(b"\n"):
                    raise ApiError("the daemon sent a truncated or oversized output line")
                try:
                    item = json.loads(line)
                except ValueError:
                    raise ApiError("the daemon sent a line that is not JSON") from None
                if not isinstance(item, dict):
                    raise ApiError("the daemon sent a line that is not a JSON object")
                if "error" in item:
                    raise ApiError(str(item["error"]))
                yield item
        except (_BadAnswer, OSError) as exc:
            raise _lost(exc) from exc
        finally:
            resp.close()

    def _call(
        self, method: str, target: str, body: Mapping[str, Any] | None, timeout: float | None
    ) -> Any:
        resp = self._open(method, target, body, timeout)
        try:
            data = resp.read()
        except TimeoutError as exc:
            raise _no_answer(timeout) from exc
        except (_BadAnswer, OSError) as exc:
            raise _lost(exc) from exc
        finally:
            resp.close()
        if resp.status >= 400:
            raise ApiError(_error_message(resp.status, resp.reason, data), resp.status)
        try:
            return json.loads(data)
        except ValueError:
            raise ApiError("the daemon sent an answer that is not JSON") from None

    def _open(
        self, method: str, target: str, body: Mapping[str, Any] | None, timeout: float | None
    ) -> _Answer:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise SwarmNotRunning(self.path) from exc
        except OSError as exc:
            sock.close()
            raise ApiError(f"cannot connect to {self.path}: {exc.strerror or exc}") from exc
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD)
        headers = [("Host", "localhost"), ("Accept", "application/json")]
        data = b""
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode()
            headers.append(("Content-Type", "application/json"))
        if body is not None or method == "POST":
            headers.append(("Content-Length", str(len(data))))
        request = _frame(
            conn,
            h11.Request(method=method, target=target, headers=headers),
            *([h11.Data(data=data)] if data else []),
            h11.EndOfMessage(),
        )
        try:
            try:
                sock.sendall(request)
            except (BrokenPipeError, ConnectionResetError):
                # The daemon may have refused the request before reading all of it
                # (a body over its limit); its answer is still there to read.
                pass
            return _Answer(sock, conn)
        except TimeoutError as exc:
            sock.close()
            raise _no_answer(timeout) from exc
        except (_BadAnswer, OSError) as exc:
            sock.close()
            raise _lost(exc) from exc
