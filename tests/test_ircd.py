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
from fireclaw.config import Backoff, IrcOperatorSpec, IrcSpec, ManagedIrcSpec, RestartPolicy
from fireclaw.pool.procid import process_identity
from fireclaw.supervisor import leftovers
from fireclaw.supervisor.ircd import (
    START_TIMEOUT,
    IrcdError,
    ManagedIrcd,
    render_config,
    server_ids,
)
from fireclaw.supervisor.ircd_operators import OperatorBlock
from fireclaw.supervisor.state import ServiceRecord, Store

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


def spec(
    port: int, operators: tuple[IrcOperatorSpec, ...] | None = None, **fields: object
) -> IrcSpec:
    managed = ManagedIrcSpec(port=port)
    if operators is not None:
        managed = ManagedIrcSpec(port=port, operators=operators)
    return IrcSpec(managed=managed, **fields)  # type: ignore[arg-type]


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
            operators=[
                OperatorBlock(name="fireclaw", password="pw-1_x"),
                OperatorBlock(name="second", password="pw2", mask="*!*@127.0.0.1"),
            ],
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
    blocks = out.stdout.split("[OPERATOR]")[1:]
    assert [b.split("\n[")[0].split() for b in blocks] == [
        ["Name", "=", "fireclaw", "Password", "=", "pw-1_x", "Mask", "="],
        ["Name", "=", "second", "Password", "=", "pw2", "Mask", "=", "*!*@127.0.0.1"],
    ]


def test_operator_block_repr_hides_the_password() -> None:
    assert "pw-1_x" not in repr(OperatorBlock(name="fireclaw", password="pw-1_x"))


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


# --- the crash-only registry ---------------------------------------------------


class WatchedStore(Store):
    """The real state database, noting which ngircd of ``conf`` ran at each write."""

    conf: Path
    writes: list[tuple[ServiceRecord, list[int]]]

    def put_service(self, rec: ServiceRecord) -> None:
        self.writes.append((rec, [p.pid for p in ngircd_of(self.conf)]))
        super().put_service(rec)


def watched_store(state: Path, conf: Path) -> WatchedStore:
    store = WatchedStore.open(state / "swarm.db")
    assert isinstance(store, WatchedStore)
    store.conf, store.writes = conf, []
    return store


async def test_registry_row_is_written_ahead_and_dropped_once_reaped(tmp_path: Path) -> None:
    port = free_port()
    with watched_store(tmp_path, tmp_path / "ircd" / "ngircd.conf") as store:
        ircd = ManagedIrcd(spec(port), tmp_path, registry=store)
        assert ircd.conf_path == store.conf
        async with trio.open_nursery() as nursery:
            with trio.fail_after(WAIT):
                await nursery.start(ircd.run)
            pid = ircd.pid
            assert pid is not None
            ident = process_identity(pid)
            assert ident is not None
            (ahead, running_then), (spawned, _) = store.writes
            # Before it was started: no identity, and no ngircd of ours running.
            assert (ahead.name, ahead.pid, ahead.start_time, running_then) == ("ircd", 0, 0, [])
            assert store.services() == [spawned]
            assert spawned == ServiceRecord(
                name="ircd",
                command=NGIRCD or "",
                pid=pid,
                start_time=ident.start_time,
                boot_id=ident.boot_id,
                address=f"127.0.0.1:{port}",
            )
            nursery.cancel_scope.cancel()
        assert not psutil.pid_exists(pid)
        assert store.services() == []


async def test_a_restarted_incarnation_replaces_its_row(tmp_path: Path) -> None:
    events = Events()
    with Store.open(tmp_path / "swarm.db") as store:
        ircd = ManagedIrcd(
            spec(free_port()), tmp_path, events, uniform=lambda a, b: 0.0, registry=store
        )
        async with trio.open_nursery() as nursery:
            with trio.fail_after(WAIT):
                await nursery.start(ircd.run)
            first = ircd.pid
            assert first is not None
            os.kill(first, signal.SIGKILL)
            with trio.fail_after(WAIT):
                await events.wait_for("ircd_started", 2)
            assert ircd.pid is not None and ircd.pid != first
            assert [(r.name, r.pid) for r in store.services()] == [("ircd", ircd.pid)]
            nursery.cancel_scope.cancel()
        assert store.services() == []


async def test_a_first_start_that_fails_leaves_no_row(tmp_path: Path) -> None:
    with Store.open(tmp_path / "swarm.db") as store:
        ircd = ManagedIrcd(
            spec(free_port()), tmp_path, binary=str(tmp_path / "no-ngircd"), registry=store
        )
        async with trio.open_nursery() as nursery:
            with trio.fail_after(WAIT), pytest.raises(IrcdError, match="cannot run"):
                await nursery.start(ircd.run)
        assert store.services() == []


def test_the_config_path_is_where_leftovers_look_for_it(tmp_path: Path) -> None:
    ircd = ManagedIrcd(spec(free_port()), tmp_path)
    kind = leftovers.SERVICES["ircd"]
    assert ircd.conf_path == tmp_path / kind.config
    assert os.path.basename(NGIRCD or "") == kind.program


# --- operators ---------------------------------------------------------------------


async def test_operator_password_is_generated_and_oper_works(tmp_path: Path) -> None:
    """The default operator's password is made at the first start, root-only, kept
    across restarts, and /OPER with it makes an IRC operator (WHOIS 313)."""
    ircd = ManagedIrcd(spec(free_port()), tmp_path)
    secret = tmp_path / "secrets" / "irc-operator-fireclaw"
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT):
            await nursery.start(ircd.run)
        assert secret.stat().st_mode & 0o777 == 0o600
        assert secret.parent.stat().st_mode & 0o777 == 0o700
        assert secret.stat().st_uid == os.geteuid()
        password = secret.read_text().strip()
        assert len(password) >= 40
        assert ircd.conf_path.stat().st_mode & 0o077 == 0
        if os.geteuid() == 0:
            # It read the root-only config (the password works below) before dropping root.
            assert ircd.pid is not None
            assert psutil.Process(ircd.pid).uids().effective != 0
        with trio.fail_after(WAIT):
            guest = await register(ircd.address, "guest")
            await guest.send_all(b"OPER fireclaw wrong-password\r\n")
            assert b" 464 guest " in await read_until(guest, b" 464 ")
            admin = await register(ircd.address, "admin")
            await admin.send_all(f"OPER fireclaw {password}\r\n".encode())
            assert b" 381 admin " in await read_until(admin, b" 381 ")
            # ngircd holds back a client's next lines for seconds after a bad OPER:
            # ask about both from the operator's connection.
            await admin.send_all(b"WHOIS guest\r\n")
            assert b" 313 " not in await read_until(admin, b" 318 ")
            await admin.send_all(b"WHOIS admin\r\n")
            assert b" 313 admin admin " in await read_until(admin, b" 318 ")
        await guest.aclose()
        await admin.aclose()
        nursery.cancel_scope.cancel()
    assert password not in (tmp_path / "logs" / "ircd.log").read_text()
    # The next start uses the same password.
    ircd = ManagedIrcd(spec(free_port()), tmp_path)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT):
            await nursery.start(ircd.run)
        assert secret.read_text().strip() == password
        nursery.cancel_scope.cancel()


async def test_operator_mask_limits_where_oper_works(tmp_path: Path) -> None:
    pw = tmp_path / "oper.pw"
    pw.write_text("named-password\n")
    pw.chmod(0o600)
    ops = (IrcOperatorSpec(name="root", password_file=str(pw), mask="boss!*@*"),)
    ircd = ManagedIrcd(spec(free_port(), ops), tmp_path)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT):
            await nursery.start(ircd.run)
            other = await register(ircd.address, "other")
            await other.send_all(b"OPER root named-password\r\n")
            # ngircd answers a mask mismatch like a wrong password.
            assert b" 464 other " in await read_until(other, b" 464 ")
            boss = await register(ircd.address, "boss")
            await boss.send_all(b"OPER root named-password\r\n")
            assert b" 381 boss " in await read_until(boss, b" 381 ")
        await other.aclose()
        await boss.aclose()
        nursery.cancel_scope.cancel()
    assert not (tmp_path / "secrets").exists()  # a named file is used, none made


@pytest.mark.parametrize(
    ("content", "mode", "error"),
    [
        (None, 0o600, "no such file"),
        ("readable-by-all\n", 0o644, "group or others may use it (mode 0644)"),
        ("has spaces in it\n", 0o600, "printable ASCII characters without spaces"),
        ("", 0o600, "its first line must be the password"),
    ],
)
async def test_unusable_password_file_fails_first_start(
    tmp_path: Path, content: str | None, mode: int, error: str
) -> None:
    pw = tmp_path / "oper.pw"
    if content is not None:
        pw.write_text(content)
        pw.chmod(mode)
    ops = (IrcOperatorSpec(name="root", password_file=str(pw)),)
    ircd = ManagedIrcd(spec(free_port(), ops), tmp_path)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT), pytest.raises(IrcdError) as info:
            await nursery.start(ircd.run)
    message = str(info.value)
    assert "\n" not in message and error in message
    assert message.startswith(f"irc.managed.operators root: {pw}: ")
    assert content is None or content.strip() == "" or content.strip() not in message
    assert not ircd.conf_path.exists()
