"""QMP: the sans-I/O client with byte strings, the trio adapter over a unix socket.

The adapter is tested here against a scripted peer on a real unix socket; the
tests in test_qemu.py use it against real QEMU.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from fireclaw.pool.qmp import (
    MAX_LINE,
    AsyncEvent,
    Closed,
    ErrorReply,
    Greeting,
    QmpClient,
    QmpConnectionLost,
    QmpError,
    QmpProtocolError,
    QmpState,
    Reply,
    open_qmp,
)

GREETING = (
    b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"},'
    b' "capabilities": ["oob"]}}\r\n'
)
WAIT = 5.0


def ready_client() -> QmpClient:
    client = QmpClient()
    assert client.receive_data(GREETING) == [Greeting((7, 2, 22), ("oob",))]
    cmd_id, data = client.negotiate()
    assert json.loads(data) == {"execute": "qmp_capabilities", "id": cmd_id}
    states = [client.state]
    (reply,) = client.receive_data(b'{"return": {}, "id": %d}\r\n' % cmd_id)
    assert reply == Reply(cmd_id, "qmp_capabilities", {})
    states.append(client.state)
    assert states == [QmpState.NEGOTIATING, QmpState.READY]
    return client


def test_greeting_negotiation_and_commands() -> None:
    client = ready_client()
    cmd_id, data = client.execute("migrate", {"uri": "exec:cat > /x"})
    assert data.endswith(b"\r\n")
    assert json.loads(data) == {
        "execute": "migrate",
        "arguments": {"uri": "exec:cat > /x"},
        "id": cmd_id,
    }
    other, data = client.execute("query-status")
    assert "arguments" not in json.loads(data)
    before = client.pending
    # Replies come back in any order, matched by id.
    got = client.receive_data(b'{"return": {"status": "running"}, "id": %d}\n' % other)
    assert got == [Reply(other, "query-status", {"status": "running"})]
    assert (before, client.pending) == ((cmd_id, other), (cmd_id,))


def test_bytes_may_arrive_in_any_pieces() -> None:
    client = QmpClient()
    events = []
    for i in range(len(GREETING)):
        events += client.receive_data(GREETING[i : i + 1])
    assert events == [Greeting((7, 2, 22), ("oob",))]
    client.negotiate()
    two = b'{"return": {}, "id": 1}\r\n{"event": "STOP", "data": {}}\r\n'
    assert client.receive_data(two[:10]) == []
    assert client.receive_data(two[10:]) == [
        Reply(1, "qmp_capabilities", {}),
        AsyncEvent("STOP", {}, -1.0),
    ]


def test_error_reply_is_one_line_qmp_error() -> None:
    client = ready_client()
    cmd_id, _ = client.execute("cont")
    (reply,) = client.receive_data(
        b'{"id": %d, "error": {"class": "GenericError",'
        b' "desc": "Migration is not completed\\nyet"}}\r\n' % cmd_id
    )
    assert isinstance(reply, ErrorReply)
    error = reply.exception()
    assert isinstance(error, QmpError)
    assert (error.error_class, error.desc) == ("GenericError", "Migration is not completed yet")
    assert str(error) == "cont: GenericError: Migration is not completed yet"


def test_events_with_timestamps() -> None:
    client = ready_client()
    got = client.receive_data(
        b'{"timestamp": {"seconds": 1700000000, "microseconds": 250000},'
        b' "event": "MIGRATION", "data": {"status": "completed"}}\r\n'
        b'{"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}\r\n'
    )
    assert got == [
        AsyncEvent("MIGRATION", {"status": "completed"}, 1700000000.25),
        AsyncEvent("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"}, -1.0),
    ]


def test_eof_closes() -> None:
    client = ready_client()
    assert client.receive_data(b"") == [Closed()]
    assert client.state is QmpState.CLOSED
    assert client.receive_data(b"") == []
    with pytest.raises(QmpProtocolError):
        client.receive_data(b"{}\n")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"{not json}\n", "malformed JSON"),
        (b'{"return": {}, "id": 99}\n', "a reply to no command we sent"),
        (b'{"error": {"class": "GenericError", "desc": "bad"}}\n', "no command we sent.*bad"),
        (b'{"something": 1}\n', "unexpected QMP message"),
        (b'{"event": 5}\n', "malformed QMP event"),
        (b"[1, 2]\n", "malformed JSON"),
    ],
)
def test_bad_input_is_a_protocol_error(data: bytes, expected: str) -> None:
    client = ready_client()
    with pytest.raises(QmpProtocolError, match=expected) as info:
        client.receive_data(data)
    assert "\n" not in str(info.value)
    assert client.state is QmpState.CLOSED


def test_greeting_must_come_first() -> None:
    client = QmpClient()
    with pytest.raises(QmpProtocolError, match="cannot execute"):
        client.execute("stop")
    with pytest.raises(QmpProtocolError, match="cannot negotiate"):
        client.negotiate()
    with pytest.raises(QmpProtocolError, match="expected the QMP greeting"):
        client.receive_data(b'{"return": {}}\n')


def test_commands_wait_for_negotiation() -> None:
    client = QmpClient()
    client.receive_data(GREETING)
    cmd_id, _ = client.negotiate()
    with pytest.raises(QmpProtocolError, match="cannot execute stop in state negotiating"):
        client.execute("stop")
    with pytest.raises(QmpProtocolError, match="refused qmp_capabilities"):
        client.receive_data(
            b'{"id": %d, "error": {"class": "CommandNotFound", "desc": "no"}}\n' % cmd_id
        )


def test_line_over_the_cap_is_an_error() -> None:
    client = ready_client()
    # Without a newline: refused as soon as the buffer passes the cap.
    with pytest.raises(QmpProtocolError, match="without a newline"):
        client.receive_data(b"x" * (MAX_LINE + 1))
    small = QmpClient(max_line=80)
    small.receive_data(b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}}}\n')
    with pytest.raises(QmpProtocolError, match="a line of 100 bytes"):
        small.receive_data(b"y" * 100 + b"\n")
    exact = QmpClient(max_line=len(GREETING) - 2)
    assert exact.receive_data(GREETING) == [Greeting((7, 2, 22), ("oob",))]


# --- the trio adapter against a scripted peer ----------------------------------------------

Peer = Callable[[trio.SocketStream], Awaitable[None]]


def _id(msg: dict[str, object]) -> int:
    cmd_id = msg["id"]
    assert isinstance(cmd_id, int)
    return cmd_id


async def _lines(stream: trio.SocketStream) -> list[dict[str, object]]:
    """Read until at least one complete line arrived; the decoded lines."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some()
        if not chunk:
            break
        data += chunk
    return [json.loads(line) for line in data.splitlines() if line.strip()]


async def serve_once(nursery: trio.Nursery, path: Path, peer: Peer) -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(1)
    listener = trio.SocketListener(sock)

    async def run() -> None:
        async with listener:
            stream = await listener.accept()
        async with stream:
            await stream.send_all(GREETING)
            (negotiate,) = await _lines(stream)
            assert negotiate["execute"] == "qmp_capabilities"
            await stream.send_all(b'{"return": {}, "id": %d}\r\n' % _id(negotiate))
            await peer(stream)

    nursery.start_soon(run)


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    # Short: unix socket paths are limited to 107 bytes.
    return tmp_path / "q.sock"


async def test_adapter_execute_and_events(nursery: trio.Nursery, sock_path: Path) -> None:
    async def peer(stream: trio.SocketStream) -> None:
        (cmd,) = await _lines(stream)
        assert cmd["execute"] == "stop"
        # An event before the reply, and one the client waits for later.
        await stream.send_all(
            b'{"event": "STOP", "data": {}}\r\n{"return": {}, "id": %d}\r\n' % _id(cmd)
        )
        (cmd,) = await _lines(stream)
        await stream.send_all(
            b'{"event": "MIGRATION", "data": {"status": "active"}}\r\n'
            b'{"id": %d, "error": {"class": "GenericError", "desc": "nope"}}\r\n' % _id(cmd)
        )
        await stream.send_all(b'{"event": "MIGRATION", "data": {"status": "completed"}}\r\n')
        await trio.sleep_forever()

    with trio.fail_after(WAIT):
        await serve_once(nursery, sock_path, peer)
        async with open_qmp(sock_path) as qmp:
            assert qmp.greeting.version == (7, 2, 22)
            assert await qmp.execute("stop") == {}
            assert (await qmp.wait_event("STOP")).name == "STOP"
            with pytest.raises(QmpError, match="query-migrate: GenericError: nope"):
                await qmp.execute("query-migrate")
            done = await qmp.wait_event("MIGRATION", lambda e: e.data["status"] == "completed")
            assert done.data == {"status": "completed"}
            active = await qmp.wait_event("MIGRATION")  # still kept: nobody took it yet
            assert active.data == {"status": "active"}


async def test_errors_leave_the_session_as_themselves(
    nursery: trio.Nursery, sock_path: Path
) -> None:
    """Not wrapped in an exception group by the session's reader nursery."""

    async def peer(stream: trio.SocketStream) -> None:
        (cmd,) = await _lines(stream)
        await stream.send_all(
            b'{"id": %d, "error": {"class": "DeviceNotFound", "desc": "no"}}\r\n' % _id(cmd)
        )
        await trio.sleep_forever()

    with trio.fail_after(WAIT), pytest.raises(QmpError, match="DeviceNotFound"):
        await serve_once(nursery, sock_path, peer)
        async with open_qmp(sock_path) as qmp:
            await qmp.execute("device_del", {"id": "x"})


async def test_adapter_waits_for_the_socket(nursery: trio.Nursery, sock_path: Path) -> None:
    """The socket does not exist yet when the client starts connecting."""
    connected = trio.Event()

    async def peer(stream: trio.SocketStream) -> None:
        (cmd,) = await _lines(stream)
        await stream.send_all(b'{"return": {"status": "running"}, "id": %d}\r\n' % _id(cmd))
        await trio.sleep_forever()

    async def client() -> None:
        async with open_qmp(sock_path) as qmp:
            assert await qmp.execute("query-status") == {"status": "running"}
        connected.set()

    with trio.fail_after(WAIT):
        nursery.start_soon(client)
        await trio.testing.wait_all_tasks_blocked()
        assert not await trio.Path(sock_path).exists()
        await serve_once(nursery, sock_path, peer)
        await connected.wait()


async def test_adapter_fails_pending_calls_when_qemu_goes(
    nursery: trio.Nursery, sock_path: Path
) -> None:
    async def peer(stream: trio.SocketStream) -> None:
        await _lines(stream)  # the command, never answered: QEMU "exits"

    with trio.fail_after(WAIT):
        await serve_once(nursery, sock_path, peer)
        async with open_qmp(sock_path) as qmp:
            with pytest.raises(QmpConnectionLost, match="QEMU closed the QMP connection"):
                await qmp.execute("migrate", {"uri": "exec:cat > /dev/null"})
            with pytest.raises(QmpConnectionLost):
                await qmp.wait_event("MIGRATION")
            with pytest.raises(QmpConnectionLost):
                await qmp.execute("cont")


async def test_adapter_reports_a_broken_peer(nursery: trio.Nursery, sock_path: Path) -> None:
    async def peer(stream: trio.SocketStream) -> None:
        await _lines(stream)
        await stream.send_all(b"this is not json\r\n")
        await trio.sleep_forever()

    with trio.fail_after(WAIT):
        await serve_once(nursery, sock_path, peer)
        async with open_qmp(sock_path) as qmp:
            with pytest.raises(QmpProtocolError, match="malformed JSON"):
                await qmp.execute("query-status")


async def test_a_path_that_can_never_work_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with trio.fail_after(WAIT), pytest.raises(QmpConnectionLost, match="connecting to") as info:
        async with open_qmp(tmp_path / "file" / "q.sock"):
            pass
    assert "\n" not in str(info.value)
