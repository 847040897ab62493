"""A managed IRC server with a password, read from a root-only file that
swarm.yaml names: the overseer and the agents get in with it, strangers do not,
and the value shows up nowhere but in the file, ngircd.conf and the agents'
own connections."""

from __future__ import annotations

import secrets
import socket
import time
from pathlib import Path

import psutil
from ircperson import Person
from swarmctl import Swarm, role_yaml, swarm_yaml
from test_overseer import AGENTS, CONTROL, OPER_NAME, irc_yaml, joined, oper_password
from test_swarm import NOTHING, free_port, ngircd_pids

WAIT = 30.0  # seconds for one IRC exchange: far above what it takes on a loaded machine


def registers_without(port: int, limit: float = WAIT) -> list[str]:
    """What the server says to a client that registers with no password: its lines
    until it closes the connection (or says 001, which must not happen)."""
    lines: list[str] = []
    end = time.monotonic() + limit
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as sock:
        sock.sendall(b"NICK stranger\r\nUSER stranger 0 * :stranger\r\n")
        pending = b""
        while time.monotonic() < end:
            sock.settimeout(max(0.01, end - time.monotonic()))
            data = sock.recv(4096)
            if not data:
                return lines
            pending += data
            *done, pending = pending.split(b"\r\n")
            lines += [line.decode("utf-8", "replace") for line in done]
            if any(" 001 " in line for line in lines):
                return lines
    raise AssertionError(f"the server neither closed nor welcomed: {lines}")


def test_a_managed_server_password_from_a_file(tmp_path: Path) -> None:
    password = secrets.token_urlsafe(24)
    pw_file = tmp_path / "irc-server.pw"
    pw_file.write_text(password + "\n")
    pw_file.chmod(0o600)
    port = free_port()
    irc = irc_yaml(port, extra="\n  password_file: irc-server.pw")
    swarm = Swarm(tmp_path, swarm_yaml(role_yaml("worker", min_idle=1), irc=irc))
    swarm.start()
    try:
        op = Person(("127.0.0.1", port), "op", password=password).start()
        try:
            op.oper(OPER_NAME, oper_password(swarm.state))
            op.join(CONTROL)
            op.join(AGENTS)
            op.say(CONTROL, "!invoke worker alice")  # answered: the overseer got in
            joined(op, "alice", AGENTS)  # and so did she, through her namespace
            op.said(CONTROL, "op: alice is up")
            op.say(AGENTS, "alice: hello")
            op.said(AGENTS, "op: alice: hello")
        finally:
            op.stop()
        refused = registers_without(port)
        assert not any(" 001 " in line for line in refused), refused
        assert any(line.startswith("ERROR") for line in refused), refused

        conf = (swarm.state / "ircd" / "ngircd.conf").read_text().splitlines()
        assert f"Password = {password}" in conf
        seen = [
            swarm.api.get("/status"),
            swarm.api.get("/events?limit=1000"),
            swarm.api.get("/tasks"),
            swarm.cli("status").stdout.decode(),
        ]
        assert password not in repr(seen)
        for agent in swarm.status()["agents"]:  # what each guest was started with
            proc = psutil.Process(agent["pid"])
            assert password not in " ".join(proc.cmdline())
            assert password not in "".join(proc.environ().values())
    finally:
        swarm.close()
    holders = {pw_file, swarm.state / "ircd" / "ngircd.conf"}
    leaks = [
        str(path)
        for path in [*tmp_path.rglob("*"), swarm.log]
        if path.is_file() and path not in holders and password.encode() in path.read_bytes()
    ]
    assert leaks == []
    assert ngircd_pids(swarm.state) == []
    assert swarm.leftovers() == NOTHING


def test_a_password_file_open_to_others_stops_the_start_in_one_line(tmp_path: Path) -> None:
    pw_file = tmp_path / "irc-server.pw"
    pw_file.write_text("hunter2-value\n")
    pw_file.chmod(0o644)
    irc = irc_yaml(free_port(), extra="\n  password_file: irc-server.pw")
    swarm = Swarm(tmp_path, swarm_yaml(role_yaml("worker", min_idle=1), irc=irc))
    out = swarm.cli("up", "--config", str(swarm.config), timeout=60)
    err = out.stderr.decode() + out.stdout.decode()
    assert out.returncode != 0
    wanted = (
        f"irc.password_file: {pw_file}: group or others may use it (mode 0644); chmod 600 {pw_file}"
    )
    assert wanted in err, err
    assert "hunter2-value" not in err
    assert ngircd_pids(swarm.state) == []
