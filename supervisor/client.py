"""A small synchronous client for the control API (see ``api.py`` for the routes).

It serves the command line, which must start fast, so it uses the standard
library only (socket, json) and reads the daemon's answers itself. Neither HTTP
library would do here: h11 (which the server uses) imports dataclasses and with
it inspect and ast, and http.client the email package and ssl; either one took
as long to import as the rest of a ``run`` command's start together (about
20 ms of CPU on the development machine). The answers to read are the ones
supervisor/api_http.py writes: HTTP/1.1, ``Connection: close``, a
``Content-Length`` or a chunked body; anything else is refused as a lost
connection. One connection per request, as the server closes every connection
after its response. Whoever can open ``<state_dir>/api.sock`` (mode 0600)
controls the swarm: the client adds nothing to that and needs nothing else.

Exceptions (every message is one line)::

    ApiError              the request failed; ``status`` is the HTTP status when the
    │                     daemon answered with an error, else None
    └── SwarmNotRunning   nothing listens on the socket (missing, or refusing)
"""

from __future__ import annotations

import json
import os
import socket

# Names for the type checker alone: importing ``typing`` costs a command's start
# a few milliseconds (tests/test_cli_startup.py keeps it off the run path).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Generator, Iterator, Mapping
    from typing import Any

__all__ = ["DEFAULT_TIMEOUT", "ApiClient", "ApiError", "SwarmNotRunning"]

#: Seconds to wait for an answer to an ordinary request.
DEFAULT_TIMEOUT = 30.0
# A /run output line carries at most one base64-encoded chunk, well below this.
_MAX_LINE = 1024 * 1024
_MAX_HEAD = 16 * 1024
_HEX_DIGITS = b"0123456789abcdefABCDEF"


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


class _Response:
    """An HTTP/1.1 answer read straight off the socket: its head at once (at most
    ``_MAX_HEAD`` bytes), its body as it arrives. A malformed answer raises
    ``_BadAnswer``, a dead or silent socket ``OSError`` (``TimeoutError`` past
    the socket's timeout)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._file = sock.makefile("rb")
        line = self._file.readline(_MAX_HEAD)
        if not line:
            raise _BadAnswer("the daemon closed the connection without answering")
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise _BadAnswer(f"bad status line {line[:60]!r}")
        self.status = int(parts[1])
        self.reason = parts[2].strip().decode("latin-1") if len(parts) > 2 else ""
        self._headers: dict[str, str] = {}
        size = len(line)
        while True:
            line = self._file.readline(_MAX_HEAD)
            size += len(line)
            if size > _MAX_HEAD or not line.endswith(b"\n"):
                raise _BadAnswer("answer head too long or cut short")
            if line in (b"\r\n", b"\n"):
                break
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                raise _BadAnswer(f"bad header line {line[:60]!r}")
            self._headers[name.strip().lower()] = value.strip()

    def chunks(self) -> Iterator[bytes]:
        """The body, piece by piece as it arrives."""
        if self._headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = self._file.readline(_MAX_HEAD)
                digits = size_line.split(b";", 1)[0].strip()
                if not size_line:
                    raise _BadAnswer("answer cut short")
                if not digits or digits.strip(_HEX_DIGITS):
                    raise _BadAnswer(f"bad chunk size {size_line[:20]!r}")
                size = int(digits, 16)
                if size == 0:
                    return
                data = self._file.read(size + 2)
                if len(data) != size + 2:
                    raise _BadAnswer("answer cut short")
                if not data.endswith(b"\r\n"):
                    raise _BadAnswer("a chunk longer than its size")
                yield data[:-2]
        elif "content-length" in self._headers:
            if not self._headers["content-length"].isdigit():
                raise _BadAnswer(f"bad Content-Length {self._headers['content-length'][:20]!r}")
            length = int(self._headers["content-length"])
            data = self._file.read(length)
            if len(data) != length:
                raise _BadAnswer("answer cut short")
            yield data
        else:
            while data := self._file.read1(65536):
                yield data

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
        self._file.close()
        self._sock.close()


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
    ) -> _Response:
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
        data = b""
        head = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode()
            head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        elif method == "POST":
            head += "Content-Length: 0\r\n"
        try:
            try:
                sock.sendall(head.encode() + b"\r\n" + data)
            except (BrokenPipeError, ConnectionResetError):
                # The daemon may have refused the request before reading all of it
                # (a body over its limit); its answer is still there to read.
                pass
            return _Response(sock)
        except TimeoutError as exc:
            sock.close()
            raise _no_answer(timeout) from exc
        except (_BadAnswer, OSError) as exc:
            sock.close()
            raise _lost(exc) from exc
