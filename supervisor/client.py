"""A small synchronous client for the control API (see ``api.py`` for the routes).

It uses the standard library only (socket, http.client, json) so that the CLI,
which is all it serves, starts fast. One connection per request, as the server
closes every connection after its response.

Exceptions (every message is one line)::

    ApiError              the request failed; ``status`` is the HTTP status when the
    │                     daemon answered with an error, else None
    └── SwarmNotRunning   nothing listens on the socket (missing, or refusing)
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Generator, Mapping
from typing import Any

__all__ = ["DEFAULT_TIMEOUT", "ApiClient", "ApiError", "SwarmNotRunning"]

#: Seconds to wait for an answer to an ordinary request.
DEFAULT_TIMEOUT = 30.0
# A /run output line carries at most one base64-encoded chunk, well below this.
_MAX_LINE = 1024 * 1024


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


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


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

    def stream(self, target: str, body: Mapping[str, Any]) -> Generator[dict[str, Any], None, None]:
        """POST ``body`` and yield each line of the ndjson answer as it arrives.

        A line ``{"error": ...}`` raises ApiError. Closing the iterator early
        closes the connection, which cancels the run on the daemon's side. No
        read timeout applies: a command may be silent for as long as it likes.
        """
        conn, resp = self._open("POST", target, body, None)
        try:
            if resp.status != 200:
                raise ApiError(_error_message(resp.status, resp.reason, resp.read()), resp.status)
            while True:
                line = resp.readline(_MAX_LINE)
                if not line:
                    return
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
        except (http.client.HTTPException, OSError) as exc:
            raise _lost(exc) from exc
        finally:
            conn.close()

    def _call(
        self, method: str, target: str, body: Mapping[str, Any] | None, timeout: float | None
    ) -> Any:
        conn, resp = self._open(method, target, body, timeout)
        try:
            data = resp.read()
        except TimeoutError as exc:
            raise _no_answer(timeout) from exc
        except (http.client.HTTPException, OSError) as exc:
            raise _lost(exc) from exc
        finally:
            conn.close()
        if resp.status >= 400:
            raise ApiError(_error_message(resp.status, resp.reason, data), resp.status)
        try:
            return json.loads(data)
        except ValueError:
            raise ApiError("the daemon sent an answer that is not JSON") from None

    def _open(
        self, method: str, target: str, body: Mapping[str, Any] | None, timeout: float | None
    ) -> tuple[_UnixConnection, http.client.HTTPResponse]:
        conn = _UnixConnection(self.path, timeout)
        try:
            conn.connect()
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise SwarmNotRunning(self.path) from exc
        except OSError as exc:
            raise ApiError(f"cannot connect to {self.path}: {exc.strerror or exc}") from exc
        headers = {"Accept": "application/json"}
        data: bytes | None = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        try:
            try:
                conn.request(method, target, body=data, headers=headers)
            except (BrokenPipeError, ConnectionResetError):
                # The daemon may have refused the request before reading all of it
                # (a body over its limit); its answer is still there to read.
                pass
            return conn, conn.getresponse()
        except TimeoutError as exc:
            conn.close()
            raise _no_answer(timeout) from exc
        except (http.client.HTTPException, OSError) as exc:
            conn.close()
            raise _lost(exc) from exc
