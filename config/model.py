"""The effective configuration: what the supervisor runs on.

These Structs are the contract between ``swarm.yaml`` and the rest of the
supervisor. They are built only by ``fireclaw.config.load`` (which merges role
templates with the overrides in ``swarm.yaml``) and never change after that: a
reload builds a new ``Config`` and diffs it against the old one.

Every limit is declared on the field; checks that involve more than one field
live in ``__post_init__``, whose ``ValueError`` msgspec reports with the path of
the Struct that failed.
"""

from __future__ import annotations

import pathlib
import re
from typing import Annotated, Final, Literal

import msgspec
from fireclaw.guest_daemon.protocol import MAX_FRAME_BYTES
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


class HarnessSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How an agent turns a prompt into work.

    ``command``: run ``command`` in the guest with ``FIRECLAW_AGENT``,
    ``FIRECLAW_ROLE``, ``FIRECLAW_PROMPT``, ``FIRECLAW_PERSONA`` and
    ``FIRECLAW_MODEL`` set; an argument exactly ``{prompt}`` is replaced by the
    prompt. It is killed after ``timeout`` seconds.
    """

    kind: Literal["command"] = "command"
    command: Argv
    timeout: PositiveSeconds = 600.0


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
    harness: HarnessSpec
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
    roles: dict[str, Role] = msgspec.field(default_factory=dict)
