"""The coding-agent CLI harness kinds in swarm.yaml: what loads, and one line for what does not."""

from __future__ import annotations

import pathlib
import textwrap

import pytest
from fireclaw.config import (
    CLI_KINDS,
    ClaudeCodeHarnessSpec,
    Config,
    ConfigError,
    load_config,
    role_hash,
)
from fireclaw.config.cli_harness import AiderHarnessSpec, OpencodeHarnessSpec

TEMPLATE = """\
name: {name}
description: role {name}
nick_pattern: "{name}-{{n}}"
persona: a test role
model: smollm2
harness:
  command: [echo, "{{prompt}}"]
"""


@pytest.fixture
def swarm_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    (tmp_path / "roles").mkdir()
    (tmp_path / "roles" / "alpha.yaml").write_text(TEMPLATE.format(name="alpha"))
    return tmp_path


def load(swarm_dir: pathlib.Path, body: str) -> Config:
    path = swarm_dir / "swarm.yaml"
    path.write_text(textwrap.dedent(body))
    return load_config(path)


def error_of(swarm_dir: pathlib.Path, harness: str, *, models: bool = True) -> str:
    head = "version: 1\n" + ("models: {server: managed}\n" if models else "")
    with pytest.raises(ConfigError) as info:
        load(swarm_dir, f"{head}roles:\n  alpha:\n    harness: {harness}\n")
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(str(swarm_dir / "swarm.yaml") + ": ")
    return text


@pytest.mark.parametrize("kind", [k for k in CLI_KINDS if k != "gemini-cli"])
def test_each_cli_kind_loads_with_defaults(swarm_dir: pathlib.Path, kind: str) -> None:
    config = load(
        swarm_dir,
        "version: 1\nmodels: {server: managed}\nroles:\n  alpha:\n"
        f"    harness: {{kind: {kind}}}\n",
    )
    harness = config.roles["alpha"].harness
    assert harness.kind == kind
    assert harness.timeout == 900.0
    assert harness.secrets == () and harness.secrets_dir is None  # type: ignore[union-attr]


def test_claude_code_takes_its_own_limits(swarm_dir: pathlib.Path) -> None:
    config = load(
        swarm_dir,
        """\
        version: 1
        models: {server: managed}
        roles:
          alpha:
            harness: {kind: claude-code, max_turns: 4, max_budget_usd: 0.5, timeout: 60}
        """,
    )
    harness = config.roles["alpha"].harness
    assert harness == ClaudeCodeHarnessSpec(max_turns=4, max_budget_usd=0.5, timeout=60.0)
    other = load(
        swarm_dir,
        "version: 1\nmodels: {server: managed}\nroles:\n  alpha:\n"
        "    harness: {kind: claude-code, max_turns: 5, max_budget_usd: 0.5, timeout: 60}\n",
    )
    # A new limit is a new VM spec: the role's VMs are replaced on reload.
    assert role_hash(config.roles["alpha"]) != role_hash(other.roles["alpha"])


def test_secrets_dir_is_resolved_against_swarm_yaml(swarm_dir: pathlib.Path) -> None:
    config = load(
        swarm_dir,
        """\
        version: 1
        models: {server: managed}
        roles:
          alpha:
            harness: {kind: aider, secrets_dir: keys/alpha, secrets: [OPENAI_API_KEY]}
        """,
    )
    assert config.roles["alpha"].harness == AiderHarnessSpec(
        secrets_dir=str((swarm_dir / "keys" / "alpha").resolve()), secrets=("OPENAI_API_KEY",)
    )


def test_gemini_cli_loads_with_its_key_among_its_secrets(swarm_dir: pathlib.Path) -> None:
    # It cannot go through the gateway, so it needs no model server, but its own key.
    config = load(
        swarm_dir,
        "version: 1\nroles:\n  alpha:\n"
        "    harness: {kind: gemini-cli, secrets_dir: /run/keys, secrets: [GEMINI_API_KEY]}\n",
    )
    assert config.roles["alpha"].harness.kind == "gemini-cli"


@pytest.mark.parametrize(
    ("harness", "expected"),
    [
        (
            "{kind: opencode, max_turns: 3}",
            "roles.alpha.harness.max_turns: unknown field; expected one of: timeout,"
            " secrets_dir, secrets",
        ),
        (
            "{kind: claude-code, max_turns: 0}",
            "roles.alpha.harness.max_turns: expected int >= 1, got 0",
        ),
        (
            "{kind: claude-code, max_budget_usd: 0}",
            "roles.alpha.harness.max_budget_usd: expected float > 0.0, got 0",
        ),
        (
            "{kind: codex, timeout: 0}",
            "roles.alpha.harness.timeout: expected float > 0.0, got 0",
        ),
        (
            "{kind: aider, secrets: [OPENAI_API_KEY]}",
            "roles.alpha.harness.secrets: ['OPENAI_API_KEY'] name files of a folder:"
            " add secrets_dir",
        ),
        (
            "{kind: aider, secrets_dir: k, secrets: [A, A]}",
            "roles.alpha.harness.secrets: ['A', 'A'] names a variable twice",
        ),
        (
            "{kind: aider, secrets_dir: k, secrets: [not-a-var]}",
            "roles.alpha.harness.secrets[0]: expected an environment variable name: letters,"
            " digits and '_', not starting with a digit, got 'not-a-var'",
        ),
        (
            "{kind: gemini-cli}",
            "roles.alpha.harness.secrets: gemini-cli cannot go through the VM's gateway and"
            " needs its own key: name GEMINI_API_KEY in secrets and put its file in secrets_dir",
        ),
    ],
)
def test_cli_harness_errors_are_one_line(
    swarm_dir: pathlib.Path, harness: str, expected: str
) -> None:
    msg = error_of(swarm_dir, harness)
    assert msg.split(": ", 1)[1].startswith(expected), msg


def test_a_cli_that_goes_through_the_gateway_needs_a_model_server(
    swarm_dir: pathlib.Path,
) -> None:
    msg = error_of(swarm_dir, "{kind: opencode}", models=False)
    assert msg.endswith(
        "swarm.yaml: roles.alpha.harness.kind: opencode asks a model through the VM's gateway:"
        " add a models: section (server: managed runs one here)"
    )


def test_a_kind_is_one_struct_each() -> None:
    # The tag is what the union dispatches on, and what the guest's spec is looked up by.
    assert OpencodeHarnessSpec().kind == "opencode"
    assert ClaudeCodeHarnessSpec().kind == "claude-code"
