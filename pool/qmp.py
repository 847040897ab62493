"""QMP, the QEMU Machine Protocol: a sans-I/O client and a thin trio adapter.

``QmpClient`` is the protocol: bytes from QEMU go in through
``receive_data``, which returns what they mean (``Greeting``, ``Reply``,
``ErrorReply``, ``AsyncEvent``, ``Closed``); commands come out of ``execute``
as the bytes to send. It reads no clock and does no I/O. QEMU is trusted to be
QEMU, but what it sends is still bounded: a line over ``MAX_LINE`` bytes,
JSON that does not parse, or a message that is not QMP ends the session.

Conversation::

    client                                  QEMU
      | <------------ {"QMP": {"version": ...}} |   greeting on connect
      | -- {"execute": "qmp_capabilities"} ---> |
      | <--------------------- {"return": {}} -- |   negotiated
      | -- {"execute": CMD, "id": N} ---------> |
      | <------ {"return": ..., "id": N} ------- |   or {"error": {"class", "desc"}, "id": N}
      | <------ {"event": NAME, "data": ...} --- |   any time after the greeting

``open_qmp(path)`` is the trio adapter over QEMU's unix socket: it connects
(retrying until the caller's cancel scope says stop), negotiates, runs one
reader task, and gives ``await qmp.execute(...)`` and
``await qmp.wait_event(name)``.

Errors::

    QmpFailure              talking QMP went wrong; ``str()`` is one line
    ├── QmpError            QEMU refused a command: ``error_class``, ``desc``
    ├── QmpProtocolError    what QEMU sent is not QMP (bad JSON, a line over 1 MiB, ...)
    └── QmpConnectionLost   the socket closed (QEMU exited) or broke
"""

from __future__ import annotations

import collections
import errno
import itertools
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Final

import msgspec
import trio

#: The longest line accepted from QEMU. Replies to the commands we send are small;
#: anything near this is a broken or hostile peer.
MAX_LINE: Final = 1024 * 1024
#: Events kept for ``wait_event`` that nobody has waited for yet; older ones are dropped.
MAX_PENDING_EVENTS: Final = 256

_decoder: Final = msgspec.json.Decoder(dict[str, object])
_encoder: Final = msgspec.json.Encoder()


class QmpFailure(Exception):
    """Talking QMP went wrong."""


class QmpError(QmpFailure):
    """QEMU answered a command with an error."""

    def __init__(self, error_class: str, desc: str, *, command: str = "") -> None:
        desc = " ".join(desc.split())
        where = f"{command}: " if command else ""
        super().__init__(f"{where}{error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc
        self.command = command


class QmpProtocolError(QmpFailure):
    """QEMU sent something that is not QMP."""


class QmpConnectionLost(QmpFailure):
    """The QMP socket closed or broke."""


# --- what the client reports -------------------------------------------------------------


@dataclass(frozen=True)
class Greeting:
    version: tuple[int, int, int]
    capabilities: tuple[str, ...]


@dataclass(frozen=True)
class Reply:
    id: int
    command: str
    result: object


@dataclass(frozen=True)
class ErrorReply:
    id: int
    command: str
    error_class: str
    desc: str

    def exception(self) -> QmpError:
        return QmpError(self.error_class, self.desc, command=self.command)


@dataclass(frozen=True)
class AsyncEvent:
    name: str
    data: Mapping[str, object]
    timestamp: float  # QEMU's wall clock; -1 when it sent none


@dataclass(frozen=True)
class Closed:
    """QEMU closed the connection."""


QmpEvent = Greeting | Reply | ErrorReply | AsyncEvent | Closed


class _Triple(msgspec.Struct, frozen=True):
    major: int
    minor: int
    micro: int


class _Version(msgspec.Struct, frozen=True):
    qemu: _Triple


class _GreetingBody(msgspec.Struct, frozen=True):
    version: _Version
    capabilities: list[str] = []


class QmpState(Enum):
    GREETING = "greeting"  # waiting for QEMU's greeting
    NEGOTIATING = "negotiating"  # qmp_capabilities sent, not answered yet
    READY = "ready"
    CLOSED = "closed"


# --- the sans-I/O client -----------------------------------------------------------------


class QmpClient:
    """The client side of one QMP connection. No I/O, no clock.

    After the greeting, call ``negotiate()`` and send its bytes; other
    commands may be sent once its ``Reply`` has come back (``state`` is then
    READY). Raises ``QmpProtocolError`` for anything QEMU sends that breaks
    the protocol; the connection is then unusable.
    """

    def __init__(self, *, max_line: int = MAX_LINE) -> None:
        self.state = QmpState.GREETING
        self.greeting: Greeting | None = None
        self._max_line = max_line
        self._buffer = bytearray()
        self._ids = itertools.count(1)
        self._pending: dict[int, str] = {}
        self._negotiation: int | None = None

    def negotiate(self) -> tuple[int, bytes]:
        """The ``qmp_capabilities`` command that leaves capabilities negotiation mode."""
        if self.state is not QmpState.GREETING or self.greeting is None:
            raise QmpProtocolError(f"cannot negotiate in state {self.state.value}")
        self.state = QmpState.NEGOTIATING
        cmd_id, data = self._command("qmp_capabilities", None)
        self._negotiation = cmd_id
        return cmd_id, data

    def execute(
        self, command: str, arguments: Mapping[str, object] | None = None
    ) -> tuple[int, bytes]:
        """The id and the bytes of ``command``; its reply carries the same id."""
        if self.state is not QmpState.READY:
            raise QmpProtocolError(f"cannot execute {command} in state {self.state.value}")
        return self._command(command, arguments)

    def _command(self, command: str, arguments: Mapping[str, object] | None) -> tuple[int, bytes]:
        cmd_id = next(self._ids)
        msg: dict[str, object] = {"execute": command, "id": cmd_id}
        if arguments:
            msg["arguments"] = dict(arguments)
        self._pending[cmd_id] = command
        return cmd_id, _encoder.encode(msg) + b"\r\n"

    @property
    def pending(self) -> tuple[int, ...]:
        """Ids of commands sent and not answered yet."""
        return tuple(self._pending)

    def receive_data(self, data: bytes | bytearray) -> list[QmpEvent]:
        """Feed bytes read from QEMU; ``b""`` is EOF. Returns what they completed."""
        if self.state is QmpState.CLOSED:
            if data:
                raise QmpProtocolError("data after the connection closed")
            return []
        if not data:
            self.state = QmpState.CLOSED
            return [Closed()]
        start = len(self._buffer)
        self._buffer += data
        events: list[QmpEvent] = []
        # Only the new bytes can hold a newline the buffer did not have before.
        end = self._buffer.find(b"\n", start)
        while end >= 0:
            line = bytes(self._buffer[:end]).rstrip(b"\r")
            del self._buffer[: end + 1]
            if len(line) > self._max_line:
                raise self._fail(f"a line of {len(line)} bytes from QEMU (limit {self._max_line})")
            if line.strip():
                events.append(self._message(line))
            end = self._buffer.find(b"\n")
        if len(self._buffer) > self._max_line:
            raise self._fail(f"over {self._max_line} bytes from QEMU without a newline")
        return events

    def _fail(self, why: str) -> QmpProtocolError:
        self.state = QmpState.CLOSED
        return QmpProtocolError(why)

    def _message(self, line: bytes) -> QmpEvent:
        try:
            msg = _decoder.decode(line)
        except msgspec.DecodeError as exc:
            raise self._fail(f"malformed JSON from QEMU: {exc}") from None
        if self.state is QmpState.GREETING:
            return self._greeting(msg)
        if "event" in msg:
            return self._event(msg)
        if "return" in msg or "error" in msg:
            return self._reply(msg)
        raise self._fail(f"unexpected QMP message with keys {sorted(msg)[:5]}")

    def _greeting(self, msg: dict[str, object]) -> Greeting:
        try:
            found = msgspec.convert(msg.get("QMP"), _GreetingBody)
        except msgspec.ValidationError:
            raise self._fail(f"expected the QMP greeting, got keys {sorted(msg)[:5]}") from None
        qemu = found.version.qemu
        self.greeting = Greeting((qemu.major, qemu.minor, qemu.micro), tuple(found.capabilities))
        return self.greeting

    def _event(self, msg: dict[str, object]) -> AsyncEvent:
        name, data, stamp = msg.get("event"), msg.get("data", {}), msg.get("timestamp")
        if not isinstance(name, str) or not isinstance(data, dict):
            raise self._fail("malformed QMP event")
        timestamp = -1.0
        if isinstance(stamp, dict):
            seconds, micros = stamp.get("seconds"), stamp.get("microseconds")
            if isinstance(seconds, int) and isinstance(micros, int) and seconds >= 0:
                timestamp = seconds + micros / 1e6
        return AsyncEvent(name, data, timestamp)

    def _reply(self, msg: dict[str, object]) -> Reply | ErrorReply:
        cmd_id = msg.get("id")
        if not isinstance(cmd_id, int) or cmd_id not in self._pending:
            error = msg.get("error")
            desc = error.get("desc") if isinstance(error, dict) else None
            detail = f": {desc}" if isinstance(desc, str) else ""
            raise self._fail(f"a reply to no command we sent (id {cmd_id!r}){detail}")
        command = self._pending.pop(cmd_id)
        reply: Reply | ErrorReply
        if "error" in msg:
            error = msg["error"]
            if not isinstance(error, dict):
                raise self._fail(f"malformed error reply to {command}")
            reply = ErrorReply(
                cmd_id, command, str(error.get("class", "GenericError")), str(error.get("desc", ""))
            )
        else:
            reply = Reply(cmd_id, command, msg["return"])
        if cmd_id == self._negotiation:
            if isinstance(reply, ErrorReply):
                raise self._fail(f"QEMU refused qmp_capabilities: {reply.desc}")
            self.state = QmpState.READY
        return reply


# --- the trio adapter --------------------------------------------------------------------


@dataclass
class _Waiter:
    done: trio.Event = field(default_factory=trio.Event)
    reply: Reply | ErrorReply | None = None


class Qmp:
    """A negotiated QMP session; get one from ``open_qmp``."""

    def __init__(self, stream: trio.abc.Stream, client: QmpClient) -> None:
        self._stream = stream
        self._client = client
        self._send_lock = trio.Lock()  # the one writer: frames never interleave
        self._waiters: dict[int, _Waiter] = {}
        self._events: collections.deque[AsyncEvent] = collections.deque(maxlen=MAX_PENDING_EVENTS)
        self._new_event = trio.Event()
        self._broken: QmpFailure | None = None

    @property
    def greeting(self) -> Greeting:
        assert self._client.greeting is not None
        return self._client.greeting

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        """Run ``command``; its ``return`` value. Raises QmpError if QEMU refuses it."""
        self._check()
        cmd_id, data = self._client.execute(command, arguments)
        return await self._call(cmd_id, data)

    async def wait_event(
        self, name: str, where: Callable[[AsyncEvent], bool] | None = None
    ) -> AsyncEvent:
        """The first event called ``name`` (and matching ``where``) since the session
        opened that no earlier ``wait_event`` returned; waits for it if need be."""
        while True:
            for event in self._events:
                if event.name == name and (where is None or where(event)):
                    self._events.remove(event)
                    return event
            self._check()
            await self._new_event.wait()

    def _check(self) -> None:
        if self._broken is not None:
            raise self._broken

    async def _call(self, cmd_id: int, data: bytes) -> object:
        waiter = self._waiters[cmd_id] = _Waiter()
        try:
            async with self._send_lock:
                try:
                    await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise QmpConnectionLost(f"QMP connection lost: {exc}") from exc
            await waiter.done.wait()
        finally:
            del self._waiters[cmd_id]
        if waiter.reply is None:
            assert self._broken is not None
            raise self._broken
        if isinstance(waiter.reply, ErrorReply):
            raise waiter.reply.exception()
        return waiter.reply.result

    async def _negotiate(self) -> None:
        while self._client.greeting is None:
            self._check()
            await self._new_event.wait()
        await self._call(*self._client.negotiate())

    async def _reader(self) -> None:
        """The one reader: feeds the client and dispatches what it reports."""
        try:
            while True:
                try:
                    data = await self._stream.receive_some(65536)
                except trio.BrokenResourceError as exc:
                    raise QmpConnectionLost(f"QMP connection lost: {exc}") from exc
                for event in self._client.receive_data(data):
                    match event:
                        case Reply() | ErrorReply():
                            waiter = self._waiters.get(event.id)
                            if waiter is not None:
                                waiter.reply = event
                                waiter.done.set()
                        case AsyncEvent():
                            self._events.append(event)
                        case Closed():
                            raise QmpConnectionLost("QEMU closed the QMP connection")
                        case Greeting():
                            pass
                self._wake()
        except QmpFailure as exc:
            self._broken = exc
        except trio.ClosedResourceError:
            self._broken = QmpConnectionLost("QMP connection closed")
        finally:
            if self._broken is None:
                self._broken = QmpConnectionLost("QMP session closed")
            for waiter in self._waiters.values():
                waiter.done.set()
            self._wake()

    def _wake(self) -> None:
        self._new_event.set()
        self._new_event = trio.Event()


async def _connect(path: Path) -> trio.SocketStream:
    """Connect to ``path``, retrying while QEMU has not created or opened it yet."""
    delay = 0.005
    while True:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(str(path))
        except OSError as exc:
            sock.close()
            if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                raise QmpConnectionLost(f"connecting to {path}: {exc.strerror}") from exc
            # Not there yet: QEMU creates the socket early in its start-up, within
            # tens of milliseconds. A connect attempt costs next to nothing, and
            # every VM start waits on this: look often.
            await trio.sleep(delay)
            delay = min(delay * 2, 0.01)
            continue
        return trio.SocketStream(sock)


@asynccontextmanager
async def open_qmp(path: Path) -> AsyncIterator[Qmp]:
    """A negotiated QMP session over the unix socket at ``path``.

    Retries the connection until it succeeds: bound it with a cancel scope.
    """
    stream = await _connect(path)
    error: BaseException | None = None
    async with stream, trio.open_nursery() as nursery:
        qmp = Qmp(stream, QmpClient())
        nursery.start_soon(qmp._reader)
        try:
            await qmp._negotiate()
            yield qmp
        except BaseException as exc:
            # Raised again below, outside the nursery, so that callers catch a plain
            # QmpError rather than an exception group holding one.
            error = exc
        nursery.cancel_scope.cancel()
    if error is not None:
        raise error
