"""The managed ngircd's links to the fleet's other servers: its ``[Server]`` blocks.

Each peer in ``cluster.irc.peers`` becomes a block of ngircd.conf. Both ends
of a link derive who dials from the two names alone, so they always agree:
the server whose name sorts first (case-insensitively) connects, the other
waits (``Passive``: an IRC operator can still ``CONNECT`` from there). Each
side sends the password of the link's file and expects the same one back
(``MyPassword`` = ``PeerPassword``), so the two hosts hold one file with one
line for that link and nothing else to keep in step. The password goes into
ngircd.conf alone: not into swarm.yaml, an event, a log line or a VM.

What ngircd logs about its links becomes events (``link_event``): a peer
linked (``link_up``), its link lost (``link_down``, the netsplit), or its
password refused (``link_refused``, logged by the refusing side only, naming
the peer and never the password).

Exceptions: ``SecretFileError`` (from ``link_blocks``), one line naming the
peer and its file; ``ValueError`` (from ``link_blocks``) when this server's
name is one of its peers', naming the field under ``cluster.irc``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fireclaw.config.cluster import IrcLinkSpec
from fireclaw.supervisor.secretfile import SecretFileError, read_secret

__all__ = ["LINK_PASSWORD_RE", "LinkBlock", "dials", "link_blocks", "link_event"]

#: What ngircd takes as a link password: one unquoted word of printable ASCII,
#: not starting with ':' (the peer would read the rest of the line as the password).
LINK_PASSWORD_RE: Final = re.compile(r"[!-9;-~][!-~]{0,63}")
#: ngircd's messages (26.1) about a directly linked server; other servers' are
#: "registered (via ...)", and a refused password names no connection state.
_LINK_EVENTS: Final = (
    ("link_up", re.compile(r'^Server "(?P<peer>[^"]+)" registered \(connection \d+, 1 hop')),
    (
        "link_down",
        re.compile(r'^Server "(?P<peer>[^"]+)" unregistered \(connection \d+\): (?P<reason>.*)$'),
    ),
    (
        "link_refused",
        re.compile(r'^Connection \d+: Got (?P<reason>bad password) from server "(?P<peer>[^"]+)"'),
    ),
)
#: A reason may quote what the peer sent (its ERROR): kept short and printable.
_MAX_REASON: Final = 200
_PASSWORD_WORDS: Final = (
    "the link password: 1 to 64 printable ASCII characters without spaces, not starting with ':'"
)


@dataclass(frozen=True)
class LinkBlock:
    """One ``[Server]`` of ngircd.conf: the peer ``name`` at ``host``:``port``,
    dialled by us when ``connect``, else awaited."""

    name: str
    host: str
    port: int
    password: str
    connect: bool

    def __repr__(self) -> str:  # the password stays out of logs and tracebacks
        return (
            f"LinkBlock(name={self.name!r}, host={self.host!r}, port={self.port},"
            f" connect={self.connect})"
        )


def dials(ours: str, theirs: str) -> bool:
    """Whether the server named ``ours`` opens its link to the one named ``theirs``.

    The same rule on both hosts gives exactly one dialler per link."""
    return ours.lower() < theirs.lower()


def link_blocks(link: IrcLinkSpec, server_name: str) -> list[LinkBlock]:
    """The blocks of ``link``'s peers for the server ``server_name``, each
    password read from its file (made absolute by the loader). Blocking: call
    it from a thread."""
    blocks = []
    for peer in link.peers:
        if peer.name.lower() == server_name.lower():
            raise ValueError(f"peers: {peer.name!r} is this host's own server name")
        try:
            password = read_secret(Path(peer.password_file), LINK_PASSWORD_RE, _PASSWORD_WORDS)
        except SecretFileError as exc:
            raise SecretFileError(f"cluster.irc.peers {peer.name}: {exc}") from None
        blocks.append(
            LinkBlock(
                name=peer.name,
                host=peer.address,
                port=peer.port,
                password=password,
                connect=dials(server_name, peer.name),
            )
        )
    return blocks


def link_event(message: str) -> tuple[str, dict[str, str]] | None:
    """(kind, detail) when ngircd's log ``message`` says a link came up, went
    down or was refused; ``detail`` has ``peer`` and, but for ``link_up``,
    ``reason``. None for any other message."""
    for kind, pattern in _LINK_EVENTS:
        if (m := pattern.match(message)) is not None:
            detail = {"peer": _printable(m["peer"])}
            if "reason" in pattern.groupindex:
                detail["reason"] = _printable(m["reason"].rstrip(".!"))
            return kind, detail
    return None


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:_MAX_REASON]
