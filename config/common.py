"""Field types and the restart policy that every part of the config shares.

Limits are declared on the types (``Annotated[..., Meta(...)]``), so a field of
``swarm.yaml`` that breaks one is reported by msgspec with its path. The IRC
(irc.py), model (llm.py) and fleet (model.py) Structs build on these.
"""

from __future__ import annotations

import re
from typing import Annotated, Final, Literal

import msgspec
from fireclaw.guest_daemon.exits import EX_CONFIG
from msgspec import Meta

__all__ = [
    "ENV_NAME_PATTERN",
    "HOSTNAME_RE",
    "MANAGED",
    "POLICY_ALIASES",
    "ROLE_NAME_PATTERN",
    "Argv",
    "Backoff",
    "EnvName",
    "ExitCode",
    "NonEmptyStr",
    "PolicyName",
    "Port",
    "PositiveSeconds",
    "RestartPolicy",
    "Seconds",
]

ROLE_NAME_PATTERN: Final = r"^[a-z][a-z0-9-]{0,30}$"
"""Role names double as nick prefixes, file names and metric labels."""

PolicyName = Literal["permanent", "transient", "temporary"]
#: The systemd spellings of the restart policies, accepted as aliases.
POLICY_ALIASES: Final = {"always": "permanent", "on-failure": "transient", "no": "temporary"}

PositiveSeconds = Annotated[float, Meta(gt=0, le=86_400)]
Seconds = Annotated[float, Meta(ge=0, le=86_400)]
NonEmptyStr = Annotated[str, Meta(min_length=1, max_length=4096)]
Argv = Annotated[tuple[NonEmptyStr, ...], Meta(min_length=1, max_length=256)]
ExitCode = Annotated[int, Meta(ge=0, le=255)]
Port = Annotated[int, Meta(ge=1, le=65535)]

# An environment variable that holds a secret: a POSIX name.
ENV_NAME_PATTERN: Final = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
HOSTNAME_RE: Final = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})$")
EnvName = Annotated[str, Meta(pattern=ENV_NAME_PATTERN)]

MANAGED: Final = "managed"
"""``irc.server`` value that makes the supervisor run its own ngircd."""


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
    fatal_exit_codes: Annotated[tuple[ExitCode, ...], Meta(max_length=64)] = (EX_CONFIG,)
    backoff: Backoff = msgspec.field(default_factory=Backoff)
