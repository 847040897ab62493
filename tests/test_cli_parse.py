"""The fireclaw-swarm command line: parsing, exit codes, and end to end against a served API."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import types
from collections.abc import AsyncGenerator
from typing import cast

import pytest
import trio
from fireclaw.pool.runs import RunEvent, RunExited, RunOutput, RunStarted
from fireclaw.supervisor import cli, cli_commands, cli_format
from fireclaw.supervisor.api import ControllerError, serve_api

ENTRY = "from fireclaw.supervisor.cli import main; raise SystemExit(main())"


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(list(argv))


def test_run_keeps_everything_after_the_double_dash() -> None:
    args = parse("run", "--", "sh", "-c", "exit 3")
    assert args.cmd == "run"
    assert args.role is None
    assert args.user is None
    assert args.command == ["--", "sh", "-c", "exit 3"]  # cmd_run drops the leading "--"
    assert parse("run", "--user", "root", "--", "id").user == "root"


def test_run_options_after_the_double_dash_belong_to_the_command() -> None:
    args = parse("run", "--role", "coder", "--", "echo", "--role", "x", "--help")
    assert args.role == "coder"
    assert args.command == ["--", "echo", "--role", "x", "--help"]


def test_run_without_double_dash() -> None:
    assert parse("run", "ls", "-l").command == ["ls", "-l"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--state-dir", "/s", "--config", "/c.yaml", "status"],
        ["status", "--state-dir", "/s", "--config", "/c.yaml"],
        ["--config", "/c.yaml", "status", "--state-dir", "/s"],
    ],
)
def test_global_options_before_or_after_the_command(argv: list[str]) -> None:
    args = parse(*argv)
    assert (args.state_dir, args.config) == ("/s", "/c.yaml")


def test_defaults() -> None:
    args = parse("status")
    assert (args.state_dir, args.config, args.json) == (None, None, False)
    args = parse("task", "worker", "write a poem", "--wait")
    assert (args.role, args.prompt, args.wait, args.timeout) == (
        "worker",
        "write a poem",
        True,
        3600.0,
    )
    args = parse("scale", "worker", "3")
    assert (args.role, args.n) == ("worker", 3)
    args = parse("logs", "-f")
    assert (args.follow, args.after) == (True, 0)
    assert parse("tasks", "--state", "done").state == "done"
    assert parse("up", "--config", "x.yaml").config == "x.yaml"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["scale", "worker", "-1"],
        ["scale", "worker", "many"],
        ["tasks", "--state", "lost"],
        ["run"],
        ["run", "--role", "worker", "--"],
        ["status", "--bogus"],
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fireclaw-swarm: ")
    assert err.count("\n") == 1


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "run" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("code", "status"),
    [(0, 0), (1, 1), (3, 3), (255, 255), (300, 255), (-9, 137), (-15, 143), (-2, 130)],
)
def test_exit_status(code: int, status: int) -> None:
    assert cli_commands.exit_status(code) == status


def test_socket_path_from_option_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIRECLAW_STATE_DIR", "/from/env")
    assert cli_commands.socket_path(parse("status", "--state-dir", "/opt")) == "/opt/api.sock"
    assert cli_commands.socket_path(parse("status")) == "/from/env/api.sock"


def test_socket_path_from_config(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    import fireclaw.config

    monkeypatch.delenv("FIRECLAW_STATE_DIR", raising=False)
    seen: list[str] = []

    def load_config(path: str) -> object:
        seen.append(path)
        return types.SimpleNamespace(state_dir=tmp_path / "state")

    monkeypatch.setattr(fireclaw.config, "load_config", load_config)
    assert cli_commands.socket_path(parse("status")) == os.fspath(tmp_path / "state" / "api.sock")
    assert cli_commands.socket_path(parse("status", "--config", "other.yaml"))
    assert seen == ["swarm.yaml", "other.yaml"]


def test_config_error_exits_78(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fireclaw.config import ConfigError, load_config

    monkeypatch.delenv("FIRECLAW_STATE_DIR", raising=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text("state_dir: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert cli.main(["status", "--config", os.fspath(bad)]) == 78
    assert capsys.readouterr().err == f"fireclaw-swarm: {info.value}\n"


def test_status_without_a_daemon(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--state-dir", os.fspath(tmp_path), "status"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"fireclaw-swarm: no fireclaw-swarm is running on {tmp_path / 'api.sock'} "
        "(start it with `fireclaw-swarm up`)\n"
    )


def test_unexpected_errors_are_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def explode(args: object) -> int:
        raise ValueError("bad\nthing")

    monkeypatch.delenv("FIRECLAW_DEBUG", raising=False)
    monkeypatch.setattr(cli, "cmd_version", explode)
    assert cli.main(["version"]) == 1
    assert capsys.readouterr().err == "fireclaw-swarm: internal error: ValueError: bad thing\n"


def test_status_table() -> None:
    text = cli_format.format_status(
        {
            "pid": 12,
            "backend": "process",
            "tasks": {"queued": 2},
            "roles": {"worker": {"idle": 1, "active": 2, "failed": 0, "degraded": False}},
            "agents": [
                {"name": "worker-0", "role": "worker", "state": "idle", "pid": None, "restarts": 4},
                {
                    "name": "worker-1",
                    "role": "worker",
                    "state": "active",
                    "pid": 77,
                    "restarts": 0,
                    "agent": "alice",
                },
            ],
        }
    )
    assert text.splitlines() == [
        "fireclaw-swarm: pid 12; backend process; tasks queued 2",
        "",
        "ROLE    IDLE  ACTIVE  FAILED  DEGRADED",
        "worker  1     2       0       no",
        "",
        "VM        ROLE    STATE   PID  RESTARTS  AGENT",
        "worker-0  worker  idle    -    4         -",
        "worker-1  worker  active  77   0         alice",
    ]


def test_event_line() -> None:
    line = cli_format.format_event(
        {
            "id": 3,
            "at": 0,
            "kind": "restart",
            "subject": "worker-0",
            "detail": {"reason": "exit 1", "delay": 1.5, "by": "hb"},
        }
    )
    assert line.startswith("3 ")
    assert line.endswith(' restart worker-0 reason="exit 1" delay=1.5 by=hb')


# ---------------------------------------------------------------- end to end


class FakeController:
    def __init__(self) -> None:
        self.polls = 0

    async def status(self) -> dict[str, object]:
        return {
            "pid": 99,
            "roles": {"worker": {"idle": 1, "active": 0, "failed": 1, "degraded": True}},
            "agents": [
                {
                    "name": "worker-0",
                    "role": "worker",
                    "state": "failed",
                    "pid": 4242,
                    "restarts": 6,
                }
            ],
        }

    async def run(
        self, role: str | None, argv: list[str], user: str = ""
    ) -> AsyncGenerator[RunEvent, None]:
        if user:
            yield RunOutput(stream="stdout", data=f"as {user}\n".encode())
            yield RunExited(code=0)
            return
        if role == "nope":
            raise ControllerError("no role named 'nope'", 404)
        yield RunStarted(vm="worker-0")
        if argv == ["sh", "-c", "exit 3"]:
            yield RunOutput(stream="stdout", data=b"hello \x00\xff\n")
            yield RunOutput(stream="stderr", data=b"oops\n")
            yield RunExited(code=3)
        elif argv == ["kill-me"]:
            yield RunExited(code=-9)
        else:
            yield RunExited(code=0)

    async def submit_task(self, role: str, prompt: str) -> dict[str, object]:
        return {"id": 5, "role": role, "prompt": prompt, "state": "queued"}

    async def get_task(self, task_id: int) -> dict[str, object]:
        self.polls += 1
        state = "claimed" if self.polls < 2 else "done"
        return {"id": task_id, "state": state, "result": "a poem\n" if state == "done" else ""}

    async def list_tasks(self, state: str | None) -> list[dict[str, object]]:
        return [
            {
                "id": 5,
                "role": "worker",
                "state": "queued",
                "attempts": 0,
                "owner": None,
                "prompt": "write a poem",
            }
        ]

    async def scale(self, role: str, n: int) -> dict[str, object]:
        return {"role": role, "target": n}

    async def reset(self, name: str) -> dict[str, object]:
        return {"reset": 1}

    async def reload(self) -> dict[str, object]:
        return {"ok": False, "error": "swarm.yaml: roles: expected a mapping", "applied": None}

    async def events(self, after: int, limit: int) -> list[dict[str, object]]:
        started: list[dict[str, object]] = [
            {"id": i, "at": 1.0, "kind": "started", "subject": "supervisor", "detail": {}}
            for i in (1, 2)
        ]
        return [e for e in started + AUDIT if cast(int, e["id"]) > after][:limit]

    async def cancel(self, name: str, reason: str) -> dict[str, object]:
        if name != "alice":
            raise ControllerError(f"no agent or VM named {name!r}", 404)
        return {"name": name, "vm": "worker-1", "cancelled": True}

    async def down(self, leave_vms: bool = False) -> dict[str, object]:
        return {"stopping": True}


#: An agent's audit trail, after the two ``started`` events: alice's tool run and
#: model call, and bob's (whose tool output would rewrite a terminal).
AUDIT: list[dict[str, object]] = [
    {
        "id": 3,
        "at": 2.0,
        "kind": "tool_ran",
        "subject": "alice",
        "detail": {"agent": "alice", "vm": "worker-1", "tool": "run_shell", "exit_code": 0},
    },
    {
        "id": 4,
        "at": 3.0,
        "kind": "tool_ran",
        "subject": "bob",
        "detail": {"agent": "bob", "vm": "worker-2", "tool": "run_shell", "output": "\x1b[2J"},
    },
    {
        "id": 5,
        "at": 4.0,
        "kind": "model_call",
        "subject": "alice",
        "detail": {"agent": "alice", "vm": "worker-1", "prompt_tokens": 30},
    },
]


async def fireclaw_swarm(state_dir: pathlib.Path, *argv: str) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIRECLAW_")}
    with trio.fail_after(30):
        return await trio.run_process(
            [sys.executable, "-c", ENTRY, "--state-dir", os.fspath(state_dir), *argv],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )


@pytest.fixture
async def state_dir(nursery: trio.Nursery, tmp_path: pathlib.Path) -> pathlib.Path:
    await nursery.start(serve_api, tmp_path / "api.sock", FakeController())
    return tmp_path


async def test_run_end_to_end(state_dir: pathlib.Path) -> None:
    done = await fireclaw_swarm(state_dir, "run", "--", "sh", "-c", "exit 3")
    assert (done.returncode, done.stdout, done.stderr) == (3, b"hello \x00\xff\n", b"oops\n")
    done = await fireclaw_swarm(state_dir, "run", "--", "kill-me")
    assert (done.returncode, done.stdout, done.stderr) == (137, b"", b"")
    done = await fireclaw_swarm(state_dir, "run", "--role", "nope", "--", "true")
    assert (done.returncode, done.stderr) == (1, b"fireclaw-swarm: no role named 'nope'\n")
    done = await fireclaw_swarm(state_dir, "run", "--user", "root", "--", "id")
    assert (done.returncode, done.stdout) == (0, b"as root\n")


async def test_status_end_to_end(state_dir: pathlib.Path) -> None:
    done = await fireclaw_swarm(state_dir, "status")
    assert done.returncode == 0, done.stderr
    assert b"worker-0  worker  failed  4242  6" in done.stdout
    assert b"worker  1     0       1       yes" in done.stdout
    done = await fireclaw_swarm(state_dir, "status", "--json")
    assert b'"pid": 99' in done.stdout


async def test_other_commands_end_to_end(state_dir: pathlib.Path) -> None:
    done = await fireclaw_swarm(state_dir, "task", "worker", "write a poem")
    assert (done.returncode, done.stdout) == (0, b"5\n")
    done = await fireclaw_swarm(
        state_dir, "task", "worker", "write a poem", "--wait", "--timeout", "20"
    )
    assert (done.returncode, done.stdout) == (0, b"a poem\n"), done.stderr
    done = await fireclaw_swarm(state_dir, "tasks")
    assert b"5   worker  queued  0         -      write a poem" in done.stdout
    done = await fireclaw_swarm(state_dir, "scale", "worker", "3")
    assert (done.returncode, done.stdout) == (0, b"worker: scaled to 3\n")
    done = await fireclaw_swarm(state_dir, "reload")
    assert (done.returncode, done.stderr) == (
        78,
        b"fireclaw-swarm: reload rejected: swarm.yaml: roles: expected a mapping\n",
    )
    done = await fireclaw_swarm(state_dir, "logs")
    assert done.returncode == 0
    assert [line.split()[0] for line in done.stdout.splitlines()] == [b"1", b"2", b"3", b"4", b"5"]
    assert b"\x1b" not in done.stdout  # a guest's bytes never reach the terminal raw
    done = await fireclaw_swarm(state_dir, "logs", "--agent", "alice")
    assert [line.split()[0] for line in done.stdout.splitlines()] == [b"3", b"5"]
    done = await fireclaw_swarm(state_dir, "logs", "--agent", "worker-2", "--json")
    assert [json.loads(line) for line in done.stdout.splitlines()] == [AUDIT[1]]
    done = await fireclaw_swarm(state_dir, "stop", "alice")
    assert (done.returncode, done.stdout) == (0, b"alice: stopped what it was doing\n")
    done = await fireclaw_swarm(state_dir, "stop", "nobody")
    assert (done.returncode, done.stderr) == (1, b"fireclaw-swarm: no agent or VM named 'nobody'\n")
    done = await fireclaw_swarm(state_dir, "down")
    assert (done.returncode, done.stdout) == (0, b"stopping\n")


async def test_no_daemon_end_to_end(tmp_path: pathlib.Path) -> None:
    done = await fireclaw_swarm(tmp_path, "status")
    assert done.returncode == 1
    assert done.stdout == b""
    assert done.stderr.count(b"\n") == 1
    assert done.stderr.startswith(b"fireclaw-swarm: no fireclaw-swarm is running on ")
