"""The effective configuration: what the supervisor runs on.

These Structs are the contract between ``swarm.yaml`` and the rest of the
supervisor. They are built only by ``fireclaw.config.load`` (which merges role
templates with the overrides in ``swarm.yaml``) and never change after that: a
reload builds a new ``Config`` and diffs it against the old one.

Every limit is declared on the field; checks that involve more than one field
live in ``__post_init__``, whose ``ValueError`` msgspec reports with the path of
the Struct that failed; a message that starts with one of its fields' names and a
colon (``"server: ..."``) is reported against that field.

The shared field types and the restart policy are in common.py, the ``irc:``
part in irc.py, the ``models:`` and ``budget:`` parts in llm.py, ``http:`` in
http.py; this module holds the roles and the ``Config`` that ties them together.
"""

from __future__ import annotations

import ipaddress
import pathlib
import re
from typing import Annotated, Final, Literal

import msgspec
from fireclaw.config.cluster import ClusterSpec
from fireclaw.config.common import (
    ROLE_NAME_PATTERN,
    Argv,
    PositiveSeconds,
    RestartPolicy,
    Seconds,
)
from fireclaw.config.http import HttpSpec
from fireclaw.config.irc import IrcSpec
from fireclaw.config.llm import BudgetSpec, ModelsSpec
from fireclaw.guest_daemon.protocol import DEFAULT_TOOLS, MAX_FRAME_BYTES, ToolMode, ToolName
from msgspec import Meta

# An IRC channel name: '#' or '&', then no space, comma or BEL (RFC 2812 §1.3).
_CHANNEL_PATTERN: Final = r"^[#&][^\s,\x07]{1,49}$"

# A nick pattern is an IRC nick with placeholders: {role} (the role's name) and
# {n} (the replica's ordinal, exactly once, so every replica gets its own nick).
_NICK_PATTERN_RE: Final = re.compile(r"^(?:[A-Za-z]|\{role\})(?:[A-Za-z0-9_-]|\{role\}|\{n\})*$")

Backend = Literal["auto", "process", "qemu", "firecracker"]

Channel = Annotated[str, Meta(pattern=_CHANNEL_PATTERN)]


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
    #: None: one host, its state in SQLite. ``password_file`` resolved against the file.
    cluster: ClusterSpec | None = None
