"""How the host reaches a VM's guest daemon and opens a control session with it.

Two ways, as the driver says (``DriverInfo.channel``):

* dialled (``accept_dialled``): the guest dials a WebSocket to the listener
  the supervisor opened in the VM's namespace; the host accepts it, reads
  Hello, answers Welcome.
* a channel device (``attach``): the driver hands over the host's end of the
  guest's port (``VmHandle.open_channel``); the host says Attach, reads Hello
  (passing over the heartbeats a restored guest sent its template's host),
  answers Welcome. Nothing is dialled: a restored clone is served the moment
  it runs, and the port's EOF is the VMM's end, seen at once.

Either way the result is a ``ControlSession``; its errors are ``control``'s.
"""

from __future__ import annotations

import os

import trio
import trio_websocket
from fireclaw.config import ControlSpec
from fireclaw.guest_daemon import protocol as p
from fireclaw.guest_daemon.channel import ChannelClosed, FramedChannel, WsChannel
from fireclaw.pool.control import STALE_BEATS, ConnectionLost, ControlSession, GuestViolation

__all__ = ["accept_dialled", "attach"]


async def attach(
    stream: trio.abc.Stream, *, vm_id: str, token: str, spec: ControlSpec, hostname: str = ""
) -> ControlSession:
    """Open a session on ``stream``, the host's end of a guest's port: Attach (fresh
    entropy, mixed in by the guest before anything else), then its Hello, then
    Welcome. ConnectionLost when the port closes first (the VMM is gone)."""
    channel = FramedChannel(stream, spec.max_message_bytes)
    try:
        await channel.send_message(p.encode(p.Attach(entropy=os.urandom(64))))
    except ChannelClosed as exc:
        raise ConnectionLost(f"control port closed ({exc.reason})") from None
    return await ControlSession.handshake(
        channel, vm_id=vm_id, token=token, spec=spec, hostname=hostname, stale_beats=STALE_BEATS
    )


async def accept_dialled(
    nursery: trio.Nursery,
    listener: trio.SocketListener,
    *,
    vm_id: str,
    token: str,
    spec: ControlSpec,
    hostname: str = "",
) -> ControlSession:
    """Accept the guest's WebSocket on ``listener`` (its connection runs in
    ``nursery``) and open a session on it."""
    stream = await listener.accept()
    try:
        request = await trio_websocket.wrap_server_stream(
            nursery, stream, max_message_size=spec.max_message_bytes
        )
        ws = await request.accept()
    except (trio_websocket.HandshakeError, trio.BrokenResourceError, OSError) as exc:
        await stream.aclose()
        raise GuestViolation(f"bad WebSocket handshake: {exc}") from None
    except trio_websocket.ConnectionClosed as exc:
        raise GuestViolation(f"connection closed during the handshake: {exc}") from None
    return await ControlSession.handshake(
        WsChannel(ws), vm_id=vm_id, token=token, spec=spec, hostname=hostname
    )
