"""What a command imports: the CLI starts in little more than the interpreter's time.

The installed ``fireclaw-swarm`` runs under ``python -X importtime`` against a
real supervisor (process backend), and the modules it imported are read from
that log: ``run`` and ``status`` must stay clear of the supervisor's own stack
(trio, msgspec, the config loader, pyroute2, psutil, the web and metrics
servers), of the HTTP libraries (h11 and http.client cost as much as the rest
of a command's start together) and of the standard library's other slow
imports (importlib.metadata and the email package behind it, shutil, ssl,
typing). The parser that the fast path builds must read every command line as
the full parser does.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable

import pytest
from fireclaw.supervisor import cli, cli_commands
from swarmctl import FIRECLAW, Swarm, idle, role_yaml, swarm_yaml

#: Modules (and packages, with everything under them) no API command may import.
HEAVY = frozenset(
    {
        "trio",
        "trio_websocket",
        "msgspec",
        "yaml",
        "pyroute2",
        "psutil",
        "starlette",
        "hypercorn",
        "prometheus_client",
        "xllamacpp",
        "irctokens",
        "sqlite3",
        "asyncio",
        "ssl",
        "email",
        "http",
        "importlib.metadata",
        "shutil",
        "fireclaw.config",
        "fireclaw.pool",
        "h11",
        "dataclasses",
        "inspect",
        # A few milliseconds on its own: the command modules name their types
        # for the type checker alone.
        "typing",
    }
)


def imported(stderr: bytes) -> set[str]:
    """The modules that ``-X importtime`` logged in ``stderr``."""
    names = set()
    for line in stderr.decode().splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name != "package":  # the log's own header line
                names.add(name)
    return names


def heavy(modules: set[str]) -> list[str]:
    """Those of ``modules`` that are, or are inside, one of ``HEAVY``."""
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


def cli_importtime(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """The installed command, run as a user runs it, under ``-X importtime``."""
    return subprocess.run(
        [sys.executable, "-X", "importtime", FIRECLAW, *argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
    )


def test_run_and_status_import_nothing_heavy(make_swarm: Callable[..., Swarm]) -> None:
    swarm = make_swarm(swarm_yaml(role_yaml("worker", min_idle=1)))
    swarm.wait_for("an idle worker", idle("worker", 1))
    state = str(swarm.state)

    status = cli_importtime("--state-dir", state, "status")
    assert status.returncode == 0, status.stderr[-2000:]
    assert b"worker-0  worker  idle" in status.stdout
    run = cli_importtime("--state-dir", state, "run", "--", "echo", "from the guest")
    assert (run.returncode, run.stdout) == (0, b"from the guest\n"), run.stderr[-2000:]

    for done in (run, status):
        modules = imported(done.stderr)
        # The log was read: the command's own modules are in it.
        assert {"fireclaw.supervisor.cli", "fireclaw.supervisor.client"} <= modules
        assert heavy(modules) == []


def test_commands_that_never_reach_the_daemon_do_not_import_the_client() -> None:
    done = cli_importtime("--help")
    assert done.returncode == 0
    assert b"run a command in a pooled VM" in done.stdout
    modules = imported(done.stderr)
    assert "fireclaw.supervisor.cli" in modules
    assert heavy(modules) == []
    assert {"socket", "fireclaw.supervisor.client"}.isdisjoint(modules)


def test_the_version_is_read_when_asked_for() -> None:
    done = cli_importtime("--version")
    assert (done.returncode, done.stdout) == (0, f"fireclaw-swarm {cli.version()}\n".encode())
    assert "importlib.metadata" in imported(done.stderr)


# ---------------------------------------------------------------- the fast path's parser


def full(argv: list[str]) -> argparse.Namespace | str:
    """What the full parser makes of ``argv``: a namespace, or its usage error."""
    try:
        return cli.build_parser().parse_args(argv)
    except cli_commands.UsageError as exc:
        return str(exc)


def fast(argv: list[str]) -> argparse.Namespace | str:
    try:
        return cli.parse_args(argv)
    except cli_commands.UsageError as exc:
        return str(exc)


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["--state-dir", "/s", "status", "--json"],
        ["--state-dir=/s", "--config=/c.yaml", "run", "--role", "coder", "--", "sh", "-c", "x"],
        ["run", "--", "status"],
        ["--config", "/c.yaml", "task", "worker", "hi", "--wait", "--timeout", "5"],
        ["scale", "worker", "3"],
        ["image", "build", "--package", "podman"],
        ["usage", "--by", "role", "--since", "12h"],
        ["logs", "-f", "--agent", "alice"],
        ["--state-dir", "status", "run"],  # "status" is the state dir
        # Read by the full parser alone, or refused: the same answer either way.
        ["--state", "/s", "status"],  # an abbreviated global option
        ["--state-dir"],
        ["status", "status"],
        ["scale", "worker", "-1"],
        ["tasks", "--state", "lost"],
        ["usage", "--since", "yesterday"],
        ["run"],
        ["frobnicate"],
        [],
    ],
)
def test_the_fast_path_reads_a_command_line_as_the_full_parser(argv: list[str]) -> None:
    expected = full(argv)
    got = fast(argv)
    if isinstance(expected, argparse.Namespace) and isinstance(got, argparse.Namespace):
        if "since" in vars(expected):  # an age is read against the clock at parse time
            assert abs(got.since - expected.since) < 60
            got.since = expected.since
    assert got == expected


def test_a_one_command_parser_holds_that_command_alone() -> None:
    only_run = cli.build_parser("run")
    assert only_run.parse_args(["run", "true"]).func is cli.cmd_run
    with pytest.raises(cli_commands.UsageError, match="invalid choice: 'status'"):
        only_run.parse_args(["status"])


@pytest.mark.parametrize(
    ("argv", "parser"),
    [
        (["--help", "status"], []),
        (["--state-dir", "/s", "run", "--help"], ["run"]),
        (["image", "build", "-h"], ["image", "build"]),
    ],
)
def test_help_is_the_full_parsers(
    argv: list[str], parser: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 0
    shown = capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([*parser, "--help"])
    assert shown == capsys.readouterr().out
    assert "usage: fireclaw-swarm" in shown
