"""A real ngircd on a free loopback port, for tests.

::

    async with ircd_server(password=None, nicklen=30) as ircd:
        ircd.host, ircd.port          where it listens (127.0.0.1, a free port)
        ircd.lines                    everything it printed, every incarnation
        await ircd.kill()             SIGKILL, reaped: the server vanishes mid-conversation
        await ircd.start()            start it again on the same port
        await ircd.stop()             SIGTERM, reaped (SIGKILL after STOP_TIMEOUT)
    # stopped, its folder removed

ngircd runs in the foreground (``-n``) with a config written into a fresh
folder under the system temp dir, and logs to its stdout, which is drained
continuously (a full pipe would block the server). It is ready when it says
``Server "NAME" (on "HOST") ready.``, right after ``Now listening on ...``;
every start waits for that line with a deadline.

Started as root, ngircd switches to ``ServerUID``/``ServerGID`` (``nobody``
here) before it creates its ``PidFile`` with ``O_EXCL``; so the folder belongs
to that user and a pid file left by a killed incarnation is removed before the
next start.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import trio

NGIRCD: Final = shutil.which("ngircd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
START_TIMEOUT: Final = 10.0
STOP_TIMEOUT: Final = 5.0
HOST: Final = "127.0.0.1"
SERVER_NAME: Final = "irc.fireclaw.test"


class IrcdError(Exception):
    """ngircd did not start; ``str()`` is one line with its last words."""


class PortTaken(IrcdError):
    pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def render_config(
    workdir: Path, port: int, *, password: str | None, nicklen: int, user: pwd.struct_passwd | None
) -> str:
    lines = [
        "[Global]",
        f"Name = {SERVER_NAME}",
        "Info = fireclaw test server",
        "AdminInfo1 = fireclaw tests",
        "AdminInfo2 = loopback only",
        "AdminEMail = nobody@localhost",
        f"Listen = {HOST}",
        f"Ports = {port}",
        "MotdPhrase = fireclaw test server",
        f"PidFile = {workdir / 'ngircd.pid'}",
    ]
    if user is not None:
        lines += [f"ServerUID = {user.pw_uid}", f"ServerGID = {user.pw_gid}"]
    if password is not None:
        lines.append(f"Password = {password}")
    lines += [
        "[Limits]",
        "MaxConnectionsIP = 0",
        f"MaxNickLength = {nicklen}",
        "[Options]",
        "DNS = no",
        "Ident = no",
        "PAM = no",
        f"IncludeDir = {workdir / 'conf.d'}",
    ]
    return "\n".join(lines) + "\n"


class Ircd:
    """One ngircd configuration; ``start`` runs an incarnation of it."""

    def __init__(self, nursery: trio.Nursery, workdir: Path, port: int, config: str) -> None:
        self.host = HOST
        self.port = port
        self.workdir = workdir
        self.lines: list[str] = []
        self.process: trio.Process | None = None
        self._nursery = nursery
        self._conf = workdir / "ngircd.conf"
        self._conf.write_text(config)
        self._conf.chmod(0o600)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def saw(self, text: str) -> bool:
        """Whether any incarnation printed a line containing ``text``."""
        return any(text in line for line in self.lines)

    async def start(self) -> None:
        """Start ngircd and wait until it listens; IrcdError if it does not."""
        assert NGIRCD is not None, "ngircd is not installed"
        if self.process is not None and self.process.returncode is None:
            raise IrcdError("ngircd is already running")
        (self.workdir / "ngircd.pid").unlink(missing_ok=True)
        process = await trio.lowlevel.open_process(
            [NGIRCD, "-n", "-f", str(self._conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.process = process
        ready, ended = trio.Event(), trio.Event()
        first = len(self.lines)
        self._nursery.start_soon(self._drain, process, ready, ended)
        with trio.move_on_after(START_TIMEOUT):
            async with trio.open_nursery() as waiting:

                async def watch(event: trio.Event) -> None:
                    await event.wait()
                    waiting.cancel_scope.cancel()

                waiting.start_soon(watch, ready)
                waiting.start_soon(watch, ended)
        if ready.is_set():
            return
        await self.kill()
        said = [line for line in self.lines[first:] if line.strip()]
        last = said[-1] if said else "no output"
        if any("Can't bind socket" in line for line in said):
            raise PortTaken(f"ngircd cannot listen on {self.host}:{self.port}: {last}")
        raise IrcdError(f"ngircd did not become ready within {START_TIMEOUT:g}s: {last}")

    async def _drain(self, process: trio.Process, ready: trio.Event, ended: trio.Event) -> None:
        assert process.stdout is not None
        partial = b""
        async with process.stdout:
            while chunk := await process.stdout.receive_some(65536):
                *complete, partial = (partial + chunk).split(b"\n")
                for raw in complete:
                    line = raw.decode("utf-8", "replace")
                    self.lines.append(line)
                    if line.endswith(" ready.") and "Server " in line:
                        ready.set()
        ended.set()

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; reaped either way."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_TIMEOUT):
            await process.wait()
        await self.kill()

    async def kill(self) -> None:
        """SIGKILL and reap: the server disappears without a word to its clients."""
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


def _server_user() -> pwd.struct_passwd | None:
    """The account ngircd switches to when started as root (None otherwise)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return pwd.struct_passwd(("nobody", "x", 65534, 65534, "", "/", "/bin/false"))


@asynccontextmanager
async def ircd_server(*, password: str | None = None, nicklen: int = 30) -> AsyncIterator[Ircd]:
    """A running ngircd on a free port of 127.0.0.1; stopped and removed on exit."""
    user = _server_user()
    workdir = Path(tempfile.mkdtemp(prefix="fireclaw-test-ircd-"))
    try:
        (workdir / "conf.d").mkdir()
        if user is not None:
            os.chown(workdir, user.pw_uid, user.pw_gid)
        async with trio.open_nursery() as nursery:
            for _attempt in range(5):  # another test may grab the port between probe and bind
                port = free_port()
                config = render_config(workdir, port, password=password, nicklen=nicklen, user=user)
                ircd = Ircd(nursery, workdir, port, config)
                try:
                    await ircd.start()
                except PortTaken:
                    continue
                break
            else:
                raise IrcdError("no free port for ngircd after 5 attempts")
            try:
                yield ircd
            finally:
                with trio.CancelScope(shield=True):
                    await ircd.stop()
                nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
