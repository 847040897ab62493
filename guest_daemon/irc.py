"""The shared IRC client of the overseer and the agents: a thin trio adapter.

The protocol lives in ``irc_session`` (sans-I/O; its config and events in
``irc_events``, registration in ``irc_registration``); this module moves bytes::

    IrcClient.run()                     nursery.start(): started() once first registered
    └─ forever, until quit() or cancelled
       ├─ connect (``connect(host, port)``, default TCP)   bounded by CONNECT_TIMEOUT
       ├─ one connection
       │  ├─ reader   bytes -> IrcSession -> events (and lines it queues)
       │  ├─ writer   the ONE place that writes: urgent lines first (registration,
       │  │           PONG, PING, JOIN), then user lines once registered, paced by
       │  │           a token bucket (send_rate lines/s, send_burst at once)
       │  └─ timers   idle PING, ping timeout, registration timeout, nick regain
       ├─ Disconnected(reason)
       └─ sleep uniform(0, min(reconnect_max, reconnect_base * 2**failures))  (full jitter;
                                          failures: attempts since the last registration)

Channels in the config, and those passed to ``join``, are joined after every
registration; a KICK removes a channel from that set (rejoining is the user's
choice). Lines given to ``privmsg`` wait in a bounded outbox (senders block
when it is full) and survive reconnects; they go out only while registered.

Events come from ``events()``, a bounded channel: when the consumer falls
behind by ``EVENT_BUFFER`` events the oldest are dropped (and logged), so a
slow consumer can never stall the reader and get us disconnected.

ngircd (26.1) never disconnects a client for sending fast: it works through
about 3 short or 2 long lines a second of one client's input (a penalty second
after every 3 commands or 256 bytes) and leaves the rest unread in the socket.
A burst only adds latency, for everything behind it including our PONGs and
JOINs; lines over 512 bytes, though, get a client dropped ("Request too long").
The default pace of 2 lines/s stays within what it processes.

Exceptions: ``InvalidParameter`` (from ``privmsg``, ``notice``, ``join`` and
``part`` for a target or channel that cannot be sent). Connection failures are
not raised: they are ``Disconnected`` events and reconnects.

This module imports only the standard library, trio, msgspec and irctokens:
it ships inside VM images.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from .irc_events import (
    Disconnected,
    Event,
    IrcConfig,
    Kicked,
    Registered,
)
from .irc_session import IrcSession
from .irc_wire import (
    InvalidParameter,
    casefold,
    encode,
    is_channel,
    loggable,
    message_budget,
    paginate,
)
from .pacing import TokenBucket, full_jitter

__all__ = [
    "CONNECT_TIMEOUT",
    "EVENT_BUFFER",
    "OUTBOX_SIZE",
    "QUIT_TIMEOUT",
    "RECEIVE_SIZE",
    "Connect",
    "IrcClient",
    "open_tcp",
]

log = logging.getLogger("fireclaw.irc")

#: One connection attempt (TCP connect) never takes longer than this.
CONNECT_TIMEOUT: Final = 20.0
#: How long ``quit`` waits for the server to close after QUIT.
QUIT_TIMEOUT: Final = 5.0
#: Events kept for a slow consumer before the oldest are dropped.
EVENT_BUFFER: Final = 1024
#: User lines (privmsg pages, JOINs) queued before senders wait.
OUTBOX_SIZE: Final = 256
RECEIVE_SIZE: Final = 16384

#: ``connect(host, port)`` returns an open byte stream to the server.
Connect = Callable[[str, int], Awaitable[trio.abc.Stream]]


async def open_tcp(host: str, port: int) -> trio.abc.Stream:
    return await trio.open_tcp_stream(host, port)


class _Outbox:
    """Lines waiting for the writer: per-connection urgent ones, then user lines."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.urgent: deque[bytes] = deque()
        self.normal: deque[bytes] = deque()
        self._readers = trio.lowlevel.ParkingLot()
        self._writers = trio.lowlevel.ParkingLot()

    def push_urgent(self, line: bytes) -> None:
        self.urgent.append(line)
        self._readers.unpark_all()

    def wake(self) -> None:
        self._readers.unpark_all()

    async def put(self, line: bytes) -> None:
        while len(self.normal) >= self.size:
            await self._writers.park()
        self.normal.append(line)
        self._readers.unpark_all()

    def push_last(self, line: bytes) -> None:
        """Queue a user line past the size limit (for the one QUIT)."""
        self.normal.append(line)
        self._readers.unpark_all()

    def put_back(self, line: bytes) -> None:
        self.normal.appendleft(line)

    async def get(self, session: IrcSession) -> tuple[bytes, bool]:
        """The next line to send and whether it is a user line."""
        while True:
            if self.urgent:
                return self.urgent.popleft(), False
            if self.normal and session.registered:
                line = self.normal.popleft()
                self._writers.unpark()
                return line, True
            await self._readers.park()


class _Connection:
    """One connection's stream, session and outcome."""

    def __init__(self, stream: trio.abc.Stream, session: IrcSession) -> None:
        self.stream = stream
        self.session = session
        self.scope = trio.CancelScope()
        self.reason: str | None = None
        self.registered = False
        self.timers_changed = trio.Event()
        self.done = trio.Event()

    def end(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.scope.cancel()


class IrcClient:
    """A reconnecting IRC client; see the module docstring for the life cycle.

    ``connect`` replaces the TCP connection (tests use memory streams);
    ``uniform`` draws the reconnect delays (tests make them deterministic).
    """

    def __init__(
        self,
        config: IrcConfig,
        *,
        connect: Connect = open_tcp,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.config = config
        self._connect = connect
        self._uniform = uniform
        self._events_in, self._events_out = trio.open_memory_channel[Event](EVENT_BUFFER)
        self._outbox = _Outbox(OUTBOX_SIZE)
        self._channels: dict[str, str] = {casefold(c): c for c in config.channels}
        self._send_lock = trio.Lock()
        self._connection: _Connection | None = None
        self._nick = config.nick
        self._quitting = False
        self._running = False
        self._run_scope = trio.CancelScope()
        self.dropped_events = 0

    # -- what the user sees ------------------------------------------------------------

    @property
    def nick(self) -> str:
        """Our current nick (the last one we had, while disconnected)."""
        if self._connection is not None:
            return self._connection.session.nick
        return self._nick

    @property
    def registered(self) -> bool:
        return self._connection is not None and self._connection.session.registered

    @property
    def channels(self) -> tuple[str, ...]:
        """The channels joined after every registration."""
        return tuple(self._channels.values())

    def events(self) -> trio.MemoryReceiveChannel[Event]:
        """The one queue of events (every call returns the same channel)."""
        return self._events_out

    async def privmsg(self, target: str, text: str) -> None:
        """Send ``text`` to ``target``, paginated; waits while the outbox is full."""
        await self._say("PRIVMSG", target, text)

    async def notice(self, target: str, text: str) -> None:
        await self._say("NOTICE", target, text)

    async def join(self, channel: str) -> None:
        """Join ``channel`` now (if registered) and after every reconnect."""
        if not is_channel(channel):
            raise InvalidParameter(f"invalid channel {channel!r}")
        self._channels[casefold(channel)] = channel
        if self.registered:
            async with self._send_lock:
                await self._outbox.put(encode("JOIN", channel))

    async def part(self, channel: str, reason: str = "") -> None:
        """Leave ``channel`` and stop rejoining it."""
        if not is_channel(channel):
            raise InvalidParameter(f"invalid channel {channel!r}")
        self._channels.pop(casefold(channel), None)
        if self.registered:
            async with self._send_lock:
                await self._outbox.put(encode("PART", channel, reason or "leaving"))

    async def whois(self, nick: str) -> None:
        """Ask the server about ``nick``; the answer comes as a ``WhoisReply`` event.

        Queued like a user line: it goes out once registered, after what is
        already waiting.
        """
        if not nick or any(ch in nick for ch in " ,*?!@:\r\n\x00"):
            raise InvalidParameter(f"invalid WHOIS nick {nick!r}")
        async with self._send_lock:
            await self._outbox.put(encode("WHOIS", nick))

    async def quit(self, message: str) -> None:
        """Send QUIT, wait up to QUIT_TIMEOUT for the server to close, stop ``run``.

        Lines already queued go out before the QUIT, as far as the wait allows.
        """
        self._quitting = True
        connection = self._connection
        if connection is not None and connection.reason is None:
            line = encode("QUIT", message)
            if connection.session.registered:
                self._outbox.push_last(line)  # after what the user already said
            else:
                self._outbox.push_urgent(line)
            with trio.move_on_after(QUIT_TIMEOUT):
                await connection.done.wait()
            connection.end("quit")
        self._run_scope.cancel()

    # -- the connection loop -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, register and reconnect until ``quit`` or cancellation."""
        if self._running:
            raise RuntimeError("IrcClient.run is already running")
        self._running = True
        self._run_scope = trio.CancelScope()
        config = self.config
        failures = 0
        started = False

        def on_registered() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        try:
            with self._run_scope:
                while not self._quitting:
                    stream = await self._open()
                    if stream is not None:
                        reason, registered = await self._converse(stream, on_registered)
                        if registered:
                            failures = 0
                        if self._quitting:
                            break
                        log.warning("disconnected from %s:%d: %s", config.host, config.port, reason)
                        self._emit(Disconnected(reason=reason))
                    delay = full_jitter(
                        failures, config.reconnect_base, config.reconnect_max, self._uniform
                    )
                    failures += 1
                    await trio.sleep(delay)
        finally:
            self._running = False

    async def _open(self) -> trio.abc.Stream | None:
        config = self.config
        with trio.move_on_after(CONNECT_TIMEOUT):
            try:
                return await self._connect(config.host, config.port)
            except OSError as exc:
                error = exc.strerror or str(exc) or type(exc).__name__
                log.info("cannot connect to %s:%d: %s", config.host, config.port, error)
                return None
        log.info("connecting to %s:%d timed out", config.host, config.port)
        return None

    async def _converse(
        self, stream: trio.abc.Stream, on_registered: Callable[[], None]
    ) -> tuple[str, bool]:
        """One connection, until it ends; returns why and whether it registered."""
        session = IrcSession(self.config, channels=self._channels.values(), now=trio.current_time())
        connection = _Connection(stream, session)
        self._outbox.urgent.clear()
        self._connection = connection
        try:
            session.open()
            self._pump(connection)
            with connection.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_loop, connection)
                    nursery.start_soon(self._timer_loop, connection)
                    nursery.start_soon(self._read_loop, connection, on_registered)
        finally:
            self._nick = session.nick
            self._connection = None
            self._outbox.urgent.clear()
            await trio.aclose_forcefully(stream)
            connection.done.set()
        return connection.reason or "connection ended", connection.registered

    def _pump(self, connection: _Connection) -> None:
        """Move the session's queued lines to the writer; its timers may have moved."""
        for line in connection.session.data_to_send():
            self._outbox.push_urgent(line)
        connection.timers_changed.set()
        self._outbox.wake()

    async def _read_loop(self, connection: _Connection, on_registered: Callable[[], None]) -> None:
        session = connection.session
        while True:
            try:
                data = await connection.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                connection.end(f"connection lost: {_why(exc)}")
                return
            if not data:
                connection.end("the server closed the connection")
                return
            log.debug("< %r", data)
            for event in session.receive(data, trio.current_time()):
                match event:
                    case Registered():
                        connection.registered = True
                        log.info("registered as %s", event.nick)
                        on_registered()
                    case Kicked():
                        self._channels.pop(casefold(event.channel), None)
                self._emit(event)
            self._pump(connection)
            if session.close_reason is not None:
                connection.end(session.close_reason)
                return

    async def _write_loop(self, connection: _Connection) -> None:
        """The one writer: every byte sent goes through here, paced by the bucket."""
        config = self.config
        bucket = TokenBucket(config.send_rate, config.send_burst, trio.current_time())
        while True:
            wait = bucket.delay(trio.current_time())
            if wait > 0:
                await trio.sleep(wait)
            line, is_user_line = await self._outbox.get(connection.session)
            bucket.take(trio.current_time())
            log.debug("> %r", loggable(line))
            try:
                await connection.stream.send_all(line)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                if is_user_line:
                    self._outbox.put_back(line)
                connection.end(f"connection lost: {_why(exc)}")
                return

    async def _timer_loop(self, connection: _Connection) -> None:
        session = connection.session
        while True:
            connection.timers_changed = trio.Event()
            with trio.move_on_at(session.next_deadline()):
                await connection.timers_changed.wait()
            session.tick(trio.current_time())
            self._pump(connection)
            if session.close_reason is not None:
                connection.end(session.close_reason)
                return

    async def _say(self, command: str, target: str, text: str) -> None:
        if not target or any(ch in target for ch in " ,\r\n\x00") or target.startswith(":"):
            raise InvalidParameter(f"invalid {command} target {target!r}")
        connection = self._connection
        if connection is not None:
            budget = connection.session.budget(command, target)
        else:
            budget = message_budget(
                nick=self.nick,
                username=self.config.username,
                host="x" * 63,
                command=command,
                target=target,
            )
        lines = [encode(command, target, page) for page in paginate(text, budget)]
        async with self._send_lock:
            for line in lines:
                await self._outbox.put(line)

    def _emit(self, event: Event) -> None:
        """Deliver ``event``; a full queue loses its oldest event instead of blocking."""
        try:
            self._events_in.send_nowait(event)
        except trio.WouldBlock:
            try:
                self._events_out.receive_nowait()
                self.dropped_events += 1
                log.warning("event consumer behind: dropped the oldest event")
                self._events_in.send_nowait(event)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # nobody listens any more


def _why(exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else None
    detail = cause or exc
    if isinstance(detail, OSError) and detail.strerror:
        return detail.strerror
    return str(detail) or type(detail).__name__
