"""``fireclaw-swarm doctor`` on who may command the swarm over IRC."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from fireclaw.config import parse_config
from fireclaw.supervisor.doctor import irc_operators
from swarmctl import FIRECLAW

CLI_DEADLINE = 60.0  # seconds; doctor takes about one here
BASE = "version: 1\nbackend: process\nroles: {}\n"


def doctor(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``fireclaw-swarm doctor --config CONFIG``, the real command, run to its end."""
    return subprocess.run(
        [FIRECLAW, "doctor", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=CLI_DEADLINE,
        check=False,
        env=env,
    )


@pytest.mark.parametrize(
    ("irc", "summary", "warned"),
    [
        (
            "{}",
            "operators: /OPER fireclaw <{state}/secrets/irc-operator-fireclaw>, from"
            " *!*@127.0.0.1, *!*@localhost, *!*@::1, *!*@[0::1]",
            False,
        ),
        (
            "{server: 'irc.example:6697', operators: ['*!*@*'], operator_auth: account,"
            " operator_accounts: [alice]}",
            "operators: accounts alice, from *!*@*",
            False,
        ),
        (
            "{server: 'irc.example:6697', operators: ['a!*@*']}",
            "operators: the server's IRC operators, from a!*@*",
            False,
        ),
        (
            "{operator_auth: hostmask, operators: ['*!*@*']}",
            "operators by hostmask alone (*!*@*)",
            True,
        ),
        ("{enabled: false, operator_auth: hostmask}", "off", False),
    ],
)
def test_irc_operators_summary(tmp_path: Path, irc: str, summary: str, warned: bool) -> None:
    config = parse_config(BASE + f"irc: {irc}\n", path=tmp_path / "swarm.yaml")
    state = tmp_path / "state"
    text, warnings = irc_operators(config, state)
    assert text == summary.format(state=state)
    assert bool(warnings) == warned
    if warned:
        (warning,) = warnings
        assert warning.startswith("irc.operator_auth is hostmask: anyone who can connect")


def test_doctor_warns_about_hostmask_operators(tmp_path: Path) -> None:
    config = tmp_path / "swarm.yaml"
    config.write_text(BASE + "irc: {operator_auth: hostmask}\n")
    done = doctor(config)
    lines = done.stdout.splitlines()
    assert [line for line in lines if line.startswith("warning")] == [
        "warning       irc.operator_auth is hostmask: anyone who can connect from an address"
        " matching irc.operators (*!*@127.0.0.1, *!*@localhost, *!*@::1, *!*@[0::1]) can"
        " command the swarm; use oper"
    ], done.stdout + done.stderr
    assert "irc           operators by hostmask alone (*!*@127.0.0.1," in done.stdout
