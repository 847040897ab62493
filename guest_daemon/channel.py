"""The control channel under the protocol: whole messages over some connection.

Two carriers, one interface (``Channel``: ``get_message``, ``send_message``,
``aclose``; ``ChannelClosed`` once it is over):

* ``WsChannel``: a WebSocket the guest dialled (the process driver, and any
  VM reaching its supervisor over the network).
* ``FramedChannel``: length-prefixed frames over a byte stream that the host
  connects to and the guest keeps open: a virtio-serial port (``port.py``).
  Each frame is a 4-byte big-endian length, then that many bytes.

Why not WebSocket over the port too: a WebSocket is one connection from its
opening handshake to its close, and its state (the handshake done, the
masking side) lives in both ends. A port outlives its host end: a VM restored
from a snapshot carries on reading the same port while a different host, a
new QEMU's, is on the other side. What WebSocket would add on a local,
reliable, ordered port is framing and a size cap, which four bytes of length
give; a close code, which ``Goodbye`` and the EOF of the host end give.

``FrameDecoder`` is the sans-I/O part: bytes in, frames out.

This module imports only trio and trio-websocket: it ships inside VM images.
"""

from __future__ import annotations

import struct
from typing import Final, Protocol

import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection

__all__ = [
    "Channel",
    "ChannelClosed",
    "FrameDecoder",
    "FrameTooLarge",
    "FramedChannel",
    "WsChannel",
    "frame",
]

#: The length prefix: big-endian, unsigned, 32 bits.
_HEADER: Final = struct.Struct(">I")
#: WebSocket close code of a frame over the receiver's limit (RFC 6455).
_TOO_BIG: Final = 1009
_READ_SIZE: Final = 1 << 16


class ChannelClosed(Exception):
    """The channel is over; ``reason`` says why in one line. ``too_large``: because
    the peer sent a message over the limit (a breach, not a mishap)."""

    def __init__(self, reason: str, *, too_large: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.too_large = too_large


class FrameTooLarge(Exception):
    """A frame's length prefix is over the limit."""


class Channel(Protocol):
    async def get_message(self) -> bytes | str:
        """The next whole message; ChannelClosed when there is none any more."""
        ...

    async def send_message(self, message: bytes) -> None:
        """Send one whole message (safe from several tasks); ChannelClosed if over."""
        ...

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """End the channel (``code`` is a WebSocket close code; a port has none)."""
        ...


def frame(message: bytes) -> bytes:
    """``message`` with its length prefix."""
    return _HEADER.pack(len(message)) + message


class FrameDecoder:
    """Bytes in (``feed``), whole frames out (``next``). Sans-I/O."""

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray) -> None:
        self._buffer += data

    def next(self) -> bytes | None:
        """The next whole frame, or None until more bytes are fed.

        FrameTooLarge when the next frame says it is over ``max_frame``: the
        stream is unusable after that (there is no way to find the next frame)."""
        if len(self._buffer) < _HEADER.size:
            return None
        (length,) = _HEADER.unpack_from(self._buffer)
        if length > self.max_frame:
            raise FrameTooLarge(f"frame of {length} bytes exceeds {self.max_frame}")
        end = _HEADER.size + length
        if len(self._buffer) < end:
            return None
        message = bytes(self._buffer[_HEADER.size : end])
        del self._buffer[:end]
        return message

    @property
    def pending(self) -> int:
        """Bytes fed and not yet returned as a frame."""
        return len(self._buffer)


class FramedChannel:
    """Length-prefixed frames over ``stream``.

    ``owns_stream``: whether ``aclose`` closes the stream (and ends the
    channel). The guest's side of a port does not: ``aclose`` is then a no-op,
    the next session goes on on the same frames, and only a ``b""`` read (the
    host end went away) ends the channel; a new ``FramedChannel`` (a fresh
    decoder) starts over on the port when the next host is there."""

    def __init__(self, stream: trio.abc.Stream, max_frame: int, *, owns_stream: bool = True):
        self._stream = stream
        self._decoder = FrameDecoder(max_frame)
        self._owns = owns_stream
        self._send_lock = trio.Lock()
        self._closed: str | None = None

    async def get_message(self) -> bytes:
        while True:
            if self._closed is not None:
                raise ChannelClosed(self._closed)
            try:
                message = self._decoder.next()
            except FrameTooLarge as exc:
                self._closed = str(exc)
                raise ChannelClosed(str(exc), too_large=True) from None
            if message is not None:
                return message
            try:
                data = await self._stream.receive_some(_READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._closed = f"read failed: {exc or type(exc).__name__}"
                continue
            if not data:
                cut = (
                    f" ({self._decoder.pending} bytes of a frame cut)"
                    if self._decoder.pending
                    else ""
                )
                self._closed = f"end of stream{cut}"
                continue
            self._decoder.feed(data)

    async def send_message(self, message: bytes) -> None:
        async with self._send_lock:
            if self._closed is not None:
                raise ChannelClosed(self._closed)
            try:
                await self._stream.send_all(frame(message))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._closed = f"write failed: {exc or type(exc).__name__}"
                raise ChannelClosed(self._closed) from None

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        if not self._owns:
            return
        if self._closed is None:
            self._closed = f"closed here{': ' + reason if reason else ''}"
        await self._stream.aclose()


class WsChannel:
    """A WebSocket as a ``Channel``: its ConnectionClosed becomes ChannelClosed."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws

    async def get_message(self) -> bytes | str:
        try:
            return await self.ws.get_message()
        except ConnectionClosed as exc:
            raise _closed(exc) from None

    async def send_message(self, message: bytes) -> None:
        try:
            await self.ws.send_message(message)
        except ConnectionClosed as exc:
            raise _closed(exc) from None

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        await self.ws.aclose(code, reason)


def _closed(exc: ConnectionClosed) -> ChannelClosed:
    reason: CloseReason | None = exc.reason
    if reason is None:
        return ChannelClosed("no close reason")
    text = f"{reason.code} {reason.name}" + (f": {reason.reason}" if reason.reason else "")
    return ChannelClosed(text, too_large=reason.code == _TOO_BIG)
