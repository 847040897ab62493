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

__all__ = ["accept_dialled", "answer_hello", "attach", "say_attach"]


async def attach(
    stream: trio.abc.Stream, *, vm_id: str, token: str, spec: ControlSpec, hostname: str = ""
) -> ControlSession:
    """Open a session on ``stream``, the host's end of a guest's port: ``say_attach``,
    then ``answer_hello``."""
    channel = await say_attach(stream, spec)
    return await answer_hello(channel, vm_id=vm_id, token=token, spec=spec, hostname=hostname)


async def say_attach(stream: trio.abc.Stream, spec: ControlSpec) -> FramedChannel:
    """Say Attach on ``stream`` (fresh entropy, mixed in by the guest before anything
    else); the channel it is on. Said as soon as the VM runs, the guest gets to
    its Hello while the host makes the rest of the VM ready. ConnectionLost when
    the port is closed (the VMM is gone)."""
    channel = FramedChannel(stream, spec.max_message_bytes)
    try:
        await channel.send_message(p.encode(p.Attach(entropy=os.urandom(64))))
    except ChannelClosed as exc:
        raise ConnectionLost(f"control port closed ({exc.reason})") from None
    return channel


async def answer_hello(
    channel: FramedChannel, *, vm_id: str, token: str, spec: ControlSpec, hostname: str = ""
) -> ControlSession:
    """Read the Hello that answers the Attach said on ``channel`` (passing over the
    heartbeats a restored guest sent its template's host) and answer Welcome.
    ConnectionLost when the port closes first (the VMM is gone)."""
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
