"""The guest daemon's session: one conversation with a host over an open channel.

``Session(channel, config, work).run()`` says Hello, takes the Welcome,
heartbeats and serves the host's messages (``Run``, ``Task``, ``Cancel``,
``Promote``, ``Welcome``, ``Stop``) until the host stops it, the channel is
lost, or another host attaches to the port; it returns the exit code
(``EXIT_STOPPED`` or ``EXIT_FAILED``) and never raises for anything the host or
the children do. How the channel is opened, and opened again after a loss,
is ``daemon.py``'s.

The daemon imports nothing from the host side: it ships into VM images.
"""

from __future__ import annotations

import logging
import os
import signal
from functools import partial
from typing import Final

import trio

from . import workspace
from .agent_irc import AgentPresence, Draft
from .channel import Channel, ChannelClosed
from .harness import Children, Identity, one_line, run_command
from .machine import mix_entropy, set_clock, set_hostname
from .protocol import (
    PROTOCOL_VERSION,
    Attach,
    Cancel,
    Goodbye,
    GuestMessage,
    Heartbeat,
    Hello,
    HostMessage,
    Promote,
    Promoted,
    ProtocolError,
    Run,
    Stop,
    Task,
    TaskDone,
    Welcome,
    decode_host,
    encode,
)
from .settings import Config
from .work import KILL_GRACE, REPORT_GRACE, Work

log = logging.getLogger("fireclaw.guest_daemon")

#: The exit codes a session ends with, the daemon's own (daemon.py says when).
EXIT_STOPPED: Final = 0
EXIT_FAILED: Final = 1

#: Messages queued for the writer before senders wait: the backpressure.
OUTBOX_SIZE: Final = 16
#: How long the last messages and the close handshake may take.
CLOSE_TIMEOUT: Final = 5.0

# WebSocket close codes (RFC 6455).
_CLOSE_NORMAL: Final = 1000
_CLOSE_PROTOCOL_ERROR: Final = 1002

#: Seconds an IRC answer may take beyond the harness timeout.
ANSWER_MARGIN: Final = 5.0


# --- the session -----------------------------------------------------------------


class Session:
    """One conversation with the host over an open channel.

    Every outgoing message goes through one memory channel to one writer
    task, so frames never interleave and a slow host slows the senders down.
    ``run()`` returns the exit code; it does not raise for anything the host
    or the children do. ``dials``: how often this daemon has opened a channel
    (said in Hello). On a port, an ``Attach`` (a new host) ends the session as
    lost and is kept in ``attach`` for the next one.
    """

    def __init__(self, ws: Channel, config: Config, work: Work, *, dials: int = 1):
        self._ws = ws
        self._config = config
        self._work = work
        self._dials = dials
        self.attach: Attach | None = None
        self._send, self._outbox = trio.open_memory_channel[GuestMessage](OUTBOX_SIZE)
        self._runs = Children()  # this host's commands: they end with the session
        self._talk = trio.CancelScope()
        self._outcome: tuple[int, str] | None = None
        self._connected = True
        self.lost = False  # the session ended because the connection went away

    async def run(self) -> int:
        async with trio.open_nursery() as outer:
            outer.start_soon(self._write_loop)
            async with trio.open_nursery() as jobs:
                await self._converse(jobs)
                assert self._outcome is not None
                code, reason = self._outcome
                async with trio.open_nursery() as ending:
                    ending.start_soon(self._runs.terminate, KILL_GRACE)
                    if self.lost and self._work.keep:
                        self._work.detach()  # the agent works on; the next session reports
                    else:
                        why = reason if code == EXIT_STOPPED else "lost the supervisor"
                        ending.start_soon(self._work.end, one_line(f"stopping: {why}", 200))
                # Runs whose children died report Exited, and tasks TaskDone, before Goodbye.
                jobs.cancel_scope.deadline = trio.current_time() + REPORT_GRACE
            self._work.detach()
            if code == EXIT_STOPPED:
                await self._send.send(Goodbye(reason=reason))
            await self._send.aclose()
            outer.cancel_scope.deadline = trio.current_time() + CLOSE_TIMEOUT
        with trio.move_on_after(CLOSE_TIMEOUT):
            if code == EXIT_STOPPED:
                await self._ws.aclose(_CLOSE_NORMAL, "stopped")
            else:  # a no-op when the connection is already gone
                await self._ws.aclose(_CLOSE_PROTOCOL_ERROR, "protocol error")
        if code == EXIT_STOPPED:
            log.info("stopped: %s", reason or "asked by the host")
        else:
            log.error("%s", reason)
        return code

    def _end(self, code: int, reason: str) -> None:
        """Finish the conversation; the first reason given is the one that counts."""
        if self._outcome is None:
            self._outcome = (code, reason)
        self._talk.cancel()

    async def _converse(self, jobs: trio.Nursery) -> None:
        """Hello, Welcome, then serve host messages until ``_end`` is called."""
        with self._talk:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_signals)
                await self._send.send(
                    Hello(
                        vm_id=self._config.vm_id,
                        token=self._config.token,
                        version=PROTOCOL_VERSION,
                        pid=os.getpid(),
                        resume=self._work.resume(),
                        dials=self._dials,
                    )
                )
                first: HostMessage | None = None
                with trio.move_on_after(self._config.connect_timeout) as waiting:
                    first = await self._receive()
                if waiting.cancelled_caught:
                    self._end(EXIT_FAILED, "no welcome from the host after hello")
                match first:
                    case Welcome():
                        self._welcome(first)
                        nursery.start_soon(self._heartbeat, first.heartbeat_interval)
                        # Results held back while no host listened go first.
                        for done in self._work.attach(self._send.send):
                            await self._send.send(done)
                    case Stop():
                        self._end(EXIT_STOPPED, first.reason)
                    case None:
                        pass
                    case _:
                        self._end(EXIT_FAILED, f"expected welcome, got {type(first).__name__}")
                while (msg := await self._receive()) is not None:
                    await self._dispatch(msg, jobs)
        if self._outcome is None:  # pragma: no cover - _talk is only cancelled by _end
            self._outcome = (EXIT_FAILED, "session ended without a reason")

    async def _receive(self) -> HostMessage | None:
        """The next host message, or None once the session has ended."""
        try:
            frame = await self._ws.get_message()
        except ChannelClosed as exc:
            self.lost = self.lost or self._outcome is None
            self._end(EXIT_FAILED, f"connection closed by the host without stop ({exc.reason})")
            return None
        try:
            msg = decode_host(frame)
        except ProtocolError as exc:
            self._end(EXIT_FAILED, one_line(f"bad frame from the host: {exc}"))
            return None
        if isinstance(msg, Attach):
            # Another host on the port (this VM was restored, or its supervisor
            # restarted): diverge at once, then start over with it.
            mix_entropy(msg.entropy)
            self.attach = msg
            self.lost = self.lost or self._outcome is None
            self._end(EXIT_FAILED, "another host attached to the port")
            return None
        return msg

    async def _dispatch(self, msg: HostMessage, jobs: trio.Nursery) -> None:
        match msg:
            case Run():
                turns = self._work.turns
                jobs.start_soon(
                    partial(run_command, user=turns.user, cwd=turns.workdir),
                    msg,
                    self._send.send,
                    self._runs,
                    self._work.env,
                )
            case Task():
                self._work.run_task(msg)
            case Cancel():
                ended = self._work.turns.cancel(msg.reason)
                log.info("cancel: %d turn(s) ended (%s)", ended, msg.reason or "no reason")
            case Promote():
                held = self._work.identity
                again = held is not None
                if held is not None and held.workspace is not None and msg.workspace:
                    workspace: str | None = held.workspace  # mounted already, by this daemon
                else:
                    workspace = await self._workspace(msg)
                self._work.promote(Identity.from_promote(msg, workspace=workspace))
                log.info(
                    "%s as %s (role %s, model %s)",
                    "re-identified" if again else "promoted",
                    msg.name,
                    msg.role,
                    msg.model or "-",
                )
                self._join_irc(msg)
                await self._send.send(Promoted(name=msg.name))
            case Welcome():
                self._welcome(msg)
            case Stop():
                self._end(EXIT_STOPPED, msg.reason)

    async def _workspace(self, msg: Promote) -> str | None:
        """Mount the workspace disk the promotion says is attached (inside a VM only)."""
        if not msg.workspace or not self._config.set_clock:
            return None
        try:
            return await trio.to_thread.run_sync(workspace.mount)
        except workspace.WorkspaceError as exc:
            log.warning("workspace: %s; working without it", exc)
            return None

    def _join_irc(self, msg: Promote) -> None:
        """Be on IRC as the promotion says: join, retune, or stay off."""
        if msg.irc is None:
            return
        work = self._work
        if work.presence is None:
            work.presence = AgentPresence(
                msg.irc, partial(_answer, work), answer_timeout=msg.harness.timeout + ANSWER_MARGIN
            )
            work.start(work.presence.run)
        else:
            work.presence.retune(msg.irc)

    def _welcome(self, msg: Welcome) -> None:
        mix_entropy(msg.entropy)
        if self._config.set_clock:  # only inside a VM: never the host's clock or name
            set_clock(msg.unix_time)
            if msg.hostname:
                set_hostname(msg.hostname)
        log.info("welcomed; heartbeat every %gs", msg.heartbeat_interval)

    async def _heartbeat(self, interval: float) -> None:
        seq = 0
        next_beat = trio.current_time()
        while True:
            await self._send.send(Heartbeat(seq=seq))
            seq += 1
            next_beat = max(next_beat + interval, trio.current_time())
            await trio.sleep_until(next_beat)

    async def _write_loop(self) -> None:
        """The one writer. After the connection breaks it keeps draining (and
        dropping, but a task's result goes back to the work) so that no sender
        waits forever."""
        async with self._outbox:
            async for msg in self._outbox:
                if self._connected:
                    try:
                        await self._ws.send_message(encode(msg))
                        continue
                    except ChannelClosed as exc:
                        self._connected = False
                        self.lost = self.lost or self._outcome is None
                        self._end(EXIT_FAILED, f"connection lost ({exc.reason})")
                if isinstance(msg, TaskDone):
                    self._work.undelivered(msg)

    async def _watch_signals(self) -> None:
        """SIGTERM or SIGINT stops like a ``Stop``, so children never outlive us."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                self._end(EXIT_STOPPED, f"signal {signal.Signals(signum).name}")
                return


async def _answer(work: Work, sender: str, where: str, text: str, draft: Draft) -> str:
    """What the agent says on IRC: its harness (or its model), asked the message,
    its answer written to ``draft`` as the model streams it; a tool call shows
    beside the answer as one NOTICE line."""

    async def notice(to: str, where: str, line: str) -> None:
        if work.presence is not None:
            await work.presence.notice(to, where, line)

    return await work.turns.answer(sender, where, text, notice, draft)
