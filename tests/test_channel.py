"""The framed control channel (a port's) and attaching to a guest on it, over
in-memory streams and a fake clock; the real port is test_qemu's."""

from __future__ import annotations

import struct

import pytest
import trio
import trio.testing
from fireclaw.config import ControlSpec
from fireclaw.guest_daemon import protocol as p
from fireclaw.guest_daemon.channel import (
    ChannelClosed,
    FramedChannel,
    FrameDecoder,
    FrameTooLarge,
    frame,
)
from fireclaw.pool.channel import attach
from fireclaw.pool.control import STALE_BEATS, ConnectionLost, GuestViolation

SPEC = ControlSpec(max_message_bytes=4096)
TOKEN = "t" * 24


def test_frames_come_out_whole_however_the_bytes_are_cut() -> None:
    wire = frame(b"hello") + frame(b"") + frame(b"x" * 300)
    for cut in (1, 3, 7, len(wire)):
        decoder = FrameDecoder(max_frame=1024)
        got = []
        for start in range(0, len(wire), cut):
            decoder.feed(wire[start : start + cut])
            while (message := decoder.next()) is not None:
                got.append(message)
        assert got == [b"hello", b"", b"x" * 300], cut
        assert decoder.pending == 0


def test_a_frame_over_the_limit_is_refused_from_its_length_alone() -> None:
    decoder = FrameDecoder(max_frame=1024)
    decoder.feed(struct.pack(">I", 1025))  # no body needed to know
    with pytest.raises(FrameTooLarge, match="frame of 1025 bytes exceeds 1024"):
        decoder.next()


async def test_messages_both_ways_and_senders_never_interleave(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = trio.testing.memory_stream_pair()
    left, right = FramedChannel(a, 1 << 16), FramedChannel(b, 1 << 16)
    big = [bytes([n]) * 20000 for n in range(4)]
    async with trio.open_nursery() as nursery:
        for message in big:
            nursery.start_soon(left.send_message, message)
        got = {await right.get_message() for _ in big}
    assert got == set(big)
    await right.send_message(b"back")
    assert await left.get_message() == b"back"


async def test_the_end_of_the_stream_ends_the_channel_and_says_what_was_cut(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = trio.testing.memory_stream_pair()
    reader = FramedChannel(b, 1024)
    await a.send_all(frame(b"whole") + frame(b"cut short")[:6])
    await a.aclose()
    assert await reader.get_message() == b"whole"
    with pytest.raises(ChannelClosed, match=r"end of stream \(6 bytes of a frame cut\)"):
        await reader.get_message()
    with pytest.raises(ChannelClosed):  # and stays ended
        await reader.send_message(b"x")


async def test_too_large_is_a_breach_and_a_port_outlives_a_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = trio.testing.memory_stream_pair()
    await a.send_all(struct.pack(">I", 5000))
    with pytest.raises(ChannelClosed) as caught:
        await FramedChannel(b, 4096).get_message()
    assert caught.value.too_large
    # The guest's side of a port: closing a session's channel leaves the stream open.
    c, d = trio.testing.memory_stream_pair()
    port = FramedChannel(d, 1024, owns_stream=False)
    await port.aclose()
    await c.send_all(frame(b"next host"))
    assert await port.get_message() == b"next host"


async def _guest(stream: trio.abc.Stream, *, beats: int, hello: p.GuestMessage) -> p.HostMessage:
    """A guest on a port: reads the host's Attach, says what it said to the last
    host (``beats`` heartbeats), then ``hello``; the host's answer."""
    channel = FramedChannel(stream, 1 << 16)
    attach_msg = p.decode_host(await channel.get_message())
    assert isinstance(attach_msg, p.Attach) and len(attach_msg.entropy) == 64
    for seq in range(beats):
        await channel.send_message(p.encode(p.Heartbeat(seq=seq)))
    await channel.send_message(p.encode(hello))
    return p.decode_host(await channel.get_message())


async def test_attach_passes_over_a_restored_guest_s_stale_beats(
    autojump_clock: trio.testing.MockClock,
) -> None:
    host_end, guest_end = trio.testing.memory_stream_pair()
    hello = p.Hello(vm_id="w-0", token=TOKEN, version=p.PROTOCOL_VERSION, dials=1)
    answers: list[p.HostMessage] = []

    async def guest() -> None:
        answers.append(await _guest(guest_end, beats=3, hello=hello))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(guest)
        session = await attach(host_end, vm_id="w-0", token=TOKEN, spec=SPEC, hostname="w-0")
    assert session.hello == hello
    assert isinstance(answers[0], p.Welcome) and answers[0].hostname == "w-0"


async def test_attach_refuses_more_than_stale_beats_and_a_closed_port(
    autojump_clock: trio.testing.MockClock,
) -> None:
    host_end, guest_end = trio.testing.memory_stream_pair()
    hello = p.Hello(vm_id="w-0", token=TOKEN, version=p.PROTOCOL_VERSION)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _guest(guest_end, beats=STALE_BEATS + 1, hello=hello))
        with pytest.raises(GuestViolation, match="first message was Heartbeat"):
            await attach(host_end, vm_id="w-0", token=TOKEN, spec=SPEC)
        nursery.cancel_scope.cancel()
    # The VMM gone: its port closed before the guest said anything.
    host_end, guest_end = trio.testing.memory_stream_pair()
    await guest_end.aclose()
    with pytest.raises(ConnectionLost, match="control (port|connection) closed"):
        await attach(host_end, vm_id="w-0", token=TOKEN, spec=SPEC)
