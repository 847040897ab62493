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

One session with a host (Hello, Welcome, heartbeats, the host's requests)
is host_session.py's; this module opens the channel for it, again after a loss.

The daemon imports nothing from the host side: it ships into VM images.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Final

import trio
from trio_websocket import HandshakeError, open_websocket_url

from . import users
from .channel import ChannelClosed, FramedChannel, WsChannel
from .exits import EX_CONFIG
from .harness import one_line
from .host_session import CLOSE_TIMEOUT, EXIT_FAILED, Session
from .machine import mix_entropy
from .port import Port, PortError, open_port
from .protocol import MAX_FRAME_BYTES, Attach, ProtocolError, decode_host
from .settings import Config, ConfigError, load_config
from .work import Work

log = logging.getLogger("fireclaw.guest_daemon")

#: One dial attempt never takes longer than this (a silent host would
#: otherwise eat the whole connect deadline in one try).
ATTEMPT_TIMEOUT: Final = 5.0
BACKOFF_FIRST: Final = 0.1
#: Inside a VM, how long to dial again after a lost connection before giving up
#: (the VM then powers off): long enough for a supervisor to restart and adopt it.
REDIAL_TIMEOUT: Final = 300.0
BACKOFF_MAX: Final = 2.0


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
