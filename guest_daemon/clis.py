"""Coding-agent CLIs as harnesses: one declarative spec per CLI.

Each spec (a ``cli_spec.CliSpec``) says how to start its CLI headless with a
prompt and how to resume a session, where its state lives under the agent's
workspace, how to point it at the VM's model gateway, which of its own limits
it takes, and the decoder that turns its stream into ``cli_stream`` events
(``cli_decoders.py``). Adding a CLI is adding a spec to ``SPECS``.

What each CLI does, as its recorded streams show (tests/data/cli_streams/;
gemini-cli's are written from its docs)::

    kind         resume            usage           cost            questions     wire API
    claude-code  --resume ID       result.usage    total_cost_usd  permissions,  anthropic-messages
                                                   (its estimate)  turn limit
    codex        exec resume ID    turn.completed  -               -             openai-responses
    gemini-cli   --resume ID       result.stats    -               turn limit    - (Gemini only)
    opencode     run --session ID  step_finish     part.cost       -             openai-chat
    aider        its history file  "Tokens:" line  "Cost:" line    -             openai-chat
                 (no session id)   (2.2k: rounded)

Usage is always the CLI's own claim; where the gateway carries its traffic
(``Invocation.metered``) the gateway's own count is what the budget holds.
How each shows that it stopped for input is in ``cli_decoders.py``.

This module imports only the standard library and msgspec: it ships inside
VM images.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Final

from .cli_decoders import (
    decode_aider,
    decode_claude_code,
    decode_codex,
    decode_gemini_cli,
    decode_opencode,
)
from .cli_spec import GATEWAY_KEY, CliSpec, Gateway

# --- claude-code: claude -p --output-format stream-json --------------------------

CLAUDE_CODE: Final = CliSpec(
    name="claude-code",
    program="claude",
    package="npm:@anthropic-ai/claude-code",
    run=("-p", "--output-format", "stream-json", "--verbose", "--", "{prompt}"),
    resume=(
        "-p",
        "--output-format",
        "stream-json",
        "--verbose",
        "--resume",
        "{session}",
        "--",
        "{prompt}",
    ),
    model=("--model", "{model}"),
    turns=("--max-turns", "{turns}"),
    budget=("--max-budget-usd", "{budget}"),
    state={"CLAUDE_CONFIG_DIR": "config", "HOME": "home"},
    quiet={
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    },
    key_env="ANTHROPIC_API_KEY",
    gateway=Gateway(
        wire="anthropic-messages",
        env={
            "ANTHROPIC_BASE_URL": "{base}",
            # Its background calls (titles, summaries) go to the same model.
            "ANTHROPIC_SMALL_FAST_MODEL": "{model}",
            "ANTHROPIC_DEFAULT_HAIKU_MODEL": "{model}",
        },
    ),
    decode=decode_claude_code,
)


# --- codex: codex exec --json -------------------------------------------------------

CODEX: Final = CliSpec(
    name="codex",
    program="codex",
    package="npm:@openai/codex",
    run=("exec", "--json", "--skip-git-repo-check", "--", "{prompt}"),
    resume=("exec", "--json", "--skip-git-repo-check", "resume", "{session}", "--", "{prompt}"),
    model=("--model", "{model}"),
    state={"CODEX_HOME": "codex", "HOME": "home"},
    key_env="OPENAI_API_KEY",
    gateway=Gateway(
        wire="openai-responses",
        argv=(
            "-c",
            'model_provider="fireclaw"',
            "-c",
            'model_providers.fireclaw.name="fireclaw gateway"',
            "-c",
            'model_providers.fireclaw.base_url="{v1}"',
            "-c",
            'model_providers.fireclaw.wire_api="responses"',
            "-c",
            'model_providers.fireclaw.env_key="OPENAI_API_KEY"',
            "-c",
            "analytics.enabled=false",
            "-c",
            "check_for_update_on_startup=false",
        ),
    ),
    decode=decode_codex,
)


# --- gemini-cli: gemini -p ... --output-format stream-json ----------------------------

GEMINI_CLI: Final = CliSpec(
    name="gemini-cli",
    program="gemini",
    package="npm:@google/gemini-cli",
    run=("--output-format", "stream-json", "--skip-trust", "--prompt={prompt}"),
    resume=(
        "--output-format",
        "stream-json",
        "--skip-trust",
        "--resume",
        "{session}",
        "--prompt={prompt}",
    ),
    model=("--model", "{model}"),
    state={"HOME": "home"},
    key_env="GEMINI_API_KEY",
    # It takes another base URL (GOOGLE_GEMINI_BASE_URL) but speaks only the
    # Gemini API there, which the gateway does not; its turn limit is a
    # settings.json key (model.maxSessionTurns), not a flag.
    gateway=None,
    decode=decode_gemini_cli,
)


# --- opencode: opencode run --format json ----------------------------------------------


def _opencode_config(model: str) -> str:
    """OPENCODE_CONFIG_CONTENT: the gateway as an OpenAI-compatible provider."""
    return json.dumps(
        {
            "provider": {
                "fireclaw": {
                    "npm": "@ai-sdk/openai-compatible",
                    "name": "fireclaw gateway",
                    "options": {"baseURL": "{v1}", "apiKey": GATEWAY_KEY},
                    "models": {model: {"name": model}},
                }
            },
            "model": f"fireclaw/{model}",
            "autoupdate": False,
            "share": "disabled",
        },
        separators=(",", ":"),
    )


OPENCODE: Final = CliSpec(
    name="opencode",
    program="opencode",
    package="npm:opencode-ai",
    run=("run", "--format", "json", "--", "{prompt}"),
    resume=("run", "--format", "json", "--session", "{session}", "--", "{prompt}"),
    model=("--model", "fireclaw/{model}"),
    state={
        "HOME": "home",
        "XDG_CONFIG_HOME": "config",
        "XDG_DATA_HOME": "data",
        "XDG_CACHE_HOME": "cache",
        "XDG_STATE_HOME": "state",
    },
    quiet={
        "OPENCODE_DISABLE_AUTOUPDATE": "1",
        "OPENCODE_DISABLE_MODELS_FETCH": "1",
        "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
        "OPENCODE_DISABLE_DEFAULT_PLUGINS": "1",
        "OPENCODE_DISABLE_SHARE": "1",
    },
    key_env="",
    # The provider is named in the config; a model of another provider cannot
    # be reached through the gateway, so the model is always "fireclaw/...".
    gateway=Gateway(
        wire="openai-chat", env={"OPENCODE_CONFIG_CONTENT": _opencode_config("{model}")}
    ),
    decode=decode_opencode,
)


# --- aider: aider --message ... (plain text) ---------------------------------------------

#: Every aider run: headless, no git, no network of its own, its files under its state dir.
_AIDER_RUN: Final = (
    "--yes-always",
    "--no-git",
    "--no-auto-commits",
    "--no-pretty",
    "--no-stream",
    "--no-fancy-input",
    "--analytics-disable",
    "--no-check-update",
    "--no-show-release-notes",
    "--no-show-model-warnings",
    "--chat-history-file",
    "{state}/history.md",
    "--input-history-file",
    "{state}/input.history",
)
#: What aider would otherwise fetch from the network for a model it does not
#: know (and print the failure of into its output): the gateway's model's
#: limits, at no cost of its own (the gateway meters it).
_AIDER_METADATA: Final = (
    '{"openai/{model}": {"max_input_tokens": 8192, "max_output_tokens": 1024,'
    ' "input_cost_per_token": 0, "output_cost_per_token": 0,'
    ' "litellm_provider": "openai", "mode": "chat"}}'
)

AIDER: Final = CliSpec(
    name="aider",
    program="aider",
    package="pypi:aider-chat",
    run=(*_AIDER_RUN, "--message={prompt}"),
    # aider has no session id: a resume reads back the chat history file.
    resume=(*_AIDER_RUN, "--restore-chat-history", "--message={prompt}"),
    model=("--model", "openai/{model}"),
    state={"HOME": "home"},
    quiet={"LITELLM_LOCAL_MODEL_COST_MAP": "True"},
    key_env="OPENAI_API_KEY",
    gateway=Gateway(
        wire="openai-chat",
        argv=("--model-metadata-file", "{state}/model-metadata.json"),
        env={"OPENAI_API_BASE": "{v1}"},
        files={"model-metadata.json": _AIDER_METADATA},
    ),
    stream="text",
    decode=decode_aider,
)


SPECS: Final[Mapping[str, CliSpec]] = {
    spec.name: spec for spec in (CLAUDE_CODE, CODEX, GEMINI_CLI, OPENCODE, AIDER)
}
