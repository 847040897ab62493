"""HTTP/1.1 to a Firecracker API socket: one request per connection, framed by h11.

``ApiClient.call(request)`` runs one ``firecracker_api`` request through the
API's order table, sends it and hands the answer back to the table. Bound it
with a cancel scope: connecting retries while Firecracker has not bound its
socket yet.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import Final

import h11
import trio
from fireclaw.pool.drivers import firecracker_api as api

_UNIX_PATH_MAX: Final = 107


async def connect(path: Path) -> trio.SocketStream:
    """Connect to ``path``, retrying while Firecracker has not created it yet.

    A path too long for a socket address is reached through a descriptor of its
    folder (``/proc/self/fd/N/NAME``)."""
    delay = 0.005
    while True:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        folder = -1
        try:
            address = str(path)
            if len(os.fsencode(address)) > _UNIX_PATH_MAX:
                folder = os.open(path.parent, os.O_PATH | os.O_CLOEXEC)
                address = f"/proc/self/fd/{folder}/{path.name}"
            await sock.connect(address)
        except OSError as exc:
            sock.close()
            if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                raise
            # Firecracker binds its socket within milliseconds of starting; every
            # VM start waits on this, so look often.
            await trio.sleep(delay)
            delay = min(delay * 2, 0.02)
            continue
        finally:
            if folder >= 0:
                os.close(folder)
        return trio.SocketStream(sock)


async def exchange(stream: trio.abc.Stream, request: api.Request) -> tuple[int, bytes]:
    """Send ``request`` and read the answer: (status, body). h11 frames both ways."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=api.MAX_RESPONSE_BYTES)
    headers = [("Host", "localhost"), ("Accept", "application/json")]
    if request.body:
        headers += [("Content-Type", "application/json")]
    headers += [("Content-Length", str(len(request.body)))]
    out = [conn.send(h11.Request(method=request.method, target=request.path, headers=headers))]
    if request.body:
        out.append(conn.send(h11.Data(data=request.body)))
    out.append(conn.send(h11.EndOfMessage()))
    await stream.send_all(b"".join(part for part in out if part))
    status, body = 0, bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(bytes(data))
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > api.MAX_RESPONSE_BYTES:
                raise h11.RemoteProtocolError("answer too long")
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            if not status:
                raise h11.RemoteProtocolError("connection closed before an answer")
            return status, bytes(body)


class ApiClient:
    """Calls to one Firecracker's API socket, in the order ``FirecrackerApi`` keeps."""

    def __init__(self, socket_path: Path, phase: api.Phase = api.Phase.FRESH) -> None:
        self.socket_path = socket_path
        self.api = api.FirecrackerApi(phase)

    async def call(self, request: api.Request) -> bytes:
        """The answer's body; OutOfOrder (not sent), ApiFault, or ApiError (no answer)."""
        self.api.prepare(request)
        try:
            stream = await connect(self.socket_path)
            async with stream:
                status, body = await exchange(stream, request)
        except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
            self.api.abandon()
            raise api.ApiError(f"{request.method} {request.path}: {exc}") from exc
        except BaseException:
            self.api.abandon()
            raise
        return self.api.receive(status, body)
