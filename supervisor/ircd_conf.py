"""The managed ngircd's config file: ``render_config`` writes ngircd.conf whole,
and ``server_ids`` picks the account it runs as.

Why each setting is what it is (ngircd 26.1) is in ``ircd``'s docstring: the
account as root, ``IncludeDir`` pointed at an empty folder of ours, PAM off,
no per-address cap, predefined channels, links on the clients' ports.
"""

from __future__ import annotations

import contextlib
import os
import pwd
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from fireclaw.supervisor.ircd_links import LinkBlock
from fireclaw.supervisor.ircd_operators import OperatorBlock

INCLUDE_DIR: Final = "conf.d"
#: Enough for hundreds of agents, capped below the open-file limit it inherits so
#: that ngircd refuses extra clients itself instead of failing accept().
MAX_CONNECTIONS: Final = 4096
MAX_JOINS: Final = 100
#: A connection silent this long is PINGed, and dropped without a PONG within
#: PONG_TIMEOUT. For a linked server this is how a cut-off host is noticed (and
#: the split announced), so it is kept well below ngircd's 120 s; every client
#: here (agents, the overseer) answers a PING at once.
PING_TIMEOUT: Final = 60
PONG_TIMEOUT: Final = 20
#: Seconds between a dialling server's attempts to bring a link up (ngircd's least).
CONNECT_RETRY: Final = 5


def server_ids() -> tuple[int, int]:
    """(uid, gid) ngircd should run as: ours, or as root an unprivileged account.

    ngircd refuses to keep root, so as root we choose: Debian's ``irc`` system
    account (what the packaged ngircd uses), else ``nobody``.
    """
    if os.getuid() != 0:
        return os.getuid(), os.getgid()
    for name in ("irc", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
    return 65534, 65534


def render_config(
    *,
    workdir: Path,
    listen: str,
    port: int,
    server_name: str,
    network: str,
    password: str | None,
    max_nick_length: int,
    channels: Sequence[tuple[str, str]] = (),
    operators: Sequence[OperatorBlock] = (),
    links: Sequence[LinkBlock] = (),
    link_address: tuple[str, int] | None = None,
    server_uid: int | None = None,
    server_gid: int | None = None,
    max_connections: int = MAX_CONNECTIONS,
) -> str:
    """A complete ngircd.conf for the managed server.

    ``channels`` are (name, topic) pairs created at start as persistent ``+Ptn``
    channels; ``operators`` become ``[Operator]`` blocks and ``links``
    ``[Server]`` blocks (the text then holds their passwords: it is written
    root-only, and ngircd reads it before it drops privileges).
    ``link_address`` (IP, port), where peers link to, is listened on as well.
    ``server_uid``/``server_gid`` default to ``server_ids()``. The values are
    trusted to be valid (``IrcSpec`` and ``read_secret`` check them): ngircd
    reads one unquoted value per line, so none may hold a line break.
    """
    if server_uid is None or server_gid is None:
        server_uid, server_gid = server_ids()
    values = (
        listen,
        server_name,
        network,
        password or "",
        *(c for ch in channels for c in ch),
        *(v for op in operators for v in (op.name, op.password, op.mask or "")),
        *(v for ln in links for v in (ln.name, ln.host, ln.password)),
    )
    if any(ch in v for v in values for ch in "\r\n\x00"):
        raise ValueError("ngircd config values cannot hold line breaks or NUL")
    addresses, ports = ((), ()) if link_address is None else zip(link_address, strict=True)
    lines = [
        "# The managed IRC server of fireclaw-swarm. Rewritten at every start:",
        "# change swarm.yaml (irc.managed) instead.",
        "[Global]",
        f"Name = {server_name}",
        "Info = fireclaw-swarm",
        "AdminInfo1 = fireclaw-swarm managed IRC server",
        f"AdminInfo2 = network {network}",
        f"Network = {network}",
        f"Listen = {', '.join(dict.fromkeys((listen, *addresses)))}",
        f"Ports = {', '.join(dict.fromkeys(str(p) for p in (port, *ports)))}",
        f"MotdPhrase = {network}: the fireclaw-swarm control plane",
        f"ServerUID = {server_uid}",
        f"ServerGID = {server_gid}",
    ]
    if password is not None:
        lines.append(f"Password = {password}")
    lines += [
        "",
        "[Limits]",
        # Every agent of a host may come from one address: no per-address cap.
        "MaxConnectionsIP = 0",
        f"MaxConnections = {max_connections}",
        f"MaxJoins = {MAX_JOINS}",
        f"MaxNickLength = {max_nick_length}",
        f"PingTimeout = {PING_TIMEOUT}",
        f"PongTimeout = {PONG_TIMEOUT}",
        f"ConnectRetry = {CONNECT_RETRY}",
        "",
        "[Options]",
        # Hostmasks stay IP addresses (the operator allowlist matches them), and a
        # client never waits for a lookup.
        "DNS = no",
        "Ident = no",
        "PAM = no",
        "AllowRemoteOper = no",
        f"IncludeDir = {workdir / INCLUDE_DIR}",
    ]
    for name, topic in channels:
        lines += ["", "[Channel]", f"Name = {name}", "Modes = tn", f"Topic = {topic}"]
    for op in operators:
        lines += ["", "[Operator]", f"Name = {op.name}", f"Password = {op.password}"]
        if op.mask is not None:
            lines.append(f"Mask = {op.mask}")
    for ln in links:
        lines += ["", "[Server]", f"Name = {ln.name}", f"Host = {ln.host}", f"Port = {ln.port}"]
        # One password per link, the same on both ends: each sends it and expects it.
        lines += [f"MyPassword = {ln.password}", f"PeerPassword = {ln.password}"]
        if not ln.connect:
            lines.append("Passive = yes")
    return "\n".join(lines) + "\n"
