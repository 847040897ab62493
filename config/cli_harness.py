"""Coding-agent CLIs as harness kinds: ``harness: {kind: claude-code | codex | ...}``.

One Struct per CLI, each a member of the tagged union ``model.AnyHarnessSpec``
beside ``command`` and ``chat``. The fields they share (``CliHarnessBase``):

- ``timeout``: seconds a task or IRC turn may take; the CLI's process group is
  killed after it (codex, for one, retries an unreachable server forever).
- ``secrets_dir`` and ``secrets``: a folder on the host holding one file per
  environment variable (the file ``ANTHROPIC_API_KEY`` holds that key), and the
  variables of it this role's CLI gets. They go to the CLI's process only,
  never into swarm.yaml, the image, an event or a log. A CLI whose model
  traffic goes through the VM's gateway is given the gateway's key in its
  key variable whatever the folder holds: the gateway holds the real one.

- ``accounts``: several accounts of the CLI's provider instead of one
  ``secrets_dir``: each a ``name``, its own ``secrets_dir`` holding the files
  ``secrets`` names, and optionally its own ``budget`` (tokens per the swarm's
  budget period, as the ledger counts them). Each task runs on one of them,
  chosen by the supervisor; one its provider refuses (a rate limit, a spent
  quota) rests until the time the provider gave, else for ``account_backoff``
  (the restart backoff's formula, doubling with each refusal in a row), and
  the task runs again on another. A CLI that goes through the gateway has the
  account's key (its ``key_env`` file) sent upstream by the gateway; one that
  cannot is given it.

A CLI's own limits are fields of its kind only where the CLI takes them on its
command line (claude-code's ``max_turns`` and ``max_budget_usd``); any other
field is refused, naming it. How each CLI is run is its spec in
``fireclaw.guest_daemon.clis``.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec
from fireclaw.config.common import Backoff, EnvName, PositiveSeconds
from msgspec import Meta

__all__ = [
    "ACCOUNT_NAME_PATTERN",
    "CLI_KINDS",
    "Account",
    "AiderHarnessSpec",
    "ClaudeCodeHarnessSpec",
    "CliHarnessBase",
    "CliHarnessSpec",
    "CliKind",
    "CodexHarnessSpec",
    "GeminiCliHarnessSpec",
    "OpencodeHarnessSpec",
]

CliKind = Literal["claude-code", "codex", "gemini-cli", "opencode", "aider"]
#: Every CLI kind, in the order the docs list them.
CLI_KINDS: Final[tuple[CliKind, ...]] = ("claude-code", "codex", "gemini-cli", "opencode", "aider")


#: An account's name: it goes into events, #control lines and the ledger.
ACCOUNT_NAME_PATTERN: Final = r"^[a-z0-9][a-z0-9_.-]{0,31}$"
SecretsDir = Annotated[str, Meta(min_length=1, max_length=4096)]


class Account(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One account of a CLI's provider: its secrets folder and its own budget."""

    name: Annotated[str, Meta(pattern=ACCOUNT_NAME_PATTERN)]
    secrets_dir: SecretsDir
    budget: Annotated[int, Meta(ge=0, le=10**15)] | None = None


class CliHarnessBase(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="kind"
):
    """What every CLI harness takes; see the module docstring."""

    timeout: PositiveSeconds = 900.0
    secrets_dir: SecretsDir | None = None
    secrets: Annotated[tuple[EnvName, ...], Meta(max_length=32)] = ()
    accounts: Annotated[tuple[Account, ...], Meta(max_length=64)] = ()
    account_backoff: Backoff = Backoff(base=60.0, max=3600.0)

    def __post_init__(self) -> None:
        if self.accounts and self.secrets_dir is not None:
            raise ValueError("secrets_dir: each account has its own secrets_dir; remove this one")
        if self.accounts and not self.secrets:
            raise ValueError("accounts: name in secrets the files each account's folder holds")
        if self.secrets and self.secrets_dir is None and not self.accounts:
            raise ValueError(
                f"secrets: {list(self.secrets)} name files of a folder: add secrets_dir"
            )
        if len(set(self.secrets)) != len(self.secrets):
            raise ValueError(f"secrets: {list(self.secrets)} names a variable twice")
        names = [a.name for a in self.accounts]
        if len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"accounts: {twice!r} is named twice")

    def account(self, name: str) -> Account | None:
        """The account called ``name``, if this harness has it."""
        return next((a for a in self.accounts if a.name == name), None)

    @property
    def kind(self) -> CliKind:
        tag = type(self).__struct_config__.tag
        assert isinstance(tag, str) and tag in CLI_KINDS
        return tag


class ClaudeCodeHarnessSpec(CliHarnessBase, frozen=True, kw_only=True, tag="claude-code"):
    """Claude Code (``claude -p``); ``max_turns`` and ``max_budget_usd`` are its own
    limits (``--max-turns``, ``--max-budget-usd``), held by the CLI itself."""

    max_turns: Annotated[int, Meta(ge=1, le=1000)] | None = None
    max_budget_usd: Annotated[float, Meta(gt=0, le=100_000)] | None = None


class CodexHarnessSpec(CliHarnessBase, frozen=True, kw_only=True, tag="codex"):
    """OpenAI Codex CLI (``codex exec --json``)."""


class GeminiCliHarnessSpec(CliHarnessBase, frozen=True, kw_only=True, tag="gemini-cli"):
    """Gemini CLI (``gemini --output-format stream-json``): it speaks only the Gemini
    API, so its traffic cannot go through the gateway; its key comes from ``secrets``."""


class OpencodeHarnessSpec(CliHarnessBase, frozen=True, kw_only=True, tag="opencode"):
    """opencode (``opencode run --format json``)."""


class AiderHarnessSpec(CliHarnessBase, frozen=True, kw_only=True, tag="aider"):
    """aider (``aider --message``), resumed from its chat history file."""


CliHarnessSpec = (
    ClaudeCodeHarnessSpec
    | CodexHarnessSpec
    | GeminiCliHarnessSpec
    | OpencodeHarnessSpec
    | AiderHarnessSpec
)
