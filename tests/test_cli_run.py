"""The guest running a coding-agent CLI (guest_daemon/cli_run.py), against a stand-in.

The CLI here is a test double named as such: a small program under the real
CLI's name that writes down how it was started (argv, the environment it was
given) and replays a stream the real CLI recorded (tests/data/cli_streams/).
The runner around it is real: real processes, as another user where the test
runs as root, the workspace's real files. The real CLIs run in
tests/test_cli_e2e.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from fireclaw.guest_daemon.cli_run import (
    EXIT_SETUP,
    MAX_AUDITED_TOOLS,
    RESUMABLE,
    SESSION_FILE,
    USAGE_TOOL,
    CliOutcome,
    run_cli,
    tool_name,
)
from fireclaw.guest_daemon.cli_spec import GATEWAY_KEY
from fireclaw.guest_daemon.harness import Children
from fireclaw.guest_daemon.protocol import CliHarness, SecretEnv
from fireclaw.guest_daemon.users import RunAs, lookup, lookup_self

STREAMS = Path(__file__).parent / "data" / "cli_streams"

#: The stand-in runs as the agent user, who may not enter this venv's home.
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

STAND_IN = f"""\
#!{PYTHON}
# A stand-in for a coding-agent CLI: it notes how it was started, then replays a stream.
import json, os, sys
with open(os.environ["STAND_IN_LOG"], "a") as log:
    log.write(json.dumps({{"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd(),
                          "uid": os.getuid()}}) + "\\n")
runs = len(open(os.environ["STAND_IN_LOG"]).read().splitlines())
sys.stdout.write(open(os.environ["STAND_IN_STREAM_%d" % runs], encoding="utf-8").read())
"""

#: A stand-in that never answers, and leaves a grandchild in its process group.
HANGS = """\
#!/bin/sh
sleep 3600 &
echo $! > "$STAND_IN_HANG"
exec sleep 3600
"""


class Bench:
    """A workspace, a folder with the stand-in CLI, and what the runner reported."""

    def __init__(self, tmp: Path, cli: str, user: RunAs, program: str = STAND_IN) -> None:
        self.root = tmp / "workspace"
        self.root.mkdir()
        self.bin = tmp / "bin"
        self.bin.mkdir()
        self.log = tmp / "runs.jsonl"
        self.log.touch()
        program, program_text = self.bin / cli, program
        program.write_text(program_text)
        program.chmod(0o755)
        self.log.chmod(0o666)
        if user.switch:
            os.chown(self.root, user.uid, user.gid)
        self.user = user
        self.audit: list[tuple[str, str, int]] = []
        self.env = {
            "PATH": f"{self.bin}:/usr/bin:/bin",
            "STAND_IN_LOG": str(self.log),
            "FIRECLAW_TOKEN": "a-control-token-never-handed-on",
        }

    def streams(self, *files: Path) -> None:
        for n, file in enumerate(files, 1):
            self.env[f"STAND_IN_STREAM_{n}"] = str(file)

    def runs(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    async def run(self, cli: CliHarness, prompt: str = "Say hello.") -> CliOutcome:
        async def audit(tool: str, arguments: str, code: int, duration: float, out: str) -> None:
            self.audit.append((tool, arguments, code))

        with trio.fail_after(60):  # the stand-in answers at once; a loaded machine is slow
            return await run_cli(
                cli,
                prompt,
                Children(),
                self.env,
                root=str(self.root),
                model="smollm2",
                user=self.user,
                audit=audit,
            )


async def exited(pid: int) -> None:
    """Return once ``pid`` has exited (a zombie counts): its pidfd turns readable."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


def agent_user() -> RunAs:
    """The unprivileged user the runner starts the CLI as when the tests run as root."""
    if os.geteuid() != 0:
        return lookup_self()
    return lookup("nobody")


@pytest.fixture
def tmp(tmp_path: Path) -> Iterator[Path]:
    """A folder the agent user can enter too (pytest's own are its owner's only)."""
    folder = Path(tempfile.mkdtemp(prefix="fireclaw-cli-run-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def opencode(tmp: Path) -> Bench:
    return Bench(tmp, "opencode", agent_user())


GATEWAY = "http://10.0.2.2:8080"


async def test_opencode_answers_keeps_its_session_and_resumes_it(opencode: Bench) -> None:
    opencode.streams(
        STREAMS / "opencode" / "spec-first.jsonl", STREAMS / "opencode" / "spec-resume.jsonl"
    )
    cli = CliHarness(cli="opencode", gateway=GATEWAY)

    first = await opencode.run(cli)
    assert first.code == 0
    assert first.text.startswith("Serebarrus.")
    assert first.session == "ses_dd1ce4499ffekyvR5kpTcPqmC7"
    state = opencode.root / ".cli" / "opencode"
    assert (state / SESSION_FILE).read_text() == "ses_dd1ce4499ffekyvR5kpTcPqmC7\n"

    second = await opencode.run(cli, "What did I ask you?")
    assert second.code == 0 and second.session == first.session
    claims = [json.loads(args) for tool, args, _ in opencode.audit if tool == USAGE_TOOL]
    assert [(c["session"], c["resumed"]) for c in claims] == [
        (first.session, None),
        (first.session, first.session),
    ]
    run1, run2 = opencode.runs()
    assert "--session" not in run1["argv"]  # type: ignore[operator]
    argv2 = run2["argv"]
    assert isinstance(argv2, list)
    assert argv2[argv2.index("--session") + 1] == "ses_dd1ce4499ffekyvR5kpTcPqmC7"
    assert argv2[-2:] == ["--", "What did I ask you?"]


async def test_the_cli_runs_as_the_agent_in_its_workspace_with_state_there(
    opencode: Bench,
) -> None:
    opencode.streams(STREAMS / "opencode" / "spec-first.jsonl")
    await opencode.run(CliHarness(cli="opencode", gateway=GATEWAY))
    (run,) = opencode.runs()
    env = run["env"]
    assert isinstance(env, dict)
    state = opencode.root / ".cli" / "opencode"
    assert run["cwd"] == str(opencode.root)
    assert run["uid"] == opencode.user.uid
    # Its HOME and XDG folders are under the workspace (not the agent's own home),
    # made beforehand by the agent user, not by the daemon.
    assert env["HOME"] == str(state / "home")
    for var, sub in (("XDG_CONFIG_HOME", "config"), ("XDG_DATA_HOME", "data")):
        assert env[var] == str(state / sub)
        assert (state / sub).is_dir()
        assert (state / sub).stat().st_uid == opencode.user.uid
    assert "FIRECLAW_TOKEN" not in env
    # The provider it is given is the gateway, with the gateway's key, not a real one.
    config = json.loads(env["OPENCODE_CONFIG_CONTENT"])
    options = config["provider"]["fireclaw"]["options"]
    assert options == {"baseURL": f"{GATEWAY}/v1", "apiKey": GATEWAY_KEY}


async def test_the_usage_it_reports_is_audited_as_its_claim(opencode: Bench) -> None:
    opencode.streams(STREAMS / "opencode" / "spec-first.jsonl")
    await opencode.run(CliHarness(cli="opencode", gateway=GATEWAY))
    claims = [json.loads(args) for tool, args, _ in opencode.audit if tool == USAGE_TOOL]
    assert len(claims) == 1
    claim = claims[0]
    recorded = [
        json.loads(line)
        for line in (STREAMS / "opencode" / "spec-first.jsonl").read_text().splitlines()
    ]
    tokens = next(e["part"]["tokens"] for e in recorded if e["type"] == "step_finish")
    assert claim["output_tokens"] == tokens["output"] + tokens["reasoning"]
    assert (
        claim["input_tokens"]
        == tokens["input"] + tokens["cache"]["read"] + tokens["cache"]["write"]
    )
    assert claim["through_gateway"] is True
    assert "claim" in claim and claim["cli"] == "opencode"


async def test_secrets_reach_the_cli_but_the_gateway_key_wins_its_key_variable(
    tmp: Path,
) -> None:
    aider = Bench(tmp, "aider", agent_user())
    aider.streams(STREAMS / "aider" / "spec-first.txt", STREAMS / "aider" / "spec-resume.txt")
    secrets = SecretEnv(values={"OPENAI_API_KEY": "sk-real-upstream", "EXTRA_TOKEN": "xyz"})
    cli = CliHarness(cli="aider", gateway=GATEWAY, secrets=secrets)
    first = await aider.run(cli)
    assert first.code == 0, first.text
    assert first.session == RESUMABLE
    second = await aider.run(cli, "What did I ask you?")
    assert second.code == 0
    run1, run2 = aider.runs()
    env = run1["env"]
    assert isinstance(env, dict)
    assert env["EXTRA_TOKEN"] == "xyz"
    # Through the gateway, the CLI never holds the real key: the gateway adds it upstream.
    assert env["OPENAI_API_KEY"] == GATEWAY_KEY
    assert env["OPENAI_API_BASE"] == f"{GATEWAY}/v1"
    # The file the spec writes for it is there, written as the agent user.
    metadata = aider.root / ".cli" / "aider" / "model-metadata.json"
    assert json.loads(metadata.read_text())["openai/smollm2"]["input_cost_per_token"] == 0
    assert metadata.stat().st_uid == aider.user.uid
    assert "--restore-chat-history" not in run1["argv"]  # type: ignore[operator]
    assert "--restore-chat-history" in run2["argv"]  # type: ignore[operator]
    assert "sk-real-upstream" not in repr(cli)


async def test_the_tools_it_says_it_used_are_audited(tmp: Path) -> None:
    codex = Bench(tmp, "codex", agent_user())
    codex.streams(STREAMS / "codex" / "doc-command.jsonl")
    ran = await codex.run(CliHarness(cli="codex", gateway=GATEWAY))
    assert (ran.code, ran.text) == (0, "Two files: README.md and main.py.")
    (tool, arguments, code), (claim_tool, claim, _) = codex.audit
    assert (tool, json.loads(arguments), code) == ("cli_shell", {"command": "bash -lc ls"}, 0)
    assert claim_tool == USAGE_TOOL
    assert json.loads(claim)["tool_uses"] == 1
    assert json.loads(claim)["input_tokens"] == 24763


async def test_a_flood_of_tool_uses_is_counted_but_audited_only_so_far(tmp: Path) -> None:
    flood = tmp / "flood.jsonl"
    line = {"type": "tool_use", "sessionID": "ses_flood", "part": {"tool": "bash", "callID": "c"}}
    finish = {
        "type": "step_finish",
        "sessionID": "ses_flood",
        "part": {"reason": "stop", "tokens": {"input": 1, "output": 1}},
    }
    flood.write_text(
        "".join(json.dumps(line) + "\n" for _ in range(MAX_AUDITED_TOOLS + 5))
        + json.dumps(finish)
        + "\n"
    )
    flood.chmod(0o644)
    bench = Bench(tmp, "opencode", agent_user())
    bench.streams(flood)
    ran = await bench.run(CliHarness(cli="opencode", gateway=GATEWAY))
    assert ran.code == 0
    tools = [t for t, _, _ in bench.audit if t == "cli_bash"]
    assert len(tools) == MAX_AUDITED_TOOLS
    (claim,) = [json.loads(a) for t, a, _ in bench.audit if t == USAGE_TOOL]
    assert claim["tool_uses"] == MAX_AUDITED_TOOLS + 5


async def test_a_cli_that_hangs_is_killed_with_its_group_at_its_timeout(tmp: Path) -> None:
    bench = Bench(tmp, "opencode", agent_user(), program=HANGS)
    hung = tmp / "hung.pid"
    hung.touch()
    hung.chmod(0o666)
    bench.env["STAND_IN_HANG"] = str(hung)
    ran = await bench.run(CliHarness(cli="opencode", gateway=GATEWAY, timeout=3.0))
    assert ran.code == -signal.SIGKILL
    assert ran.text == "timed out after 3s"
    # The grandchild it left was killed with it (a zombie until its new parent reaps it).
    grandchild = int(hung.read_text())
    with trio.fail_after(30):
        await exited(grandchild)
    ((tool, _, code),) = bench.audit
    assert (tool, code) == (USAGE_TOOL, -signal.SIGKILL)


async def test_a_symlink_planted_for_its_state_is_refused(opencode: Bench, tmp: Path) -> None:
    outside = tmp / "outside"
    outside.mkdir()
    (opencode.root / ".cli").mkdir()
    (opencode.root / ".cli" / "opencode").symlink_to(outside)
    opencode.streams(STREAMS / "opencode" / "spec-first.jsonl")
    ran = await opencode.run(CliHarness(cli="opencode", gateway=GATEWAY))
    assert ran.code == EXIT_SETUP
    assert "symlink" in ran.text and ran.text.startswith("opencode: cannot set up its state")
    assert list(outside.iterdir()) == []
    assert opencode.runs() == []  # it never started


async def test_a_session_file_that_is_not_an_id_starts_afresh(opencode: Bench) -> None:
    state = opencode.root / ".cli" / "opencode"
    state.mkdir(parents=True)
    (state / SESSION_FILE).write_text("--dangerous-flag\n")
    for path in (state.parent, state, state / SESSION_FILE):  # as the agent left them
        os.chown(path, opencode.user.uid, opencode.user.gid)
    opencode.streams(STREAMS / "opencode" / "spec-first.jsonl")
    ran = await opencode.run(CliHarness(cli="opencode", gateway=GATEWAY))
    assert ran.code == 0
    (run,) = opencode.runs()
    assert "--dangerous-flag" not in run["argv"]  # type: ignore[operator]
    assert "--session" not in run["argv"]  # type: ignore[operator]


async def test_a_missing_program_is_one_line(tmp: Path) -> None:
    bench = Bench(tmp, "not-opencode", agent_user())
    ran = await bench.run(CliHarness(cli="opencode", gateway=GATEWAY))
    assert ran.code == 127
    assert ran.text == "opencode: No such file or directory: opencode"


def test_tool_names_become_words_the_audit_trail_takes() -> None:
    assert tool_name("Bash") == "cli_bash"
    assert tool_name("github.create_issue") == "cli_github_create_issue"
    assert tool_name("???") == "cli_tool"
