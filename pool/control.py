"""The host side of one guest's control channel.

The session runs over a ``Channel`` (``guest_daemon.channel``): a WebSocket
the guest dialled, or the frames of a port the host attached to
(``pool.channel``). The guest is untrusted. Every frame it sends is
size-capped (``max_message_bytes``, by the WebSocket layer or the frame
decoder), rate-limited (a token bucket of
``max_messages_per_second``), decoded against the protocol schema, and checked
against what the conversation allows. Any breach ends the session with
``GuestViolation``; the VM above then kills and replaces the guest.

Errors::

    GuestLost               the session is over; the VM cannot be used any more
    ├── GuestViolation      the guest broke the protocol (too big, malformed, off-script, flooding)
    ├── HeartbeatMissed     nothing heard for heartbeat_timeout
    └── ConnectionLost      the connection closed or the stream broke
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Final

import trio
from fireclaw.config import ControlSpec
from fireclaw.guest_daemon import protocol as p
from fireclaw.guest_daemon.channel import Channel, ChannelClosed
from fireclaw.guest_daemon.pacing import TokenBucket

#: A host name a Welcome may carry (RFC 1123 label).
_HOSTNAME: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
#: A tool name a ToolRan may carry: a word, so it reads as one in a log line.
_TOOL: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
#: A run's output waiting to be taken; beyond this the reader waits (TCP backpressure).
_RUN_BUFFER: Final = 64
#: Heartbeats a guest on a port may have sent its previous host, passed over
#: before its Hello to this one.
STALE_BEATS: Final = 64

#: Where a guest's (checked) ``ToolRan`` reports go: the VM's audit trail.
OnToolRan = Callable[[p.ToolRan], None]


class GuestLost(Exception):
    """The control session ended; ``reason`` says why in one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class GuestViolation(GuestLost):
    """The guest broke the protocol."""


class HeartbeatMissed(GuestLost):
    """The guest went quiet for longer than the heartbeat timeout."""


class ConnectionLost(GuestLost):
    """The control connection closed."""


class ControlSession:
    """One connected, authenticated guest. Create with ``handshake``, then ``serve``."""

    def __init__(self, ws: Channel, hello: p.Hello, spec: ControlSpec) -> None:
        self._ws = ws
        self.hello = hello
        self._spec = spec
        rate = spec.max_messages_per_second
        self._bucket = TokenBucket(rate, rate, trio.current_time())
        self._last_seen = trio.current_time()
        self._stalled = False
        self._req_ids = itertools.count(1)
        self._runs: dict[int, trio.MemorySendChannel[p.Output | p.Exited]] = {}
        self._promoted: dict[str, trio.Event] = {}
        self._tasks: dict[int, trio.MemorySendChannel[p.TaskDone]] = {}
        self._lost: GuestLost | None = None
        self._closed = trio.Event()
        self.goodbye: p.Goodbye | None = None
        #: Told of each tool run the guest reports, once it passed the checks.
        self.on_tool_ran: OnToolRan | None = None
        # A resuming guest sends the results it held back first thing: each task it
        # says it holds has its place before the first frame is read.
        self._held: dict[int, trio.MemoryReceiveChannel[p.TaskDone]] = {}
        for task_id in hello.resume.tasks if hello.resume is not None else ():
            send, self._held[task_id] = trio.open_memory_channel[p.TaskDone](1)
            self._tasks[task_id] = send

    @property
    def channel(self) -> Channel:
        """What the session runs over (to read the first frames before ``serve``)."""
        return self._ws

    @classmethod
    async def handshake(
        cls,
        ws: Channel,
        *,
        vm_id: str,
        token: str,
        spec: ControlSpec,
        hostname: str = "",
        stale_beats: int = 0,
    ) -> ControlSession:
        """Read the guest's Hello, check who it is, answer with Welcome.

        ``hostname`` is the name a guest in a VM takes (clones of one snapshot
        each get their own); one that is not a valid host name is not sent.
        Up to ``stale_beats`` heartbeats before the Hello are passed over (a
        port's guest may have sent them to the host before this one)."""
        msg = p.decode_guest(await _receive(ws))  # ProtocolError handled by the caller
        for _ in range(stale_beats):
            if not isinstance(msg, p.Heartbeat):
                break
            msg = p.decode_guest(await _receive(ws))
        if not isinstance(msg, p.Hello):
            raise GuestViolation(f"first message was {type(msg).__name__}, not Hello")
        if msg.vm_id != vm_id or not secrets.compare_digest(msg.token, token):
            raise GuestViolation(f"hello from {msg.vm_id!r} with a wrong identity or token")
        if msg.version != p.PROTOCOL_VERSION:
            raise GuestViolation(f"protocol version {msg.version}, expected {p.PROTOCOL_VERSION}")
        welcome = p.Welcome(
            entropy=os.urandom(64),
            unix_time=time.time(),
            heartbeat_interval=spec.heartbeat_interval,
            hostname=hostname if _HOSTNAME.fullmatch(hostname) else "",
        )
        await _send(ws, welcome)
        return cls(ws, msg, spec)

    async def serve(self) -> None:
        """Read and dispatch frames until the session ends; always raises GuestLost."""
        lost: GuestLost | None = None
        try:
            async with trio.open_nursery() as nursery:

                async def guard(part: Callable[[], Awaitable[None]]) -> None:
                    nonlocal lost
                    try:
                        await part()
                    except GuestLost as exc:
                        lost = lost or exc
                        nursery.cancel_scope.cancel()

                nursery.start_soon(guard, self._watch_heartbeat)
                nursery.start_soon(guard, self._read_loop)
        finally:
            self._end(lost or ConnectionLost("supervisor closed the session"))
        assert lost is not None  # both parts only ever end by raising
        raise lost

    async def _read_loop(self) -> None:
        while True:
            try:
                frame = await self._ws.get_message()
            except ChannelClosed as exc:
                raise _closed_reason(exc, self.goodbye) from None
            now = trio.current_time()
            self._last_seen = now
            if not self._bucket.try_take(now):
                raise GuestViolation(
                    f"more than {self._spec.max_messages_per_second:g} messages per second"
                )
            try:
                msg = p.decode_guest(frame)
            except p.ProtocolError as exc:
                raise GuestViolation(str(exc)) from None
            await self._dispatch(msg)

    async def _dispatch(self, msg: p.GuestMessage) -> None:
        match msg:
            case p.Heartbeat():
                pass
            case p.Output(req=req) | p.Exited(req=req):
                channel = self._runs.get(req)
                if channel is None:
                    raise GuestViolation(f"{type(msg).__name__} for unknown request {req}")
                if isinstance(msg, p.Exited):
                    del self._runs[req]
                self._stalled = True
                try:
                    await channel.send(msg)
                except trio.BrokenResourceError:
                    pass  # the caller went away; the guest's output is dropped
                finally:
                    self._stalled = False
                    self._last_seen = trio.current_time()
                if isinstance(msg, p.Exited):
                    channel.close()
            case p.Promoted(name=name):
                event = self._promoted.get(name)
                if event is None:
                    raise GuestViolation(f"promoted as {name!r} without being asked")
                event.set()
            case p.TaskDone(task_id=task_id):
                channel_t = self._tasks.pop(task_id, None)
                if channel_t is None:
                    raise GuestViolation(f"result for unknown task {task_id}")
                channel_t.send_nowait(msg)
            case p.ToolRan(task_id=task_id, tool=tool):
                # What the guest says about a tool run is its own word, kept as
                # such: it may name only a task it holds (0: an IRC turn), never
                # another VM's, and who ran it is the VM's identity, not a field.
                if task_id and task_id not in self._tasks:
                    raise GuestViolation(f"tool run for task {task_id}, which it does not hold")
                if not _TOOL.fullmatch(tool):
                    raise GuestViolation(f"tool run of {tool[:64]!r}, which is not a tool name")
                if self.on_tool_ran is not None:
                    self.on_tool_ran(msg)
            case p.Goodbye():
                self.goodbye = msg
            case p.Hello():
                raise GuestViolation("second Hello")

    async def _watch_heartbeat(self) -> None:
        timeout = self._spec.heartbeat_timeout
        while True:
            deadline = self._last_seen + timeout
            if trio.current_time() >= deadline and not self._stalled:
                raise HeartbeatMissed(f"no heartbeat for {timeout:g}s")
            await trio.sleep_until(max(deadline, trio.current_time() + 0.001))

    def _end(self, exc: GuestLost) -> None:
        if self._lost is None:
            self._lost = exc
        for run in self._runs.values():
            run.close()
        for task in self._tasks.values():
            task.close()
        for event in self._promoted.values():
            event.set()
        self._runs.clear()
        self._tasks.clear()
        self._closed.set()

    def _check(self) -> None:
        if self._lost is not None:
            raise ConnectionLost(f"guest lost: {self._lost.reason}")

    # --- requests, called by the pool while serve() runs ---------------------

    async def run(
        self, argv: list[str], *, user: str = ""
    ) -> AsyncGenerator[p.Output | p.Exited, None]:
        """Run argv in the guest as ``user`` (empty: the agent user): its output as
        it comes, and last its ``Exited``. ConnectionLost if the guest goes away
        first. Leaving early, close it (``contextlib.aclosing``): the request is
        forgotten, and more output for it is a violation, so the VM serves no more."""
        self._check()
        req = next(self._req_ids)
        send, receive = trio.open_memory_channel[p.Output | p.Exited](_RUN_BUFFER)
        self._runs[req] = send
        try:
            await _send(self._ws, p.Run(req=req, argv=argv, user=user))
            async with receive:
                async for msg in receive:
                    yield msg
                    if isinstance(msg, p.Exited):
                        return
        except ChannelClosed:
            pass
        finally:
            self._runs.pop(req, None)
        self._check()
        raise ConnectionLost("guest went away during the run")

    async def promote(self, promote: p.Promote) -> None:
        """Make the guest an agent; returns once it says it is one."""
        self._check()
        done = self._promoted[promote.name] = trio.Event()
        try:
            await _send(self._ws, promote)
            with trio.move_on_after(self._spec.promote_timeout):
                await done.wait()  # also set when the session ends
            self._check()
            if not done.is_set():
                raise GuestViolation(
                    f"no answer to promotion within {self._spec.promote_timeout:g}s"
                )
        except ChannelClosed:
            self._check()
            raise ConnectionLost("guest went away during promotion") from None
        finally:
            self._promoted.pop(promote.name, None)

    async def task(self, task_id: int, prompt: str, resume: str | None = None) -> p.TaskDone:
        """Have the guest serve a task; with ``resume``, ``prompt`` answers the
        question the task's CLI session ``resume`` stopped at."""
        self._check()
        send, receive = trio.open_memory_channel[p.TaskDone](1)
        self._tasks[task_id] = send
        try:
            await _send(self._ws, p.Task(task_id=task_id, prompt=prompt, resume=resume))
            async with receive:
                async for done in receive:
                    return done
        except ChannelClosed:
            pass
        finally:
            self._tasks.pop(task_id, None)
        self._check()
        raise ConnectionLost("guest went away during the task")

    def holds(self, task_id: int) -> bool:
        """Whether the guest said in its Hello that it holds ``task_id`` (and its
        result has not been taken yet)."""
        return task_id in self._held

    async def result(self, task_id: int) -> p.TaskDone:
        """The result of a task the guest holds (``holds``), once it sends it.

        ConnectionLost if the session ends first."""
        receive = self._held.pop(task_id)
        async with receive:
            async for done in receive:
                return done
        self._check()
        raise ConnectionLost("guest went away before the task's result")

    async def cancel(self, reason: str) -> None:
        """End the agent's current turn(s): the guest closes their model streams and
        kills their tool processes; a task so ended comes back as a ``TaskDone`` with
        ``EXIT_CANCELLED``. ConnectionLost if the guest is gone."""
        self._check()
        try:
            await _send(self._ws, p.Cancel(reason=reason[:1024]))
        except (ChannelClosed, trio.BrokenResourceError):
            self._check()
            raise ConnectionLost("guest went away before the cancel") from None

    async def ask_stop(self, reason: str) -> None:
        """Ask the guest to stop; never raises (the stop goes on by force anyway)."""
        if self._lost is None:
            try:
                await _send(self._ws, p.Stop(reason=reason[:1024]))
            except (ChannelClosed, trio.BrokenResourceError):
                pass

    async def closed(self) -> None:
        await self._closed.wait()


async def _receive(ws: Channel) -> bytes | str:
    try:
        return await ws.get_message()
    except ChannelClosed as exc:
        raise _closed_reason(exc, None) from None


async def _send(ws: Channel, msg: p.HostMessage) -> None:
    await ws.send_message(p.encode(msg))


def _closed_reason(exc: ChannelClosed, goodbye: p.Goodbye | None) -> GuestLost:
    if exc.too_large:
        return GuestViolation(f"message too large ({exc.reason})")
    if goodbye is not None:
        return ConnectionLost(f"guest said goodbye: {goodbye.reason or 'no reason'}")
    return ConnectionLost(f"control connection closed ({exc.reason})")
