"""The host side of the control channel, over in-memory streams and a fake clock."""

from __future__ import annotations

import msgspec
import pytest
import trio
import trio.testing
import trio_websocket
from fireclaw.config import ControlSpec
from fireclaw.guest_daemon import protocol as p
from fireclaw.guest_daemon.channel import WsChannel
from fireclaw.guest_daemon.pacing import TokenBucket
from fireclaw.pool.control import (
    ConnectionLost,
    ControlSession,
    GuestViolation,
    HeartbeatMissed,
)

SPEC = ControlSpec(
    heartbeat_interval=1.0,
    heartbeat_timeout=5.0,
    max_message_bytes=4096,
    max_messages_per_second=20.0,
    promote_timeout=3.0,
)
TOKEN = "t" * 24


async def pair(
    nursery: trio.Nursery,
) -> tuple[trio_websocket.WebSocketConnection, trio_websocket.WebSocketConnection]:
    client_stream, server_stream = trio.testing.memory_stream_pair()

    async def server() -> trio_websocket.WebSocketConnection:
        req = await trio_websocket.wrap_server_stream(
            nursery, server_stream, max_message_size=SPEC.max_message_bytes
        )
        return await req.accept()

    send, recv = trio.open_memory_channel[trio_websocket.WebSocketConnection](1)

    async def serve() -> None:
        await send.send(await server())

    nursery.start_soon(serve)
    guest = await trio_websocket.wrap_client_stream(nursery, client_stream, "vm", "/")
    host = await recv.receive()
    return host, guest


async def connected(
    nursery: trio.Nursery,
) -> tuple[ControlSession, trio_websocket.WebSocketConnection]:
    host, guest = await pair(nursery)
    await guest.send_message(
        p.encode(p.Hello(vm_id="w-0", token=TOKEN, version=p.PROTOCOL_VERSION))
    )
    session = await ControlSession.handshake(WsChannel(host), vm_id="w-0", token=TOKEN, spec=SPEC)
    welcome = p.decode_host(await guest.get_message())
    assert isinstance(welcome, p.Welcome) and welcome.heartbeat_interval == 1.0
    return session, guest


async def test_wrong_token_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        host, guest = await pair(nursery)
        await guest.send_message(
            p.encode(p.Hello(vm_id="w-0", token="x" * 24, version=p.PROTOCOL_VERSION))
        )
        with pytest.raises(GuestViolation, match="wrong identity or token"):
            await ControlSession.handshake(WsChannel(host), vm_id="w-0", token=TOKEN, spec=SPEC)
        nursery.cancel_scope.cancel()


async def test_heartbeat_missed_exactly_after_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        session, guest = await connected(nursery)
        start = trio.current_time()
        for _ in range(3):  # heartbeats keep it alive
            await trio.sleep(1.0)
            await guest.send_message(p.encode(p.Heartbeat(seq=1)))
        with pytest.raises(HeartbeatMissed):
            await session.serve()
        # Last heartbeat at start+3, the timeout is 5 s.
        assert trio.current_time() - start == pytest.approx(8.0)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (b"\xc1garbage", "undecodable"),
        ("text frame", "text frame"),
        (p.encode(p.Output(req=99, stream="stdout", data=b"x")), "unknown request"),
        (b"\x81\xa4type\xa6launch", "invalid message"),
        (b"x" * 5000, "too large"),
    ],
)
async def test_hostile_frames_end_the_session(
    autojump_clock: trio.testing.MockClock, frame: bytes | str, match: str
) -> None:
    async with trio.open_nursery() as nursery:
        session, guest = await connected(nursery)
        await guest.send_message(frame)
        with pytest.raises(GuestViolation, match=match):
            await session.serve()
        nursery.cancel_scope.cancel()


async def test_flooding_is_a_violation(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        session, guest = await connected(nursery)
        for i in range(25):  # no time passes: more than 20 per second
            await guest.send_message(p.encode(p.Heartbeat(seq=i)))
        with pytest.raises(GuestViolation, match="messages per second"):
            await session.serve()
        nursery.cancel_scope.cancel()


async def test_run_yields_the_output_then_the_exit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        session, guest = await connected(nursery)
        nursery.start_soon(session.serve)

        async def guest_side() -> None:
            run = p.decode_host(await guest.get_message())
            assert isinstance(run, p.Run) and run.argv == ["echo", "hi"]
            await guest.send_message(p.encode(p.Output(req=run.req, stream="stdout", data=b"hi\n")))
            await guest.send_message(p.encode(p.Exited(req=run.req, code=3)))

        nursery.start_soon(guest_side)
        got = [msg async for msg in session.run(["echo", "hi"])]
        assert got == [
            p.Output(req=1, stream="stdout", data=b"hi\n"),
            p.Exited(req=1, code=3),
        ]
        nursery.cancel_scope.cancel()


async def test_a_lost_guest_fails_the_pending_run(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        session, guest = await connected(nursery)

        async def serve() -> None:
            with pytest.raises(ConnectionLost):
                await session.serve()

        nursery.start_soon(serve)

        async def guest_side() -> None:
            await guest.get_message()  # the Run
            await guest.aclose()

        nursery.start_soon(guest_side)
        with pytest.raises(ConnectionLost):
            async for _ in session.run(["sleep", "100"]):
                pass


async def test_promotion_times_out(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        session, guest = await connected(nursery)
        nursery.start_soon(session.serve)
        nursery.start_soon(_heartbeats, guest)
        start = trio.current_time()
        with pytest.raises(GuestViolation, match="no answer to promotion within 3s"):
            await session.promote(p.Promote(name="a", role="r", harness=p.Harness(argv=["x"])))
        assert trio.current_time() - start == pytest.approx(3.0)
        nursery.cancel_scope.cancel()


def tool_ran(task_id: int = 0, tool: str = "run_shell") -> p.ToolRan:
    return p.ToolRan(
        task_id=task_id, tool=tool, arguments='{"command": "ls"}', code=0, duration=0.5, output="x"
    )


async def test_tool_runs_of_its_own_turns_reach_the_audit_trail(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        session, guest = await connected(nursery)
        heard: list[p.ToolRan] = []
        session.on_tool_ran = heard.append
        nursery.start_soon(session.serve)

        async def guest_side() -> None:
            task = p.decode_host(await guest.get_message())
            assert isinstance(task, p.Task)
            await guest.send_message(p.encode(tool_ran()))  # an IRC turn's (task 0)
            await guest.send_message(p.encode(tool_ran(task.task_id, "read_file")))
            await guest.send_message(p.encode(p.TaskDone(task_id=task.task_id, code=0, output="")))

        nursery.start_soon(guest_side)
        await session.task(7, "go")
        assert [(r.task_id, r.tool) for r in heard] == [(0, "run_shell"), (7, "read_file")]
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("report", "match"),
    [
        (tool_ran(task_id=8), "tool run for task 8, which it does not hold"),
        (tool_ran(tool="run shell\x1b[2J"), "which is not a tool name"),
        (tool_ran(tool=""), "which is not a tool name"),
    ],
)
async def test_a_tool_run_it_cannot_claim_is_a_violation(
    autojump_clock: trio.testing.MockClock, report: p.ToolRan, match: str
) -> None:
    async with trio.open_nursery() as nursery:
        session, guest = await connected(nursery)
        heard: list[p.ToolRan] = []
        session.on_tool_ran = heard.append
        await guest.send_message(p.encode(report))
        with pytest.raises(GuestViolation, match=match):
            await session.serve()
        assert heard == []
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "fields",
    [
        {"arguments": "a" * (p.MAX_TOOL_ARGUMENTS + 1)},
        {"output": "o" * (p.MAX_TOOL_OUTPUT + 1)},
        {"tool": "t" * 65},
        {"duration": -1.0},
        {"agent": "someone-else"},  # it cannot say whose run it was
    ],
)
async def test_a_tool_run_over_the_caps_is_refused_by_the_schema(
    autojump_clock: trio.testing.MockClock, fields: dict[str, object]
) -> None:
    # Encoded by hand, past the Struct's checks, as a hostile guest would send it.
    body: dict[str, object] = {
        "type": "tool_ran",
        "task_id": 0,
        "tool": "run_shell",
        "arguments": "{}",
        "code": 0,
        "duration": 0.1,
        "output": "",
    }
    body.update(fields)
    async with trio.open_nursery() as nursery:
        session, guest = await connected(nursery)
        await guest.send_message(msgspec.msgpack.encode(body))
        with pytest.raises(GuestViolation, match="invalid message|too large"):
            await session.serve()
        nursery.cancel_scope.cancel()


async def test_cancel_reaches_the_guest_and_fails_once_it_is_gone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        session, guest = await connected(nursery)

        async def serve() -> None:
            with pytest.raises(ConnectionLost):
                await session.serve()

        nursery.start_soon(serve)
        await session.cancel("stopped by an operator")
        msg = p.decode_host(await guest.get_message())
        assert msg == p.Cancel(reason="stopped by an operator")
        await guest.aclose()
        await session.closed()
        with pytest.raises(ConnectionLost):
            await session.cancel("again")


async def _heartbeats(guest: trio_websocket.WebSocketConnection) -> None:
    while True:
        msg = await guest.get_message()
        del msg


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(2.0, 2.0, now=0.0)
    assert bucket.try_take(0.0) and bucket.try_take(0.0) and not bucket.try_take(0.0)
    assert bucket.try_take(0.5) and not bucket.try_take(0.5)
