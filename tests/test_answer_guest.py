"""A CLI that stops to ask, in the guest: the specs read the question from the
CLIs' streams (tests/data/cli_streams/: captured from the real programs, or
written from their docs where named ``doc-*``), the runner hands it on with the
session, the wire carries it as ``TaskDone.waiting`` (validated like every
guest message), and an answer resumes that same session.

The CLI is the stand-in of ``test_cli_run.py`` (a test double named as such,
replaying recorded streams, noting its argv); the runner around it is real.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import trio
from fireclaw.guest_daemon.cli_run import EXIT_NO_ANSWER, EXIT_SETUP, CliOutcome, run_cli
from fireclaw.guest_daemon.cli_stream import Question
from fireclaw.guest_daemon.clis import SPECS
from fireclaw.guest_daemon.harness import Children
from fireclaw.guest_daemon.protocol import (
    MAX_QUESTION_CHARS,
    CliHarness,
    ProtocolError,
    SecretEnv,
    TaskDone,
    Waiting,
    decode_guest,
    decode_host,
    encode,
)
from fireclaw.guest_daemon.turns import waiting
from test_cli_run import STREAMS, Bench, agent_user, tmp  # noqa: F401  (tmp: a fixture)

ASKS = STREAMS / "claude-code" / "doc-max-turns-denied.jsonl"
SESSION = "3f0c9a52-7d1e-4b8a-9c6f-2e5d4a1b0c9d"


def questions(cli: str, stream: Path) -> list[Question]:
    parser = SPECS[cli].parser()
    events = parser.feed(stream.read_bytes()) + parser.close()
    return [e for e in events if isinstance(e, Question)]


# --- the specs, against the recorded streams -----------------------------------


def test_claude_code_asks_for_the_tool_it_was_denied_and_at_its_turn_limit() -> None:
    assert questions("claude-code", ASKS) == [
        Question(kind="permission", text='allow Bash {"command":"rm -rf build"}'),
        Question(kind="turn_limit", text="stopped after 2 turns: go on?"),
    ]


def test_gemini_cli_asks_at_its_turn_limit() -> None:
    (asked,) = questions("gemini-cli", STREAMS / "gemini-cli" / "doc-turn-limit.jsonl")
    assert asked.kind == "turn_limit" and "max session turns" in asked.text


@pytest.mark.parametrize(
    "stream",
    sorted(p for p in STREAMS.glob("*/*.*") if p.suffix in (".jsonl", ".txt")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_no_other_recorded_stream_asks(stream: Path) -> None:
    """codex exec never asks, opencode run rejects what it would ask, aider's
    --yes-always answers its own prompts: none of their streams holds a question,
    nor does a claude-code run that answered."""
    cli = stream.parent.name
    expected = {"doc-max-turns-denied.jsonl", "doc-turn-limit.jsonl"}
    assert bool(questions(cli, stream)) == (stream.name in expected), stream


# --- the wire ------------------------------------------------------------------


def test_a_waiting_task_done_travels_and_a_bad_one_is_refused() -> None:
    asked = Waiting(kind="turn_limit", question="go on?", session=SESSION)
    done = TaskDone(task_id=7, code=1, output="claude-code stopped to ask", waiting=asked)
    assert decode_guest(encode(done)) == done

    def forged(**change: object) -> bytes:
        body = {**msgspec.structs.asdict(asked), **change}
        frame = msgspec.msgpack.decode(encode(done))
        frame["waiting"] = body
        return msgspec.msgpack.encode(frame)

    for bad in (
        {"question": "a\nsecond line"},
        {"question": "x" * (MAX_QUESTION_CHARS + 1)},
        {"question": ""},
        {"session": "--dangerously-skip-permissions"},
        {"session": "a b"},
        {"kind": "bribe"},
    ):
        with pytest.raises(ProtocolError, match="invalid message"):
            decode_guest(forged(**bad))


def test_a_task_resuming_a_session_names_it_and_only_a_safe_one() -> None:
    frame = msgspec.msgpack.encode({"type": "task", "task_id": 3, "prompt": "yes", "resume": "-rf"})
    with pytest.raises(ProtocolError, match="invalid message"):
        decode_host(frame)


# --- the runner ----------------------------------------------------------------


async def run_resumed(bench: Bench, cli: CliHarness, answer: str, session: str) -> CliOutcome:
    """``bench.run``, resuming ``session`` with ``answer`` (as a ``Task.resume`` does)."""

    async def audit(tool: str, arguments: str, code: int, duration: float, out: str) -> None:
        bench.audit.append((tool, arguments, code))

    with trio.fail_after(60):  # the stand-in answers at once; a loaded machine is slow
        return await run_cli(
            cli,
            answer,
            Children(),
            bench.env,
            root=str(bench.root),
            model="smollm2",
            user=bench.user,
            audit=audit,
            resume=session,
        )


async def test_a_cli_that_asks_gives_its_question_and_an_answer_resumes_that_session(
    tmp: Path,  # noqa: F811
) -> None:
    bench = Bench(tmp, "claude", agent_user())
    bench.streams(ASKS, STREAMS / "claude-code" / "spec-resume.jsonl")
    secret = "sk-never-on-irc-1234"
    cli = CliHarness(
        cli="claude-code",
        gateway="http://10.0.2.2:8080",
        max_turns=2,
        secrets=SecretEnv(values={"SOME_TOKEN": secret}),
    )
    ran = await bench.run(cli, "clean the build")
    assert ran.code == EXIT_NO_ANSWER and ran.session == SESSION
    assert ran.question == Question(
        kind="permission",
        text='allow Bash {"command":"rm -rf build"}; stopped after 2 turns: go on?',
    )
    assert waiting(ran) == Waiting(
        kind="permission",
        question='allow Bash {"command":"rm -rf build"}; stopped after 2 turns: go on?',
        session=SESSION,
    )
    # The question may quote what the CLI was given: its secrets never leave the VM.
    quoted = CliOutcome(
        ran.code,
        ran.text,
        ran.truncated,
        ran.session,
        Question(kind="question", text=f"use the token {secret}?\nsay yes"),
    )
    assert waiting(quoted, [secret]) == Waiting(
        kind="question", question="use the token [redacted]? say yes", session=SESSION
    )

    resumed = await run_resumed(bench, cli, "yes, remove it", SESSION)
    assert resumed.code == 0 and resumed.question is None and waiting(resumed) is None
    first, second = (r["argv"] for r in bench.runs())
    assert "--resume" not in first  # type: ignore[operator]
    assert second[second.index("--resume") + 1] == SESSION  # type: ignore[union-attr,index]
    assert second[-2:] == ["--", "yes, remove it"]  # type: ignore[index]


async def test_a_resume_a_cli_cannot_take_is_one_line_not_a_new_session(
    tmp: Path,  # noqa: F811
) -> None:
    bench = Bench(tmp, "claude", agent_user())
    ran = await run_resumed(bench, CliHarness(cli="claude-code"), "yes", "not an id!")
    assert ran.code == EXIT_SETUP and "not one to resume" in ran.text
    assert bench.runs() == []  # nothing started
