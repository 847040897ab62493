"""The managed IRC server: ngircd as a supervised child of the supervisor.

When ``irc.server`` is ``managed`` the supervisor runs ngircd (the Debian
package) with a config it writes into ``<state_dir>/ircd``::

    ManagedIrcd.run()          nursery.start(): started((host, port)) once ngircd is ready
    └─ one incarnation at a time
       ├─ ngircd -n -f <state_dir>/ircd/ngircd.conf     own session, stdin /dev/null
       └─ drain                its output into <state_dir>/logs/ircd.log, watching
                               for the line that says it is ready
       exit -> RestartTracker -> restart at once, after a backoff, or failed

With a ``registry`` (the state database), each incarnation is in the crash-only
registry as service ``ircd``: recorded before it is started, with its identity
once it runs, dropped once it is reaped. So a supervisor killed with ``kill -9``
leaves a row naming its ngircd, and the next one stops that copy before it
starts its own (``supervisor/services.py``; ``Supervisor.reclaim``).

ngircd facts this module is built on (26.1):

- It never runs as root: started as root with ``ServerUID`` 0 or unset, it
  switches to ``nobody``. So as root we name the Debian ``irc`` account (or
  ``nobody``) ourselves; otherwise ngircd keeps the caller's ids. The config is
  read before the switch, so it stays root-only (it may hold the password).
- Its own ``PidFile`` is created after the switch with ``O_EXCL``: a stale file
  left by a killed ngircd makes it fail, and the unprivileged user would need
  search access to every folder above the state dir. The pid file in the work
  folder is therefore written and removed by us, not by ngircd.
- ``IncludeDir`` defaults to ``/etc/ngircd/ngircd.conf.d``; it is pointed at an
  empty folder of ours so host snippets cannot change the managed server.
- Debian builds it with PAM on by default (every client would need a PAM
  login, and ``Password`` would be ignored) and ``MaxConnectionsIP`` defaults
  to 5, which would lock out the sixth agent behind one address.
- The first channel member becomes channel operator. The swarm's channels are
  predefined (persistent, ``+P``) so that nobody holds operator status there.
- Server links (``cluster.irc``, ``ircd_links``) arrive on any of its ``Ports``
  on any ``Listen`` address: the link's address and port are added to the
  clients' ones. A dialling side that finds its peer down tries again every
  ``ConnectRetry`` seconds (5, ngircd's least; its default is 60).

The config it is given is ``ircd_conf``'s.

Exceptions::

    IrcdError       the first start failed: ngircd missing, the port taken, a config
                    ngircd refuses. str() is one line. Later failures are not raised:
                    they are restarted per ``irc.restart`` and reported as events.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import resource
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Final

import trio
from fireclaw.config.cluster import IrcLinkSpec
from fireclaw.config.irc import IrcSpec, connect_host
from fireclaw.supervisor.ircd_conf import (
    CONNECT_RETRY,
    INCLUDE_DIR,
    MAX_CONNECTIONS,
    render_config,
    server_ids,
)
from fireclaw.supervisor.ircd_links import link_blocks, link_event
from fireclaw.supervisor.ircd_operators import operator_blocks
from fireclaw.supervisor.managed import Exit, ManagedService, OnEvent, describe_exit, stop
from fireclaw.supervisor.secretfile import SecretFileError
from fireclaw.supervisor.state import Store

__all__ = ["CONNECT_RETRY", "IrcdError", "ManagedIrcd", "render_config", "server_ids"]

log = logging.getLogger("fireclaw.supervisor.ircd")

NGIRCD: Final = "ngircd"
SERVICE: Final = "ircd"
"""Its name in the registry of managed services."""
CONF_NAME: Final = "ngircd.conf"
PID_NAME: Final = "ngircd.pid"
LOG_NAME: Final = "ircd.log"

START_TIMEOUT: Final = 10.0
"""Seconds ngircd has to say it is ready; it normally takes a few milliseconds."""
DRAIN_TIMEOUT: Final = 1.0
"""Seconds to read the rest of its output after it exited."""

MAX_LINE: Final = 4096

# Where ngircd looks when PATH lacks the sbin folders (it installs to /usr/sbin).
_SBIN: Final = "/usr/local/sbin:/usr/sbin:/sbin"
_PASSED_ENV: Final = ("PATH", "LANG", "LC_ALL", "TZ")

# ngircd's console log format with -n: "[pid:level uptime] message".
_LOG_LINE_RE: Final = re.compile(r"^\[(?P<pid>\d+):(?P<level>\d+)\s+\d+\] (?P<msg>.*)$")
_READY_RE: Final = re.compile(r'^Server ".*" \(on ".*"\) ready\.$')
_LOG_ERR: Final = 3  # syslog LOG_ERR: this and lower numbers are errors


class IrcdError(Exception):
    """The managed IRC server could not be started. str() is one line."""


class _Watcher:
    """What an incarnation said on its way up (readiness, and its errors), and
    about its server links at any time (to ``on_link(kind, detail)``)."""

    def __init__(self, on_link: Callable[[str, dict[str, str]], None]) -> None:
        self.ready = trio.Event()
        self.errors: list[str] = []
        self.last = ""
        self._on_link = on_link

    def feed(self, line: str) -> None:
        self.last = line or self.last
        m = _LOG_LINE_RE.match(line)
        if m is None:
            return
        if (link := link_event(m["msg"])) is not None:
            self._on_link(*link)
        elif _READY_RE.match(m["msg"]):
            self.ready.set()
        elif int(m["level"]) <= _LOG_ERR and not self.ready.is_set():
            self.errors.append(m["msg"])


class ManagedIrcd(ManagedService):
    """ngircd run, watched and restarted per ``config.restart`` (states, events
    and the registry row ``ircd``: see ``managed``). ``address`` is the
    (host, port) clients on this host connect to.
    ``password``, read from where ``config`` names it (``irc_credentials``), is the
    server password every client must send; it goes into ngircd.conf alone.
    With ``link`` (``cluster.irc``) the server is named for ``host`` in the
    fleet (``server_name``) and links to the peers ``link`` lists; each link
    that comes up, goes down or is refused is an event ``ircd_link_up``,
    ``ircd_link_down`` or ``ircd_link_refused`` naming the ``peer``.
    """

    service = SERVICE
    title = "managed IRC server"

    def __init__(
        self,
        config: IrcSpec,
        state_dir: Path,
        on_event: OnEvent | None = None,
        *,
        password: str | None = None,
        binary: str | None = None,
        uniform: Callable[[float, float], float] = random.uniform,
        registry: Store | None = None,
        link: IrcLinkSpec | None = None,
        host: str = "",
    ) -> None:
        self.config = config
        self._password = password
        self._link = link
        self._host = host
        state_dir = state_dir.absolute()  # ngircd runs in /
        self.workdir = state_dir / "ircd"
        self.log_path = state_dir / "logs" / LOG_NAME
        self.conf_path = self.workdir / CONF_NAME
        self.pid_path = self.workdir / PID_NAME
        self._binary = binary
        super().__init__(config.restart, on_event, registry, uniform)

    @property
    def server_name(self) -> str:
        """This server's name in its IRC network. Raises ValueError when
        ``link`` names a peer so (see ``IrcLinkSpec.server_name_of``)."""
        if self._link is None:
            return self.config.managed.server_name
        return self._link.server_name_of(self._host)

    @property
    def address(self) -> tuple[str, int]:
        managed = self.config.managed
        return connect_host(managed.listen), managed.port

    def status(self) -> dict[str, object]:
        host, port = self.address
        return {
            "state": self.state,
            "address": f"{host}:{port}",
            "pid": self.pid,
            "restarts": self.restarts,
            "reason": self.reason,
        }

    # --- the service -------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run ngircd until cancelled; started(address) once it first accepts clients.

        Raises IrcdError, before started(), when the first start fails. Whatever
        ends this call, no ngircd of ours is left running.
        """
        self._find_binary()
        await trio.to_thread.run_sync(self._write_files)
        await self._supervise(lambda: task_status.started(self.address))

    def _first_failure(self, reason: str) -> IrcdError:
        managed = self.config.managed
        text = f"managed IRC server (ngircd) on {managed.listen}:{managed.port} did not start: "
        text += reason
        if "Address already in use" in reason:
            text += (
                "; another program (the Debian ngircd service?) has the port:"
                " set irc.managed.port, or irc.server to use that server"
            )
        return IrcdError(" ".join(text.split()))

    # --- one incarnation ---------------------------------------------------------

    async def _incarnation(self, on_ready: Callable[[], None]) -> Exit:
        """Start ngircd, wait until it is ready (then call ``on_ready``), then until
        it exits. On cancellation, stops it (TERM, then KILL) first."""
        binary = self._find_binary()
        watcher = _Watcher(self._link_changed)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        log_fd = os.open(self.log_path, flags, 0o640)
        try:
            # Written ahead: a supervisor killed from here on leaves a row, and the
            # copy it may have started is found by its command line.
            self._record(binary, self._address_text(), pid=0)
            try:
                proc = await trio.lowlevel.open_process(
                    [binary, "-n", "-f", str(self.conf_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                    env={k: os.environ[k] for k in _PASSED_ENV if k in os.environ},
                    cwd="/",
                )
            except OSError as exc:
                self._forget()
                return Exit(code=None, reason=f"cannot run {binary}: {exc}")
            try:
                self.pid = proc.pid
                self._record(binary, self._address_text(), pid=proc.pid)
                self._write_pid(proc.pid)
                return await self._watch(proc, watcher, log_fd, on_ready)
            finally:
                with trio.CancelScope(shield=True):
                    await stop(proc)
                    self.pid = None
                    with contextlib.suppress(FileNotFoundError):
                        self.pid_path.unlink()
                    self._forget()  # reaped: nothing of it is left to reclaim
        finally:
            os.close(log_fd)

    def _link_changed(self, kind: str, detail: dict[str, str]) -> None:
        """``ircd_link_up``, ``ircd_link_down`` or ``ircd_link_refused``: the peer
        named, the password never (ngircd does not log it)."""
        log.info("managed IRC server: %s %s", kind.replace("_", " "), " ".join(detail.values()))
        self._event(kind, **detail)

    def _address_text(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def _watch(
        self, proc: trio.Process, watcher: _Watcher, log_fd: int, on_ready: Callable[[], None]
    ) -> Exit:
        exited = trio.Event()
        assert proc.stdout is not None
        stdout = proc.stdout

        async def reap() -> None:
            await proc.wait()
            exited.set()

        async with trio.open_nursery() as nursery:
            drain_scope = trio.CancelScope()
            nursery.start_soon(self._drain, stdout, watcher, log_fd, drain_scope)
            nursery.start_soon(reap)
            with trio.move_on_after(START_TIMEOUT):
                await _wait_any(watcher.ready, exited)
            ready = watcher.ready.is_set()
            if ready and not exited.is_set():
                self._ready(proc.pid)
                log.info("managed IRC server ready on %s:%d (pid %d)", *self.address, proc.pid)
                on_ready()
            elif not exited.is_set():
                await stop(proc)
                await exited.wait()
                drain_scope.cancel()
                return Exit(code=None, reason=f"not ready within {START_TIMEOUT:g}s; killed")
            await exited.wait()
            # Its output may still be in the pipe: read it, briefly, for the reason.
            drain_scope.deadline = trio.current_time() + DRAIN_TIMEOUT
        code = proc.returncode
        assert code is not None
        reason = describe_exit(code)
        if not ready and (watcher.errors or watcher.last):
            reason = watcher.errors[0] if watcher.errors else watcher.last
        return Exit(code=code if code >= 0 else None, reason=reason)

    async def _drain(
        self,
        stream: trio.abc.ReceiveStream,
        watcher: _Watcher,
        log_fd: int,
        scope: trio.CancelScope,
    ) -> None:
        """Copy ngircd's output into the log file, line by line through ``watcher``."""
        pending = b""
        with scope:
            while chunk := await stream.receive_some(65536):
                _write_all(log_fd, chunk)
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    watcher.feed(line[:MAX_LINE].decode("utf-8", "replace").rstrip("\r"))
                pending = pending[-MAX_LINE:]
        with contextlib.suppress(trio.ClosedResourceError):
            await stream.aclose()

    # --- files -------------------------------------------------------------------

    def _find_binary(self) -> str:
        if self._binary is not None:
            return self._binary
        path = os.pathsep.join(p for p in (os.environ.get("PATH", ""), _SBIN) if p)
        found = shutil.which(NGIRCD, path=path)
        if found is None:
            raise IrcdError(
                "ngircd not found: install the Debian package ngircd, or set irc.server"
                " to an external host:port"
            )
        self._binary = found
        return found

    def _write_files(self) -> None:
        """The work folder (root-only: the config holds the operator passwords), an
        empty IncludeDir, the config and the log folder. Each operator's password
        comes from its file (``ircd_operators``), and so does each peer's link
        password (``ircd_links``); one that cannot be used is an ``IrcdError``."""
        managed = self.config.managed
        link = self._link
        try:
            operators = operator_blocks(managed.operators, self.workdir.parent)
            server_name = self.server_name
            links = [] if link is None else link_blocks(link, server_name)
        except SecretFileError as exc:
            raise IrcdError(str(exc)) from None
        except ValueError as exc:  # only a cluster's server can be misnamed
            raise IrcdError(f"cluster.irc.{exc}") from None
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o700)
        (self.workdir / INCLUDE_DIR).mkdir(exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = MAX_CONNECTIONS if soft == resource.RLIM_INFINITY else soft - 32
        text = render_config(
            workdir=self.workdir,
            listen=managed.listen,
            port=managed.port,
            server_name=server_name,
            network=managed.network,
            password=self._password,
            max_nick_length=managed.max_nick_length,
            channels=(
                (self.config.control_channel, "fireclaw-swarm: commands for the overseer"),
                (self.config.agents_channel, "fireclaw-swarm: the agents"),
            ),
            operators=operators,
            links=links,
            link_address=None if link is None else (link.listen, link.port),
            max_connections=max(16, min(MAX_CONNECTIONS, limit)),
        )
        tmp = self.conf_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        tmp.replace(self.conf_path)

    def _write_pid(self, pid: int) -> None:
        fd = os.open(self.pid_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, f"{pid}\n".encode())
        finally:
            os.close(fd)


async def _wait_any(*events: trio.Event) -> None:
    """Return as soon as one of ``events`` is set."""
    async with trio.open_nursery() as nursery:

        async def one(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        for event in events:
            nursery.start_soon(one, event)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
