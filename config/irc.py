"""The IRC part of the config: the server, the managed ngircd, operators, SASL.

``IrcSpec`` is ``irc:`` in swarm.yaml. ``server: managed`` (the default) runs
ngircd on loopback (``ManagedIrcSpec``); anything else is ``host:port`` of a
server someone else runs. Secrets come from files or the environment, never
from swarm.yaml.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Final, Literal

import msgspec
from fireclaw.config.common import (
    ENV_NAME_PATTERN,
    HOSTNAME_RE,
    MANAGED,
    Backoff,
    EnvName,
    NonEmptyStr,
    Port,
    RestartPolicy,
    Seconds,
)
from msgspec import Meta

__all__ = [
    "DEFAULT_IRC_OPERATOR",
    "DEFAULT_OPERATORS",
    "IRC_RESTART",
    "PATTERN_WORDS",
    "CommandRateSpec",
    "IrcOperatorSpec",
    "IrcSpec",
    "ManagedIrcSpec",
    "OperatorAuth",
    "SERVER_NAME_PATTERN",
    "SaslSpec",
    "ServerName",
    "connect_host",
    "parse_server",
]

# The channels the swarm itself uses: '#', then no whitespace, comma or control character.
_IRC_CHANNEL_PATTERN: Final = r"^#[^\s,\x00-\x1f\x7f]{1,49}$"
# RFC 2812 nick characters; 30 at most, the longest nick the managed server allows by default.
_NICK_PATTERN: Final = r"^[A-Za-z\[\]\\`_^{|}][A-Za-z0-9\[\]\\`_^{|}-]{0,29}$"
# nick!user@host, each part a glob ('*', '?'); no whitespace.
_HOSTMASK_PATTERN: Final = r"^[^\s!@]+![^\s!@]+@[^\s!@]+$"
# What ngircd accepts as its server name (RFC 2812 section 2.3.1); a dot is checked apart.
SERVER_NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9.-]{0,62}$"
_NETWORK_PATTERN: Final = r"^[A-Za-z0-9._-]{1,64}$"
# An [Operator] name of the managed ngircd (the first word of /OPER); also a file name.
_OPER_NAME_PATTERN: Final = r"^[A-Za-z0-9_-]{1,30}$"
# A services account name, as networks show it in WHOIS (numeric 330).
_ACCOUNT_PATTERN: Final = r"^[^\s\x00-\x1f\x7f,*?!@]{1,64}$"

#: What each IRC pattern means, for error messages (a regex is no help to a YAML author).
PATTERN_WORDS: Final = {
    _IRC_CHANNEL_PATTERN: "a channel: '#' then 1 to 49 characters, no spaces, commas"
    " or control characters",
    _NICK_PATTERN: "a nick: up to 30 letters, digits and -[]\\`_^{|}, not starting"
    " with a digit or '-'",
    _HOSTMASK_PATTERN: "a hostmask glob nick!user@host, as in *!*@127.0.0.1",
    SERVER_NAME_PATTERN: "a server name: letters, digits, '.' and '-', up to 63",
    _NETWORK_PATTERN: "a network name: 1 to 64 letters, digits, '.', '_' and '-'",
    _OPER_NAME_PATTERN: "an operator name: 1 to 30 letters, digits, '_' and '-'",
    _ACCOUNT_PATTERN: "an account name: 1 to 64 characters, no blanks, commas, '*?!@'",
    ENV_NAME_PATTERN: "an environment variable name: letters, digits and '_',"
    " not starting with a digit",
}

IrcChannel = Annotated[str, Meta(pattern=_IRC_CHANNEL_PATTERN)]
Nick = Annotated[str, Meta(pattern=_NICK_PATTERN)]
Hostmask = Annotated[str, Meta(pattern=_HOSTMASK_PATTERN, max_length=200)]
# A name sent on the wire as one IRC parameter: no line breaks, no NUL.
WireName = Annotated[str, Meta(min_length=1, max_length=400, pattern=r"^[^\x00\r\n]+$")]
OperName = Annotated[str, Meta(pattern=_OPER_NAME_PATTERN)]
Account = Annotated[str, Meta(pattern=_ACCOUNT_PATTERN)]
#: An IRC server's name (ngircd's ``Name``); ngircd also wants a dot in it.
ServerName = Annotated[str, Meta(pattern=SERVER_NAME_PATTERN)]

OperatorAuth = Literal["oper", "account", "hostmask"]
"""How the overseer knows an operator (``irc.operator_auth``).

``oper``: an IRC operator of the server (WHOIS numeric 313, after /OPER) whose
hostmask matches ``irc.operators``. ``account``: logged in (SASL, services) as
one of ``irc.operator_accounts`` (WHOIS numeric 330), hostmask matching too.
``hostmask``: the hostmask alone, which anyone who can connect from an allowed
address can forge; only when a config asks for it.
"""


#: Local users. ngircd shows an IPv6 loopback client as [0::1], other servers as ::1.
DEFAULT_OPERATORS: Final = ("*!*@127.0.0.1", "*!*@localhost", "*!*@::1", "*!*@[0::1]")


def parse_server(text: str) -> tuple[str, int]:
    """``host:port`` (an IPv6 address in brackets: ``[::1]:6667``) as (host, port).

    Raises ValueError, worded for a config file, when ``text`` is not one.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected 'managed' or host:port, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"an IPv6 address goes in brackets, as in [::1]:6667; got {text!r}")
    elif not HOSTNAME_RE.match(host):
        raise ValueError(f"{host!r} is not a host name or an IP address")
    if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port must be a number from 1 to 65535, got {port_text!r}")
    return host, int(port_text)


class IrcOperatorSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One ``[Operator]`` of the managed ngircd: ``/OPER <name> <password>``.

    The password is never written in swarm.yaml: it is the content of
    ``password_file`` (relative to swarm.yaml's folder; it must be readable by
    its owner alone), or, when that is null, of
    ``<state_dir>/secrets/irc-operator-<name>``, generated at the first start.
    ``mask`` (``nick!user@host`` glob) limits where ``/OPER`` is accepted from.
    """

    name: OperName
    password_file: NonEmptyStr | None = None
    mask: Hostmask | None = None


#: The managed server's operator unless swarm.yaml says otherwise.
DEFAULT_IRC_OPERATOR: Final = IrcOperatorSpec(name="fireclaw")


class ManagedIrcSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The ngircd the supervisor runs when ``irc.server`` is ``managed``.

    ``listen`` is an IP address (``0.0.0.0`` or ``::`` for all); ``max_nick_length``
    must hold every agent's nick. ``operators`` become its ``[Operator]`` blocks.
    """

    listen: Annotated[str, Meta(min_length=1, max_length=64)] = "127.0.0.1"
    port: Port = 6667
    server_name: ServerName = "irc.fireclaw.local"
    network: Annotated[str, Meta(pattern=_NETWORK_PATTERN)] = "fireclaw"
    max_nick_length: Annotated[int, Meta(ge=9, le=31)] = 30
    operators: Annotated[tuple[IrcOperatorSpec, ...], Meta(max_length=32)] = (DEFAULT_IRC_OPERATOR,)

    def __post_init__(self) -> None:
        names = [op.name.lower() for op in self.operators]
        if len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"operators: the name {twice!r} is given twice")
        try:
            ipaddress.ip_address(self.listen)
        except ValueError:
            raise ValueError(f"listen: expected an IP address, got {self.listen!r}") from None
        if "." not in self.server_name:
            raise ValueError(f"server_name: {self.server_name!r} needs a dot, as in irc.example")


def _one_source(password_file: str | None, password_env: str | None, where: str) -> None:
    """A secret comes from a file or from the environment: not both."""
    if password_file is not None and password_env is not None:
        raise ValueError(f"{where}: give password_file or password_env, not both")


class SaslSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """SASL PLAIN credentials for an external server.

    The password is never written in swarm.yaml: it is the first line of
    ``password_file`` (relative to swarm.yaml's folder, readable by its owner
    alone) or the value of the environment variable ``password_env``.
    """

    username: WireName
    password_file: NonEmptyStr | None = None
    password_env: EnvName | None = None

    def __post_init__(self) -> None:
        _one_source(self.password_file, self.password_env, "password_file")
        if self.password_file is None and self.password_env is None:
            raise ValueError("password_file: SASL needs password_file or password_env")


class CommandRateSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How many overseer commands one sender may give: a token bucket per sender."""

    per_minute: Annotated[float, Meta(gt=0, le=6000)] = 20.0
    burst: Annotated[int, Meta(ge=1, le=1000)] = 5


#: The managed ngircd's restart policy unless swarm.yaml says otherwise.
IRC_RESTART: Final = RestartPolicy(backoff=Backoff(base=1.0, max=30.0))


class IrcSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The IRC control plane: which server, who commands the overseer, and how fast.

    ``server`` is ``managed`` (the supervisor runs ngircd per ``managed`` and
    restarts it per ``restart``) or an external ``host:port``. ``operators`` are
    ``nick!user@host`` globs: only senders matching one, and authenticated per
    ``operator_auth`` (an IRC operator by default, see ``OperatorAuth``), may
    command the overseer.
    ``agent_cooldown`` is how long an agent waits before answering another agent.
    ``enabled: false`` keeps the whole swarm off IRC.

    The server password (``PASS``; on the managed server its ``Password =``) is
    never written in swarm.yaml: it is the first line of ``password_file``
    (relative to swarm.yaml's folder, readable by its owner alone) or the value
    of the environment variable ``password_env``, read once at start
    (``fireclaw.supervisor.irc_credentials``).
    """

    enabled: bool = True
    server: Annotated[str, Meta(min_length=1, max_length=300)] = MANAGED
    managed: ManagedIrcSpec = msgspec.field(default_factory=ManagedIrcSpec)
    password_file: NonEmptyStr | None = None
    password_env: EnvName | None = None
    sasl: SaslSpec | None = None
    overseer_nick: Nick = "overseer"
    control_channel: IrcChannel = "#control"
    agents_channel: IrcChannel = "#agents"
    operator_auth: OperatorAuth = "oper"
    operators: Annotated[tuple[Hostmask, ...], Meta(max_length=256)] = DEFAULT_OPERATORS
    operator_accounts: Annotated[tuple[Account, ...], Meta(max_length=256)] = ()
    command_rate: CommandRateSpec = msgspec.field(default_factory=CommandRateSpec)
    agent_cooldown: Seconds = 10.0
    restart: RestartPolicy = IRC_RESTART

    def __post_init__(self) -> None:
        # IRC channel names are case-insensitive.
        if self.control_channel.lower() == self.agents_channel.lower():
            raise ValueError(f"agents_channel: {self.agents_channel!r} is also control_channel")
        if self.operator_auth == "account" and not self.operator_accounts:
            raise ValueError(
                "operator_accounts: operator_auth 'account' needs at least one account"
            )
        _one_source(self.password_file, self.password_env, "password_file")
        if self.operator_auth != "account" and self.operator_accounts:
            raise ValueError(
                "operator_accounts: only used with operator_auth: account"
                f" (it is {self.operator_auth!r})"
            )
        if self.server != MANAGED:
            try:
                parse_server(self.server)
            except ValueError as exc:
                raise ValueError(f"server: {exc}") from None
            return
        if self.sasl is not None:
            raise ValueError(
                "sasl: the managed server (ngircd) has no SASL; use password_file or password_env"
            )
        if self.operator_auth == "account":
            raise ValueError("operator_auth: the managed server (ngircd) has no accounts; use oper")
        if self.operator_auth == "oper" and not self.managed.operators:
            raise ValueError(
                "managed: operator_auth 'oper' needs at least one entry in managed.operators"
            )
        if len(self.overseer_nick) > self.managed.max_nick_length:
            raise ValueError(
                f"overseer_nick: {self.overseer_nick!r} is longer than"
                f" managed.max_nick_length ({self.managed.max_nick_length})"
            )

    @property
    def is_managed(self) -> bool:
        """True when the supervisor runs the server itself."""
        return self.server == MANAGED

    @property
    def endpoint(self) -> tuple[str, int]:
        """(host, port) where clients on this host reach the server."""
        if not self.is_managed:
            return parse_server(self.server)
        return connect_host(self.managed.listen), self.managed.port


def connect_host(listen: str) -> str:
    """The address a local client uses for a server listening on ``listen``."""
    address = ipaddress.ip_address(listen)
    if address.is_unspecified:
        return "::1" if address.version == 6 else "127.0.0.1"
    return str(address)
