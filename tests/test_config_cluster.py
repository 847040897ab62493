"""swarm.yaml's ``cluster:`` section: parsed, anchored, and refused in one line
naming the field when it is wrong or carries a secret."""

from __future__ import annotations

import pathlib

import pytest
from fireclaw.config import ClusterSpec, ConfigError, parse_config


def parse(tmp_path: pathlib.Path, cluster: str) -> ClusterSpec | None:
    text = f"version: 1\nroles: {{}}\n{cluster}"
    return parse_config(text, path=tmp_path / "swarm.yaml").cluster


def refusal(tmp_path: pathlib.Path, cluster: str) -> str:
    with pytest.raises(ConfigError) as refused:
        parse(tmp_path, cluster)
    message = str(refused.value)
    assert "\n" not in message
    return message


def test_no_section_is_one_host(tmp_path: pathlib.Path) -> None:
    assert parse(tmp_path, "") is None


def test_a_cluster_with_its_password_file_anchored_at_the_config(tmp_path: pathlib.Path) -> None:
    spec = parse(
        tmp_path,
        "cluster:\n  database: postgresql://fireclaw@db.internal:5433/fleet\n"
        "  host: alpha.rack-1\n  password_file: secrets/pg\n",
    )
    assert spec == ClusterSpec(
        database="postgresql://fireclaw@db.internal:5433/fleet",
        host="alpha.rack-1",
        password_file=str(tmp_path.resolve() / "secrets" / "pg"),
    )
    bare = parse(tmp_path, "cluster: {database: 'postgres://f@/fleet?host=/run/postgresql'}\n")
    assert bare is not None and (bare.host, bare.password_file) == (None, None)


@pytest.mark.parametrize(
    "database",
    ["postgresql://fireclaw:hunter2@db/fleet", "postgresql://fireclaw@db/fleet?password=hunter2"],
)
def test_a_password_in_the_url_is_refused_without_repeating_it(
    tmp_path: pathlib.Path, database: str
) -> None:
    message = refusal(tmp_path, f"cluster: {{database: '{database}'}}\n")
    assert message.startswith(f"{tmp_path / 'swarm.yaml'}: cluster.database: a password is never")
    assert "password_file" in message and "hunter2" not in message


def test_an_inline_password_is_refused(tmp_path: pathlib.Path) -> None:
    message = refusal(tmp_path, "cluster: {database: 'postgresql://f@db/x', password: hunter2}\n")
    assert "cluster.password: a secret is never written in swarm.yaml" in message
    assert "hunter2" not in message


@pytest.mark.parametrize(
    ("cluster", "field", "words"),
    [
        ("cluster: {database: 'mysql://db/x'}", "cluster.database", "a postgresql:// URL"),
        ("cluster: {database: 'host=db dbname=x'}", "cluster.database", "a postgresql:// URL"),
        ("cluster: {database: ''}", "cluster.database", ""),
        ("cluster: {database: 'postgresql://f@db/x', host: 'a b'}", "cluster.host", ""),
        ("cluster: {database: 'postgresql://f@db/x', hosts: a}", "cluster", "hosts"),
        ("cluster: {host: a}", "cluster", "database"),
    ],
)
def test_bad_sections_name_the_field(
    tmp_path: pathlib.Path, cluster: str, field: str, words: str
) -> None:
    message = refusal(tmp_path, cluster + "\n")
    assert f"swarm.yaml: {field}" in message and words in message
