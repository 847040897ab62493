"""The ``cluster:`` section of swarm.yaml: several hosts acting as one swarm.

::

    cluster:
      database: postgresql://fireclaw@db.internal/fireclaw   # shared state
      host: alpha                      # this host's name in the fleet
      password_file: secrets/pg-password
      silent_after: 30                 # seconds without a heartbeat: a host is lost
      irc:                             # this host's ngircd links to the others'
        server_name: alpha.fireclaw    # default: <host>.fireclaw
        listen: 10.250.0.2             # where the peers reach it (an IP address)
        port: 6668
        peers:
          - {name: beta.fireclaw, address: 10.250.0.3, port: 6668,
             password_file: secrets/irc-link-beta}

No section: one host, its state in SQLite under ``state_dir``. With one, the
hosts share their task queue, named agents, events and usage ledger in the
PostgreSQL database ``database`` names, and each keeps its VMs, snapshots
and registry to itself. ``host`` (default: the machine's host name) must be
unique in the fleet: it is who claims a task. The password is never written
here: ``password_file`` names a file only its owner may read (relative to
swarm.yaml's folder), or libpq finds it in ``PGPASSWORD`` / ``PGPASSFILE``.
A host whose heartbeat (every 5 s) is older than ``silent_after`` seconds is
presumed dead: another host requeues its tasks, and fencing makes sure that
what the lost host might still write changes nothing.
"""

from __future__ import annotations

import ipaddress
import pathlib
import re
import urllib.parse
from typing import Annotated, Final

import msgspec
from fireclaw.config.common import NonEmptyStr, Port
from fireclaw.config.irc import SERVER_NAME_PATTERN, ServerName
from msgspec import Meta

__all__ = [
    "HOST_NAME_PATTERN",
    "IRC_LINK_PORT",
    "SERVER_NAME_SUFFIX",
    "ClusterFlags",
    "ClusterSpec",
    "IrcLinkSpec",
    "IrcPeerSpec",
    "fleet_nick",
]

#: A host's name: what DNS allows in a label or name, dots and all.
HOST_NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
_SCHEMES: Final = ("postgresql", "postgres")
#: The port a host's ngircd takes server links on unless ``cluster.irc.port`` says.
IRC_LINK_PORT: Final = 6668
#: A host's IRC server name unless ``cluster.irc.server_name`` says: ``<host>.fireclaw``
#: (ngircd wants a dot in it, and a host's name may have none).
SERVER_NAME_SUFFIX: Final = ".fireclaw"
_MAX_PEERS: Final = 64
_SERVER_NAME_RE: Final = re.compile(SERVER_NAME_PATTERN)
_HOST_NAME_RE: Final = re.compile(HOST_NAME_PATTERN)


def fleet_nick(nick: str, host: str, max_length: int) -> str:
    """``nick`` made unique in the fleet's one IRC network: ``<nick>-<host>``.

    Every host numbers its agents from 1, so two hosts would both make
    ``worker-1``; the host's name, with each character a nick cannot hold
    made ``-``, tells them apart. The nick is kept whole (its number is what
    tells a host's own agents apart) and the host's name cut to fit in
    ``max_length``: hosts whose names differ only past that point, or a nick
    that leaves no room, are not told apart.
    """
    room = max_length - len(nick) - 1
    if room < 1:
        return nick
    return f"{nick}-{re.sub(r'[^A-Za-z0-9_-]', '-', host)[:room]}"


def _specific_address(text: str) -> str | None:
    """Why ``text`` is not one IP address of one interface, or None if it is."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return f"expected an IP address, got {text!r}"
    if address.is_unspecified:
        return f"{text} is every interface: name the one address the peers use"
    return None


class IrcPeerSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Another host's managed ngircd, as this one links to it.

    ``name`` is that server's name (its ``cluster.irc.server_name``, by default
    ``<its host>.fireclaw``); ``address`` and ``port`` are where it takes server
    links. The link's password is the first line of ``password_file`` (relative
    to swarm.yaml's folder, readable by its owner alone); the peer names a file
    with the same password for its link to this host. It is never written in
    swarm.yaml.
    """

    name: ServerName
    address: Annotated[str, Meta(min_length=1, max_length=64)]
    port: Port = IRC_LINK_PORT
    password_file: NonEmptyStr

    def __post_init__(self) -> None:
        if "." not in self.name:
            raise ValueError(f"name: {self.name!r} needs a dot, as an IRC server's name does")
        if (why := _specific_address(self.address)) is not None:
            raise ValueError(f"address: {why}")


class IrcLinkSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How this host's managed ngircd joins the fleet's IRC network.

    ``server_name`` must be unique in the fleet (default ``<host>.fireclaw``).
    The server takes links from ``peers`` on ``listen``:``port`` besides its
    clients' ``irc.managed`` address (ngircd listens on every pair of the two
    addresses and two ports). Of the two ends of a link, the server whose name
    sorts first connects and the other waits: both hosts derive the same answer.
    """

    server_name: ServerName | None = None
    listen: Annotated[str, Meta(min_length=1, max_length=64)] = "127.0.0.1"
    port: Port = IRC_LINK_PORT
    peers: Annotated[tuple[IrcPeerSpec, ...], Meta(max_length=_MAX_PEERS)] = ()

    def __post_init__(self) -> None:
        if self.server_name is not None and "." not in self.server_name:
            raise ValueError(
                f"server_name: {self.server_name!r} needs a dot, as an IRC server's name does"
            )
        if (why := _specific_address(self.listen)) is not None:
            raise ValueError(f"listen: {why}")
        names = [peer.name.lower() for peer in self.peers]
        if len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"peers: the name {twice!r} is given twice")

    def server_name_of(self, host: str) -> str:
        """This server's name when this host is called ``host``.

        Raises ValueError when a peer has that name too (a server cannot link to
        itself, and the fleet would have two servers of one name).
        """
        name = self.server_name or host + SERVER_NAME_SUFFIX
        if not _SERVER_NAME_RE.match(name):
            raise ValueError(
                f"server_name: the default {name!r} (<host>.fireclaw) is not a server name"
                " (letters, digits, '.' and '-', up to 63): set server_name"
            )
        if any(peer.name.lower() == name.lower() for peer in self.peers):
            raise ValueError(f"peers: {name!r} is this host's own server name")
        return name


class ClusterSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where the fleet's shared state is, and who this host is in it."""

    database: Annotated[str, Meta(min_length=1, max_length=2000)]
    host: Annotated[str, Meta(pattern=HOST_NAME_PATTERN)] | None = None
    password_file: Annotated[str, Meta(min_length=1, max_length=4096)] | None = None
    #: Several heartbeats long, so that one slow beat does not cost a host its tasks.
    silent_after: Annotated[float, Meta(ge=15, le=3600)] = 30.0
    irc: IrcLinkSpec | None = None

    def __post_init__(self) -> None:
        url = urllib.parse.urlsplit(self.database)
        if url.scheme not in _SCHEMES:
            raise ValueError(
                "database: expected a postgresql:// URL, as in postgresql://fireclaw@db/fireclaw"
            )
        query = urllib.parse.parse_qs(url.query)
        if url.password is not None or "password" in query:
            raise ValueError(
                "database: a password is never written in swarm.yaml: put it in a file"
                " only its owner may read (chmod 600) and name it with password_file,"
                " or set PGPASSFILE"
            )
        if self.irc is not None and self.host is not None:
            try:
                self.irc.server_name_of(self.host)
            except ValueError as exc:
                raise ValueError(f"irc: {exc}") from None


class ClusterFlags(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``up --cluster DSN --host NAME [--cluster-password-file PATH]``: the
    command-line form of ``cluster:``. It takes the place of the file's
    ``database``, ``host`` and ``password_file`` (at start and at every reload)
    and keeps the rest of the file's section (``silent_after``, ``irc``)."""

    database: str
    host: str | None = None
    password_file: str | None = None

    def spec(self, base: ClusterSpec | None) -> ClusterSpec:
        """The cluster section these flags make of the file's ``base``.

        Raises ValueError, one line naming the flag: a password is refused in the
        DSN, where every user of the machine would see it in the process list."""
        url = urllib.parse.urlsplit(self.database)
        if url.password is not None or "password" in urllib.parse.parse_qs(url.query):
            raise ValueError(
                "--cluster: a password is never given on the command line, where every"
                " user sees it: put it in a file only its owner may read (chmod 600) and"
                " name it with --cluster-password-file, or set PGPASSWORD or PGPASSFILE"
            )
        if self.host is not None and not _HOST_NAME_RE.fullmatch(self.host):
            raise ValueError(
                f"--host: {self.host[:64]!r} is not a host name (letters, digits, '.', '_'"
                " and '-', up to 63)"
            )
        password_file = base.password_file if base is not None else None
        if self.password_file is not None:
            password_file = str(pathlib.Path(self.password_file).expanduser().resolve())
        try:
            if base is None:
                return ClusterSpec(
                    database=self.database, host=self.host, password_file=password_file
                )
            return msgspec.structs.replace(
                base,
                database=self.database,
                host=self.host if self.host is not None else base.host,
                password_file=password_file,
            )
        except ValueError as exc:
            raise ValueError(f"--cluster: {exc}") from None
