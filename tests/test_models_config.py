"""fireclaw.config: the `models:` and `budget:` sections, and their one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from fireclaw.config import ConfigError, parse_config
from fireclaw.config.llm import MODEL_SERVER_RESTART, parse_base_url

#: A role that asks no model (the shipped worker chats): its harness is a command.
ROLES = "roles:\n  worker: {harness: {command: ['true']}}\n"


def load(tmp_path: Path, text: str) -> object:
    return parse_config("version: 1\n" + text + ROLES, path=tmp_path / "swarm.yaml")


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_without_a_models_section_there_is_no_model_server(tmp_path: Path) -> None:
    config = load(tmp_path, "")
    assert config.models is None  # type: ignore[attr-defined]


def test_managed_is_the_default_and_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    config = load(tmp_path, "models:\n  managed: {model: m/x.gguf, restart: {policy: no}}\n")
    models = config.models  # type: ignore[attr-defined]
    assert models.is_managed and models.managed.name == "smollm2"
    assert config.model_path == tmp_path / "m" / "x.gguf"  # type: ignore[attr-defined]
    # A policy alias and the model server's own backoff defaults under it.
    assert models.managed.restart.policy == "temporary"
    assert models.managed.restart.backoff == MODEL_SERVER_RESTART.backoff


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "models:\n  managed: {listen: 0.0.0.0}\n",
            "swarm.yaml: models.managed.listen: 0.0.0.0 is not a loopback address;"
            " VMs reach the model server only through their gateways",
        ),
        (
            "models:\n  server: ftp://x/v1\n",
            "swarm.yaml: models.server: expected 'managed' or an http(s) URL such as"
            " http://127.0.0.1:11434/v1, got 'ftp://x/v1'",
        ),
        (
            "models:\n  api_key_file: k\n",
            "swarm.yaml: models.server: the managed server takes no API key; name a URL to use one",
        ),
        (
            "models:\n  server: http://127.0.0.1:1/v1\n  api_key_file: k\n  api_key_env: K\n",
            "swarm.yaml: models.api_key_file: give api_key_file or api_key_env, not both",
        ),
        (
            "models:\n  api_key: sk-123\n",
            "swarm.yaml: models.api_key: unknown field; expected one of: server, managed,"
            " api_key_file, api_key_env, max_request_bytes, max_concurrent, call_timeout",
        ),
        (
            "budget: {roles: {coder: 5}}\n",
            "swarm.yaml: budget.roles.coder: no role 'coder' (roles: worker)",
        ),
        (
            "budget: {period: fortnight}\n",
            "swarm.yaml: budget.period: expected one of: day, hour, month, week; got 'fortnight'",
        ),
        ("budget: {swarm: -1}\n", "swarm.yaml: budget.swarm: expected int >= 0, got -1"),
    ],
)
def test_bad_models_and_budgets_are_one_line(tmp_path: Path, text: str, expected: str) -> None:
    assert error(tmp_path, text).endswith(expected)


def test_a_key_is_never_a_field_of_the_file(tmp_path: Path) -> None:
    message = error(tmp_path, "models:\n  server: http://h:1/v1\n  api_key: sk-secret\n")
    assert "sk-secret" not in message


def test_parse_base_url() -> None:
    assert parse_base_url("http://127.0.0.1:11434/v1/") == ("http", "127.0.0.1", 11434, "/v1")
    assert parse_base_url("https://api.example.com/v1") == ("https", "api.example.com", 443, "/v1")
    assert parse_base_url("http://[::1]:8080") == ("http", "::1", 8080, "")
    with pytest.raises(ValueError, match="port"):
        parse_base_url("http://h:99999/v1")


def test_usage_since_takes_unix_seconds_dates_and_ages() -> None:
    import datetime as dt
    import time

    from fireclaw.supervisor.cli import build_parser
    from fireclaw.supervisor.cli_commands import UsageError

    def since(text: str) -> float:
        args = build_parser().parse_args(["usage", "--since", text])
        value: float = args.since
        return value

    assert since("1700000000") == 1700000000.0
    assert since("2026-02-18") == dt.datetime(2026, 2, 18, tzinfo=dt.UTC).timestamp()
    assert (
        since("2026-02-18T10:00:00+02:00") == dt.datetime(2026, 2, 18, 8, tzinfo=dt.UTC).timestamp()
    )
    assert abs(since("12h") - (time.time() - 12 * 3600)) < 60
    with pytest.raises(UsageError, match="'yesterday' is not unix seconds"):
        build_parser().parse_args(["usage", "--since", "yesterday"])
