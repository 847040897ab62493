"""The guest daemon: dials the host, says hello, heartbeats, serves requests.

Entry point: ``main(argv)`` (``python -m fireclaw.guest_daemon``), which
returns the process exit code:

* 0  stopped: the host sent ``Stop`` (or the daemon got SIGTERM/SIGINT);
     children were ended, ``Goodbye`` was sent, the socket closed cleanly.
* 1  the host could not be reached before the connect deadline, the
     connection was lost or closed without ``Stop``, or the host sent a frame
     that is not a valid message. Children were ended.
     Inside a VM (configuration read with ``--cmdline``) a lost or closed
     connection does not end the daemon: it ends the commands it was running
     for that host, dials the same URL again (same backoff, for up to
     ``REDIAL_TIMEOUT``) and starts over with Hello, because a VM restored
     from a snapshot wakes up with a dead connection and must reach the
     listener of the supervisor that restored it, and a VM whose supervisor
     crashed is adopted by the next one. A promoted agent's work (its
     harnesses, tasks and IRC presence: ``work.Work``) goes on meanwhile; the
     next Hello says what it is and the results held back are sent then.
* 78 missing or invalid configuration (EX_CONFIG), one line on stderr.

With a virtio-serial port (``fireclaw.port=NAME``, under QEMU) the daemon
dials nothing: it opens the port once and hosts come to it. Each host that
connects says ``Attach`` first and gets a Hello; a host that goes away (EOF)
or is replaced by another (a VM restored from a snapshot: its new QEMU's host
attaches before the guest runs again) ends the session as a lost connection
does above, and the daemon serves the next host on the same port. ``Hello.dials``
says how often the channel was opened: one, for the life of a port.

Configuration (settings.py), lowest precedence first: the environment
(``FIRECLAW_CONTROL_URL``, ``FIRECLAW_VM_ID``, ``FIRECLAW_TOKEN``), then a
kernel command line read with ``--cmdline FILE`` (``fireclaw.url=``,
``fireclaw.vm_id=``, ``fireclaw.token=``), then ``--url``, ``--vm-id`` and
``--token``. What a ``Welcome`` asks of the machine is in machine.py. The
clock is set from ``Welcome`` only when ``FIRECLAW_SET_CLOCK=1``, which only a
VM image sets. Agent work runs as the user ``users.agent_user`` picks
(``FIRECLAW_AGENT_USER`` names one; a name that does not exist is a
configuration error).

Exceptions: ``settings.ConfigError`` for bad or missing configuration (exit 78).
Everything that goes wrong after configuration is an exit code, not an
exception: ``protocol.ProtocolError`` and trio-websocket's errors are caught
where they happen and end the session.

The daemon imports nothing from the host side: it ships into VM images.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Final

import trio
from trio_websocket import HandshakeError, open_websocket_url

from . import users, workspace
from .agent_irc import AgentPresence, Draft
from .channel import Channel, ChannelClosed, FramedChannel, WsChannel
from .exits import EX_CONFIG
from .harness import Children, Identity, one_line, run_command
from .machine import mix_entropy, set_clock, set_hostname
from .port import Port, PortError, open_port
from .protocol import (
    MAX_FRAME_BYTES,
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
from .settings import Config, ConfigError, load_config
from .work import KILL_GRACE, REPORT_GRACE, Work

log = logging.getLogger("fireclaw.guest_daemon")

EXIT_STOPPED: Final = 0
EXIT_FAILED: Final = 1

#: Messages queued for the writer before senders wait: the backpressure.
OUTBOX_SIZE: Final = 16
#: How long the last messages and the close handshake may take.
CLOSE_TIMEOUT: Final = 5.0
#: One dial attempt never takes longer than this (a silent host would
#: otherwise eat the whole connect deadline in one try).
ATTEMPT_TIMEOUT: Final = 5.0
BACKOFF_FIRST: Final = 0.1
#: Inside a VM, how long to dial again after a lost connection before giving up
#: (the VM then powers off): long enough for a supervisor to restart and adopt it.
REDIAL_TIMEOUT: Final = 300.0
BACKOFF_MAX: Final = 2.0

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


# --- connecting and main -------------------------------------------------------


async def serve(config: Config, environ: Mapping[str, str]) -> int:
    """Dial the host and run a session; inside a VM, again after each lost connection.
    With a port, open it once and serve each host that attaches to it."""
    async with trio.open_nursery() as jobs:
        user = config.agent_user or users.lookup_self()
        work = Work(environ, jobs, keep=config.redial, user=user)
        if config.port is not None:
            code = await _serve_port(config, config.port, work)
        else:
            code = await _dial(config, work)
        await work.end("lost the supervisor")  # already done unless dialling gave up
        jobs.cancel_scope.cancel()
    return code


async def _dial(config: Config, work: Work) -> int:
    patience = config.connect_timeout
    dials = 0
    while True:
        code, lost, dials = await _dial_and_run(config, work, patience, dials)
        if not (lost and config.redial):
            return code
        log.warning("connection to %s lost; dialling again", config.url)
        patience = max(patience, REDIAL_TIMEOUT)


async def _serve_port(config: Config, name: str, work: Work) -> int:
    """Open the port ``name`` once and run a session with each host that attaches;
    never dial. A session ends as lost when its host goes (EOF: the supervisor
    died, or the VM's QEMU was replaced) or another host attaches (a restored
    clone: its new host is there before the guest runs again)."""
    try:
        async with open_port(name) as port:
            log.info("serving port %s", name)
            channel = FramedChannel(port.stream, MAX_FRAME_BYTES, owns_stream=False)
            attach: Attach | None = None
            patience = config.connect_timeout
            while True:
                if attach is None:
                    with trio.move_on_after(patience):
                        attach, channel = await _next_host(port, channel)
                    if attach is None:
                        log.error("no host attached to port %s within %gs", name, patience)
                        return EXIT_FAILED
                session = Session(channel, config, work, dials=1)
                code = await session.run()
                if not (session.lost and config.redial):
                    return code
                attach = session.attach
                log.warning("host on port %s %s", name, "replaced" if attach else "lost")
                patience = max(patience, REDIAL_TIMEOUT)
    except PortError as exc:
        log.error("%s", exc)
        return EXIT_FAILED


async def _next_host(port: Port, channel: FramedChannel) -> tuple[Attach, FramedChannel]:
    """Wait for a host to attach to ``port``; its Attach and the channel it is on.

    What comes before an Attach is the rest of a host that has gone: passed over."""
    while True:
        await port.host_here()
        try:
            frame = await channel.get_message()
        except ChannelClosed:  # that host went away; the next starts on a frame boundary
            channel = FramedChannel(port.stream, MAX_FRAME_BYTES, owns_stream=False)
            continue
        try:
            msg = decode_host(frame)
        except ProtocolError:
            continue
        if isinstance(msg, Attach):
            mix_entropy(msg.entropy)
            return msg, channel


async def _dial_and_run(
    config: Config, work: Work, patience: float, dials: int
) -> tuple[int, bool, int]:
    """Dial the host (retrying for ``patience`` seconds), then run one session.

    Returns the exit code, whether the session ended because the connection
    was lost, and the dials made so far (``dials`` before this call).
    """
    deadline = trio.current_time() + patience
    delay = BACKOFF_FIRST
    attempts = 0
    while True:
        attempts += 1
        code: int | None = None
        try:
            attempt = min(ATTEMPT_TIMEOUT, max(0.0, deadline - trio.current_time()))
            # trio-websocket's connect_timeout does not cover the HTTP upgrade: a host
            # that accepts the TCP connection but answers late would hold us past every
            # deadline. This scope bounds connect and upgrade, and is lifted once in.
            with trio.CancelScope(deadline=trio.current_time() + attempt) as connecting:
                async with open_websocket_url(
                    config.url,
                    max_message_size=MAX_FRAME_BYTES,
                    connect_timeout=attempt,
                    disconnect_timeout=CLOSE_TIMEOUT,
                ) as ws:
                    connecting.deadline = math.inf
                    dials += 1
                    log.info("connected to %s", config.url)
                    session = Session(WsChannel(ws), config, work, dials=dials)
                    code = await session.run()
            if connecting.cancelled_caught and code is None:
                raise TimeoutError(f"no WebSocket upgrade within {attempt:g}s")
        except (HandshakeError, OSError) as exc:
            if code is not None:
                return code, session.lost, dials  # the session is over; only the close was untidy
            error = one_line(str(exc.__cause__ or exc) or type(exc).__name__, 200)
            left = deadline - trio.current_time()
            if left <= 0:
                log.error(
                    "cannot reach the host at %s after %d attempts in %gs: %s",
                    config.url,
                    attempts,
                    patience,
                    error,
                )
                return EXIT_FAILED, False, dials
            log.debug("dial %s failed (%s); retrying in %.1fs", config.url, error, delay)
            await trio.sleep(min(delay, left))
            delay = min(delay * 2, BACKOFF_MAX)
        else:
            assert code is not None
            return code, session.lost, dials


def main(argv: Sequence[str] | None = None) -> int:
    """Run the guest daemon; returns the process exit code."""
    try:
        config = load_config(sys.argv[1:] if argv is None else argv, os.environ)
    except ConfigError as exc:
        print(f"fireclaw guest daemon: {exc}", file=sys.stderr)
        return EX_CONFIG
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format=f"%(asctime)s {config.vm_id} %(levelname)s %(message)s",
    )
    logging.getLogger("trio-websocket").setLevel(logging.WARNING)
    try:
        return trio.run(serve, config, dict(os.environ))
    except KeyboardInterrupt:  # SIGINT while dialling, before any child exists
        return 128 + signal.SIGINT
