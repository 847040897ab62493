"""fireclaw.supervisor.ircd: the managed ngircd, against the real ngircd binary."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import psutil
import pytest
import trio
from fireclaw.config import Backoff, IrcSpec, ManagedIrcSpec, RestartPolicy
from fireclaw.supervisor.ircd import (
    START_TIMEOUT,
    IrcdError,
    ManagedIrcd,
    render_config,
    server_ids,
)

#: How long a test waits for ngircd to be up (or restarted, after a backoff of at
#: most a few seconds): the supervisor's own start timeout, with headroom for a
#: loaded machine, so that a slow start fails in the product, not in the test.
WAIT = 3 * START_TIMEOUT

NGIRCD = shutil.which("ngircd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
pytestmark = pytest.mark.skipif(NGIRCD is None, reason="ngircd is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def spec(port: int, **fields: object) -> IrcSpec:
    return IrcSpec(managed=ManagedIrcSpec(port=port), **fields)  # type: ignore[arg-type]


class Events:
    """An on_event callback that tests can wait on."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, object]]] = []
        self._changed = trio.Event()

    def __call__(self, kind: str, subject: str, detail: dict[str, object]) -> None:
        self.seen.append((kind, subject, detail))
        self._changed.set()
        self._changed = trio.Event()

    def of(self, kind: str) -> list[dict[str, object]]:
        return [detail for k, _, detail in self.seen if k == kind]

    async def wait_for(self, kind: str, count: int = 1) -> None:
        while len(self.of(kind)) < count:
            await self._changed.wait()


async def register(address: tuple[str, int], nick: str) -> trio.SocketStream:
    """Connect and register as ``nick``; return the stream once 001 arrived."""
    stream = await trio.open_tcp_stream(*address)
    await stream.send_all(f"NICK {nick}\r\nUSER {nick} 0 * :{nick}\r\n".encode())
    received = b""
    while f" 001 {nick} ".encode() not in received:
        data = await stream.receive_some(4096)
        assert data, f"{nick}: connection closed before 001: {received!r}"
        received += data
    return stream


async def read_until(stream: trio.SocketStream, marker: bytes) -> bytes:
    received = b""
    while marker not in received:
        data = await stream.receive_some(4096)
        assert data, f"connection closed before {marker!r}: {received!r}"
        received += data
    return received


def ngircd_of(conf: Path) -> list[psutil.Process]:
    """ngircd processes started with ``conf``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if str(conf) in (proc.info["cmdline"] or []):
            found.append(proc)
    return found


# --- the config ----------------------------------------------------------------


def test_render_config_passes_configtest(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    conf = tmp_path / "ngircd.conf"
    conf.write_text(
        render_config(
            workdir=tmp_path,
            listen="127.0.0.1",
            port=6667,
            server_name="irc.fireclaw.local",
            network="fireclaw",
            password="s3cret!",
            max_nick_length=30,
            channels=[("#control", "commands"), ("#agents", "the agents")],
        )
    )
    assert NGIRCD is not None
    out = subprocess.run(
        [NGIRCD, "--configtest", "-f", str(conf)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # ngircd lists every complaint as " - <what>" before the dump.
    assert [line for line in out.stdout.splitlines() if line.startswith(" - ")] == []
    dump: dict[str, str] = {}  # [GLOBAL], [LIMITS] and [OPTIONS] have no key in common
    for line in out.stdout.splitlines():
        if line.startswith("[SSL]"):
            break
        key, sep, value = line.partition(" = ")
        if sep:
            dump[key.strip()] = value
    assert dump["MaxConnectionsIP"] == "0"
    assert dump["MaxNickLength"] == "30"
    assert dump["PAM"] == "no" and dump["DNS"] == "no"
    assert dump.get("Ident", "no") == "no"  # this build does not list it; no complaint above
    assert dump["AllowRemoteOper"] == "no"
    assert dump["IncludeDir"] == str(tmp_path / "conf.d")
    assert dump["Password"] == "s3cret!"
    assert dump["Ports"] == "6667" and dump["Listen"] == "127.0.0.1"
    assert "#control" in out.stdout and "#agents" in out.stdout
    if os.getuid() == 0:
        assert dump["ServerUID"] not in ("root", "0")


def test_render_config_refuses_line_breaks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="line breaks"):
        render_config(
            workdir=tmp_path,
            listen="127.0.0.1",
            port=6667,
            server_name="irc.x",
            network="n",
            password="a\nPorts = 1",
            max_nick_length=30,
        )


def test_server_ids_never_root() -> None:
    uid, gid = server_ids()
    if os.getuid() == 0:
        assert uid != 0 and gid != 0
    else:
        assert (uid, gid) == (os.getuid(), os.getgid())


# --- the service -----------------------------------------------------------------


async def test_starts_and_registers_a_client(tmp_path: Path) -> None:
    port = free_port()
    events = Events()
    ircd = ManagedIrcd(spec(port), tmp_path, events)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT):
            address = await nursery.start(ircd.run)
        assert address == ("127.0.0.1", port) == ircd.address
        assert ircd.state == "running" and ircd.restarts == 0
        assert ircd.pid is not None
        assert (tmp_path / "ircd" / "ngircd.pid").read_text() == f"{ircd.pid}\n"
        assert (tmp_path / "ircd" / "ngircd.conf").stat().st_mode & 0o077 == 0
        with trio.fail_after(WAIT):
            stream = await register(address, "alice")
            # The swarm's channels exist from the start, and joining gives no chanop.
            await stream.send_all(b"JOIN #control\r\n")
            names = await read_until(stream, b" 366 ")
        assert b"= #control :alice\r\n" in names
        await stream.aclose()
        assert events.of("ircd_started") == [{"pid": ircd.pid, "restarts": 0}]
        nursery.cancel_scope.cancel()
    log = (tmp_path / "logs" / "ircd.log").read_text()
    assert ") ready." in log


async def test_fifty_clients_from_one_address(tmp_path: Path) -> None:
    ircd = ManagedIrcd(spec(free_port()), tmp_path)
    streams: list[trio.SocketStream] = []

    async def client(n: int) -> None:
        streams.append(await register(ircd.address, f"agent{n}"))

    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT):
            await nursery.start(ircd.run)
        # ngircd's default MaxConnectionsIP (5) would refuse the sixth.
        with trio.fail_after(30):
            async with trio.open_nursery() as clients:
                for n in range(50):
                    clients.start_soon(client, n)
        assert len(streams) == 50
        for stream in streams:
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_killed_ngircd_is_restarted(tmp_path: Path) -> None:
    events = Events()
    ircd = ManagedIrcd(spec(free_port()), tmp_path, events, uniform=lambda a, b: 0.0)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT):
            await nursery.start(ircd.run)
        first = ircd.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        with trio.fail_after(WAIT):
            await events.wait_for("ircd_started", 2)
        assert ircd.pid is not None and ircd.pid != first
        assert ircd.state == "running" and ircd.restarts == 1
        crash = events.of("ircd_crashed")[0]
        assert crash["reason"] == "killed by SIGKILL"
        assert crash["restart"] is True and crash["failed"] is False
        with trio.fail_after(WAIT):
            stream = await register(ircd.address, "bob")
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_circuit_opens_then_reset_restarts(tmp_path: Path) -> None:
    events = Events()
    policy = RestartPolicy(max_restarts=0, backoff=Backoff(base=1.0, max=1.0))
    ircd = ManagedIrcd(spec(free_port(), restart=policy), tmp_path, events)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT):
            await nursery.start(ircd.run)
        assert ircd.pid is not None
        os.kill(ircd.pid, signal.SIGKILL)
        with trio.fail_after(WAIT):
            await events.wait_for("ircd_failed")
        assert ircd.state == "failed" and ircd.pid is None
        assert "not restarted: more than 0 restarts" in ircd.reason
        ircd.reset()
        with trio.fail_after(WAIT):
            await events.wait_for("ircd_started", 2)
        assert ircd.state == "running"
        nursery.cancel_scope.cancel()


async def test_cancel_leaves_nothing_behind(tmp_path: Path) -> None:
    ircd = ManagedIrcd(spec(free_port()), tmp_path)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT):
            await nursery.start(ircd.run)
        pid = ircd.pid
        assert pid is not None and psutil.pid_exists(pid)
        nursery.cancel_scope.cancel()
    assert not psutil.pid_exists(pid)
    assert ngircd_of(ircd.conf_path) == []
    assert not ircd.pid_path.exists()
    # The port is free again: the next start would get it.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(ircd.address)


async def test_port_in_use_fails_first_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ircd = ManagedIrcd(spec(port), tmp_path)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(WAIT), pytest.raises(IrcdError) as info:
                await nursery.start(ircd.run)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"managed IRC server (ngircd) on 127.0.0.1:{port} did not start: ")
    assert "Address already in use" in message
    assert ngircd_of(ircd.conf_path) == []
    assert not ircd.pid_path.exists()


async def test_missing_binary_fails_first_start(tmp_path: Path) -> None:
    ircd = ManagedIrcd(spec(free_port()), tmp_path, binary=str(tmp_path / "no-ngircd"))
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT), pytest.raises(IrcdError, match="did not start: cannot run"):
            await nursery.start(ircd.run)
