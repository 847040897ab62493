"""The coding-agent CLI specs (guest_daemon/clis.py) against recorded streams of the CLIs.

The streams under tests/data/cli_streams/ were written by the real programs
run here against the bundled model, except where their README says a stream
was written from a CLI's published documentation and package source. Each
spec must read its streams into the events a person reading the same
stream would name: the session id, the usage numbers, the answer, the
questions, the failures. The parser's bounds (an oversize line, malformed
JSON, an unknown event type, an unsafe session id) are checked on streams
made here, named as such.
"""

from __future__ import annotations

import json
import os
import posixpath
import subprocess
import sys
from pathlib import Path
from typing import TypeVar

import msgspec
import pytest
from fireclaw.guest_daemon.cli_spec import GATEWAY_KEY, CliSpec, SpecError
from fireclaw.guest_daemon.cli_stream import (
    MAX_TEXT,
    SESSION_ID,
    CliEvent,
    Failure,
    Question,
    Result,
    Session,
    Text,
    ToolUse,
    Unknown,
    Usage,
    failure_kind,
)
from fireclaw.guest_daemon.clis import SPECS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

STREAMS = Path(__file__).parent / "data" / "cli_streams"
E = TypeVar("E", bound=CliEvent)  # type: ignore[misc]


def parse(cli: str, data: bytes, *, max_line: int | None = None) -> list[CliEvent]:
    parser = SPECS[cli].parser(max_line=max_line)
    return parser.feed(data) + parser.close()


def recorded(cli: str, name: str) -> list[CliEvent]:
    return parse(cli, (STREAMS / cli / name).read_bytes())


def only(events: list[CliEvent], kind: type[E]) -> list[E]:
    return [event for event in events if isinstance(event, kind)]


def the(events: list[CliEvent], kind: type[E]) -> E:
    found = only(events, kind)
    assert len(found) == 1, f"expected one {kind.__name__}, got {found}"
    return found[0]


# --- the recorded streams -------------------------------------------------------

#: (cli, stream file, session id, usage, answer). usage: (input, output, cached, cost).
RUNS = [
    (
        "claude-code",
        "first.jsonl",
        "cd394b29-2b41-4608-b321-f6d5c6a02f50",
        (169, 47, 61, 0.0017454999999999999),
        'You should add "Bridul" to your name in the context. You can add a nickname, like '
        '"Bridal-Raven" or "Bridal-Raven-Lad" in the context.',
    ),
    (
        "claude-code",
        "resume.jsonl",
        "cd394b29-2b41-4608-b321-f6d5c6a02f50",
        (238, 39, 215, 0.0011975),
        'You should add "How to" to your previous message. You can add a brief explanation of '
        'the answer, like "In this context, how to ask a question in a concise manner."',
    ),
    (
        "claude-code",
        "output-cap-resume.jsonl",
        "725053b8-a2bb-46cc-b52c-0a20c6a6d8b8",
        (2178, 186, 1840, 0.00726),
        "This is a great example of how we can work together to create new tasks. I'm happy "
        "to continue creating new tasks.\n\nI'm happy to continue creating tasks and helping "
        "people. The cut is",
    ),
    (
        "opencode",
        "first.jsonl",
        "ses_dd1f8fcf1ffeR2JXYhoSmyMKpA",
        (2214, 9, 5, 0.0),
        '"Talks in five words"',
    ),
    (
        "opencode",
        "resume.jsonl",
        "ses_dd1f8fcf1ffeR2JXYhoSmyMKpA",
        (2246, 10, 2222, 0.0),
        '"Talked to you in five words"',
    ),
    (
        "codex",
        "first.jsonl",
        "01a22e0a-48b1-7ca2-aa44-e42309e4c863",
        (4355, 11, 5, None),
        "**In one word**\nIn one word.",
    ),
    (
        "codex",
        "resume.jsonl",
        "01a22e0a-48b1-7ca2-aa44-e42309e4c863",
        (8743, 33, 4370, None),
        "You asked me to provide a list of skills that are available to you to help with "
        "your coding skills.",
    ),
    (
        "gemini-cli",
        "doc-tool-run.jsonl",
        "6f1c2a9e-3b4d-4e5f-8a7b-9c0d1e2f3a4b",
        (9042, 78, 8110, None),
        "There are two files: README.md and main.py.",
    ),
    (
        "gemini-cli",
        "doc-resume.jsonl",
        "6f1c2a9e-3b4d-4e5f-8a7b-9c0d1e2f3a4b",
        (9290, 11, 9040, None),
        "README.md and main.py.",
    ),
]


@pytest.mark.parametrize(("cli", "name", "session", "usage", "answer"), RUNS)
def test_a_recorded_run_reads_as_session_usage_and_answer(
    cli: str, name: str, session: str, usage: tuple[int, int, int, float | None], answer: str
) -> None:
    events = recorded(cli, name)
    assert the(events, Session).session_id == session
    got = the(events, Usage)
    assert (got.input_tokens, got.output_tokens, got.cached_tokens, got.cost_usd) == usage
    final = the(events, Result)
    assert final == Result(text=answer, ok=True)
    # The answer is the last thing of the run: nothing fatal follows or precedes it.
    assert isinstance(events[-1], Result | Usage)
    assert not [e for e in only(events, Failure) if e.fatal]


@pytest.mark.parametrize(
    ("cli", "first_run", "resumed_run"),
    [
        ("claude-code", "first.jsonl", "resume.jsonl"),
        ("claude-code", "output-cap.jsonl", "output-cap-resume.jsonl"),
        ("opencode", "first.jsonl", "resume.jsonl"),
        ("codex", "first.jsonl", "resume.jsonl"),
        ("gemini-cli", "doc-tool-run.jsonl", "doc-resume.jsonl"),
    ],
)
def test_a_resumed_run_names_the_same_session_and_its_argv_carries_it(
    cli: str, first_run: str, resumed_run: str
) -> None:
    first = the(recorded(cli, first_run), Session)
    again = the(recorded(cli, resumed_run), Session)
    assert first.session_id == again.session_id
    run = SPECS[cli].invocation("go on", workspace="/workspace", session=first.session_id)
    assert first.session_id in run.argv
    new = SPECS[cli].invocation("go on", workspace="/workspace")
    assert first.session_id not in new.argv


def test_claude_failed_call_is_a_failure_and_its_resume_read_the_earlier_turn() -> None:
    capped = recorded("claude-code", "output-cap.jsonl")
    failure = the(capped, Failure)
    assert failure.fatal and failure.kind == "error" and failure.line == 7
    assert "exceeded the 48 output token maximum" in failure.message
    assert not only(capped, Result)
    # Claude's usage is its own account: 930 of 1246 prompt tokens read from the cache.
    assert the(capped, Usage) == Usage(
        input_tokens=1246, output_tokens=192, cached_tokens=930, cost_usd=0.006845
    )
    again = the(recorded("claude-code", "output-cap-resume.jsonl"), Usage)
    assert again.cached_tokens > the(capped, Usage).input_tokens  # the whole first run, cached


def test_claude_killed_mid_run_ends_without_a_result() -> None:
    events = recorded("claude-code", "killed.jsonl")
    assert the(events, Session).model == "smollm2"
    assert events[-1] == Failure(kind="error", message="claude-code ended without a result")


def test_a_resumed_codex_run_sent_the_earlier_turn_again() -> None:
    """The resume's prompt is the first run's prompt and answer plus the new one:
    the earlier context reached the model (its cached part is the first prompt)."""
    first = the(recorded("codex", "first.jsonl"), Usage)
    again = the(recorded("codex", "resume.jsonl"), Usage)
    assert again.input_tokens > first.input_tokens + first.output_tokens
    assert again.cached_tokens >= first.input_tokens - 5


def test_codex_warnings_are_not_fatal_and_a_dead_endpoint_never_ends_the_run_by_itself() -> None:
    events = recorded("codex", "first.jsonl")
    warnings = only(events, Failure)
    assert warnings and all(not w.fatal for w in warnings)
    assert any("Model metadata for `smollm2` not found" in w.message for w in warnings)
    dead = recorded("codex", "unreachable.jsonl")
    assert the(dead, Session).session_id
    retries = [e for e in only(dead, Failure) if not e.fatal and "Reconnecting" in e.message]
    assert retries
    end = [e for e in only(dead, Failure) if e.fatal]
    assert len(end) == 1 and end == [dead[-1]]
    assert not only(dead, Result)


def test_opencode_unreachable_endpoint_is_one_fatal_failure() -> None:
    events = recorded("opencode", "unreachable.jsonl")
    assert the(events, Session).session_id == "ses_dd1fac65affefRrHUe2OZ8Rqdq"
    failure = the(events, Failure)
    assert failure.fatal and failure.kind == "error" and failure.line == 1
    assert "Cannot connect to API" in failure.message


def test_gemini_captured_start_matches_the_documented_init_and_never_ends_unreachable() -> None:
    events = recorded("gemini-cli", "unreachable.jsonl")
    assert the(events, Session) == Session(
        session_id="b81f09a1-8d09-46ca-bf74-af21f0cdb657", model="auto"
    )
    assert not only(events, Text)  # the user's own message is not the model's text
    assert events[-1] == Failure(kind="error", message="gemini-cli ended without a result")


def test_gemini_tool_call_and_thinking_aloud_are_not_the_answer() -> None:
    events = recorded("gemini-cli", "doc-tool-run.jsonl")
    tool = the(events, ToolUse)
    assert tool.name == "list_directory"
    assert json.loads(tool.arguments) == {"dir_path": "."}
    assert [t.text for t in only(events, Text)][0] == "Let me look."
    assert the(events, Result).text.startswith("There are two files")


def test_gemini_turn_limit_is_a_question_and_quota_is_exhaustion() -> None:
    limit = recorded("gemini-cli", "doc-turn-limit.jsonl")
    question = the(limit, Question)
    assert question.kind == "turn_limit" and "maxSessionTurns" in question.text
    quota = recorded("gemini-cli", "doc-quota.jsonl")
    failure = [f for f in only(quota, Failure) if f.fatal][0]
    assert failure.kind == "exhausted" and "quota" in failure.message
    assert not only(quota, Result)


AIDER_ANSWER = (
    "To share files, please provide a file listing with the filename, and I'll be \n"
    "happy to help you with your requests."
)


def test_aider_plain_text_reads_as_answer_and_usage_without_its_chatter() -> None:
    events = recorded("aider", "first.txt")
    assert the(events, Usage) == Usage(input_tokens=673, output_tokens=26, exact=True)
    assert the(events, Result) == Result(text=AIDER_ANSWER)
    assert not only(events, Session)  # aider has no session id
    assert not only(events, Failure)
    said = "".join(t.text for t in only(events, Text))
    assert "Aider v0.86.2" not in said and "Repo-map" not in said


def test_aider_resume_restored_the_history_and_sent_it_again() -> None:
    raw = (STREAMS / "aider" / "resume.txt").read_text()
    assert "Restored previous conversation history." in raw
    first = the(recorded("aider", "first.txt"), Usage)
    again = the(recorded("aider", "resume.txt"), Usage)
    # The new prompt is a dozen tokens; the rest is the first question and answer.
    assert again.input_tokens > first.input_tokens + first.output_tokens


def test_aider_without_model_metadata_fetched_and_failed_but_the_answer_is_clean() -> None:
    events = recorded("aider", "no-model-metadata.txt")
    fetches = only(events, Failure)
    assert len(fetches) == 4 and all(not f.fatal for f in fetches)
    assert all("raw.githubusercontent.com" in f.message for f in fetches)
    assert the(events, Result) == Result(text=AIDER_ANSWER)


def test_aider_rounded_counts_are_marked_inexact_and_errors_classified() -> None:
    text = (
        b"Aider v0.86.2\n\nHello there.\n\nSecond paragraph.\n\n"
        b"Tokens: 2.2k sent, 1.1k cache hit, 12 received. Cost: $0.01 message, $0.02 session.\n"
        b"litellm.RateLimitError: RateLimitError: OpenAIException - slow down\n"
    )
    events = parse("aider", text)
    assert the(events, Usage) == Usage(
        input_tokens=2200, output_tokens=12, cached_tokens=1100, cost_usd=0.01, exact=False
    )
    assert the(events, Result).text == "Hello there.\n\nSecond paragraph."
    failure = the(events, Failure)
    assert failure.kind == "rate_limit" and failure.line == 8


def test_claude_denied_permission_and_turn_limit_are_questions() -> None:
    events = recorded("claude-code", "doc-max-turns-denied.jsonl")
    tool = the(events, ToolUse)
    assert (tool.name, tool.call_id, json.loads(tool.arguments)) == (
        "Bash",
        "toolu_01",
        {"command": "rm -rf build"},
    )
    questions = only(events, Question)
    assert [q.kind for q in questions] == ["permission", "turn_limit"]
    assert questions[0].text == 'allow Bash {"command":"rm -rf build"}'
    assert "2 turns" in questions[1].text
    assert the(events, Usage) == Usage(
        input_tokens=3500, output_tokens=80, cached_tokens=1100, cost_usd=0.0123
    )
    # Stopped for an answer: neither a result nor a failure.
    assert not only(events, Result) and not only(events, Failure)


def test_codex_command_is_a_tool_use_and_the_answer_comes_after_it() -> None:
    events = recorded("codex", "doc-command.jsonl")
    tool = the(events, ToolUse)
    assert (tool.name, tool.call_id) == ("shell", "item_1")
    assert json.loads(tool.arguments) == {"command": "bash -lc ls"}
    assert the(events, Result).text == "Two files: README.md and main.py."
    assert the(events, Usage).cached_tokens == 24448


def test_codex_usage_limit_is_exhaustion_that_ends_the_run() -> None:
    events = recorded("codex", "doc-usage-limit.jsonl")
    failures = only(events, Failure)
    assert [(f.kind, f.fatal) for f in failures] == [("exhausted", False), ("exhausted", True)]
    assert "Try again in 4 days" in failures[-1].message and events[-1] is failures[-1]


#: Runs started with exactly the argv, environment and files of ``invocation()``:
#: (cli, first run, its resume, the first run's usage, the resume's usage).
SPEC_RUNS = [
    ("claude-code", "spec-first.jsonl", "spec-resume.jsonl", (3065, 11, 3), (3098, 29, 3075)),
    ("codex", "spec-first.jsonl", "spec-resume.jsonl", (4583, 99, 3911), (9287, 648, 8592)),
    ("opencode", "spec-first.jsonl", "spec-resume.jsonl", (2216, 21, 1979), (2260, 71, 2236)),
]


@pytest.mark.parametrize(("cli", "first_run", "resumed_run", "usage", "resumed_usage"), SPEC_RUNS)
def test_a_cli_started_as_its_spec_says_answers_and_resumes_its_session(
    cli: str,
    first_run: str,
    resumed_run: str,
    usage: tuple[int, int, int],
    resumed_usage: tuple[int, int, int],
) -> None:
    first, again = recorded(cli, first_run), recorded(cli, resumed_run)
    for events, (tokens_in, tokens_out, cached) in ((first, usage), (again, resumed_usage)):
        got = the(events, Usage)
        assert (got.input_tokens, got.output_tokens, got.cached_tokens) == (
            tokens_in,
            tokens_out,
            cached,
        )
        assert the(events, Result).text.strip()
        assert not [f for f in only(events, Failure) if f.fatal]
    sessions = only(first, Session) + only(again, Session)
    assert len({s.session_id for s in sessions}) == len(sessions) // 2 == 1
    # The resume carried the first run's prompt and answer.
    assert resumed_usage[0] > usage[0] + usage[1]


def test_aider_started_as_its_spec_says_fetches_nothing_and_restores_its_history() -> None:
    first, again = recorded("aider", "spec-first.txt"), recorded("aider", "spec-resume.txt")
    assert the(first, Usage) == Usage(input_tokens=673, output_tokens=26)
    assert the(again, Usage) == Usage(input_tokens=724, output_tokens=27)
    # The model metadata file kept it from looking for a price list on the network.
    assert not only(first, Failure) and not only(again, Failure)
    assert the(first, Result) == Result(text=AIDER_ANSWER)
    assert (
        "Restored previous conversation history."
        in (STREAMS / "aider" / "spec-resume.txt").read_text()
    )


# --- argv and environment --------------------------------------------------------


@pytest.mark.parametrize("cli", sorted(SPECS))
def test_every_state_dir_is_under_the_workspace(cli: str) -> None:
    spec = SPECS[cli]
    run = spec.invocation(
        "hi", workspace="/workspace/", model="smollm2", gateway="http://10.0.2.2:8080"
    )
    state = spec.state_env("/workspace")
    assert state, f"{cli} keeps no state under the workspace"
    for var, path in state.items():
        assert run.env[var] == path
        assert posixpath.isabs(path) and posixpath.normpath(path) == path
        assert path.startswith(f"/workspace/.cli/{cli}/"), (var, path)
    for path in run.files:
        assert posixpath.normpath(path).startswith(f"/workspace/.cli/{cli}/"), path
    with pytest.raises(SpecError, match="not an absolute path"):
        spec.invocation("hi", workspace="workspace")


@pytest.mark.parametrize("cli", sorted(SPECS))
def test_a_prompt_that_looks_like_an_option_stays_the_prompt(cli: str) -> None:
    prompt = "--help {model} {session}"
    argv = SPECS[cli].invocation(prompt, workspace="/w", model="m1").argv
    if prompt in argv:
        # After a "--": everything after it is an operand, and it is last.
        assert argv.index(prompt) > argv.index("--") and argv[-1] == prompt
    else:
        glued = [arg for arg in argv if arg.endswith("=" + prompt)]
        assert glued, argv  # --message=... / --prompt=...


@pytest.mark.parametrize("cli", sorted(SPECS))
def test_the_gateway_is_used_where_the_cli_can_and_the_key_never_is(cli: str) -> None:
    spec = SPECS[cli]
    run = spec.invocation(
        "hi",
        workspace="/w",
        model="smollm2",
        gateway="http://10.0.2.2:8080",
        api_key="sk-real-secret",
    )
    text = json.dumps([run.argv, run.env])
    if spec.gateway is None:
        assert not run.metered
        assert run.env[spec.key_env] == "sk-real-secret"  # its own provider, its own key
        assert "10.0.2.2" not in text
    else:
        assert run.metered
        assert "sk-real-secret" not in text  # the gateway holds the key
        assert "http://10.0.2.2:8080" in text
        if spec.key_env:
            assert run.env[spec.key_env] == GATEWAY_KEY
    alone = spec.invocation("hi", workspace="/w", api_key="sk-real-secret")
    assert not alone.metered
    if spec.key_env:
        assert alone.env[spec.key_env] == "sk-real-secret"


def test_opencode_reaches_the_gateway_through_its_config_content() -> None:
    run = SPECS["opencode"].invocation(
        "hi", workspace="/w", model="smollm2", gateway="http://10.0.2.2:8080"
    )
    config = json.loads(run.env["OPENCODE_CONFIG_CONTENT"])
    provider = config["provider"]["fireclaw"]
    assert provider["options"]["baseURL"] == "http://10.0.2.2:8080/v1"
    assert "smollm2" in provider["models"] and config["model"] == "fireclaw/smollm2"
    assert run.argv[run.argv.index("--model") + 1] == "fireclaw/smollm2"


def test_codex_is_told_of_the_gateway_as_a_responses_provider() -> None:
    run = SPECS["codex"].invocation(
        "hi", workspace="/w", model="smollm2", gateway="http://10.0.2.2:8080/"
    )
    assert 'model_providers.fireclaw.base_url="http://10.0.2.2:8080/v1"' in run.argv
    assert 'model_providers.fireclaw.wire_api="responses"' in run.argv
    assert SPECS["codex"].gateway.wire == "openai-responses"
    # Options stay before the "--" that ends them.
    assert run.argv.index("-c") < run.argv.index("--")


def test_own_limits_go_on_the_command_line_where_the_cli_takes_them() -> None:
    run = SPECS["claude-code"].invocation("hi", workspace="/w", turns=4, budget_usd=0.25)
    argv = run.argv
    assert argv[argv.index("--max-turns") + 1] == "4"
    assert float(argv[argv.index("--max-budget-usd") + 1]) == 0.25
    assert argv.index("--max-turns") < argv.index("--")
    # codex takes neither: the swarm's own budget (the gateway) is what holds it.
    assert "--max-turns" not in SPECS["codex"].invocation("hi", workspace="/w", turns=4).argv
    with pytest.raises(SpecError, match="turn limit 0"):
        SPECS["claude-code"].invocation("hi", workspace="/w", turns=0)
    with pytest.raises(SpecError, match="budget"):
        SPECS["claude-code"].invocation("hi", workspace="/w", budget_usd=0.0)


def test_aider_gets_the_gateway_model_metadata_as_a_file_in_its_state_dir() -> None:
    run = SPECS["aider"].invocation(
        "hi", workspace="/workspace", model="smollm2", gateway="http://10.0.2.2:8080"
    )
    path = "/workspace/.cli/aider/model-metadata.json"
    assert run.argv[run.argv.index("--model-metadata-file") + 1] == path
    assert json.loads(run.files[path])["openai/smollm2"]["input_cost_per_token"] == 0
    assert run.env["OPENAI_API_BASE"] == "http://10.0.2.2:8080/v1"
    # Without the gateway, aider uses its provider as it is: no file, no base URL.
    alone = SPECS["aider"].invocation("hi", workspace="/workspace", model="gpt-4o")
    assert alone.files == {} and "OPENAI_API_BASE" not in alone.env


@pytest.mark.parametrize("url", ["https://x:1", 'http://a"b:1', "http://h:1/v1?x", "10.0.2.2:80"])
def test_a_gateway_url_that_is_not_plain_http_host_port_is_refused(url: str) -> None:
    with pytest.raises(SpecError, match="is not http://HOST:PORT"):
        SPECS["codex"].invocation("hi", workspace="/w", model="m", gateway=url)


def test_aider_resumes_from_its_history_file_under_the_state_dir() -> None:
    spec = SPECS["aider"]
    new = spec.invocation("hi", workspace="/workspace", model="smollm2")
    again = spec.invocation("more", workspace="/workspace", model="smollm2", session="")
    history = "/workspace/.cli/aider/history.md"
    assert new.argv[new.argv.index("--chat-history-file") + 1] == history
    assert "--restore-chat-history" not in new.argv
    assert "--restore-chat-history" in again.argv and history in again.argv


@pytest.mark.parametrize("bad", ["--help", "-x", "a b", "x;rm", "", "ä", "a" * 200])
def test_an_unsafe_session_id_or_model_never_reaches_argv(bad: str) -> None:
    with pytest.raises(SpecError, match="session id"):
        SPECS["claude-code"].invocation("hi", workspace="/w", session=bad)
    if bad:
        with pytest.raises(SpecError, match="model name"):
            SPECS["opencode"].invocation("hi", workspace="/w", model=bad)


def test_a_run_through_the_gateway_needs_a_model() -> None:
    with pytest.raises(SpecError, match="needs a model"):
        SPECS["codex"].invocation("hi", workspace="/w", gateway="http://10.0.2.2:8080")


def test_the_specs_import_only_the_standard_library_and_msgspec() -> None:
    """They ship into VM images: nothing from the host side, no third-party package but msgspec."""
    probe = (  # what importing the specs adds, besides msgspec and what it needs itself
        "import sys, msgspec; before = set(sys.modules); import fireclaw.guest_daemon.clis; "
        "print(*(m for m in set(sys.modules) - before "
        "if m.split('.')[0] not in sys.stdlib_module_names))"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert set(done.stdout.split()) == {
        "fireclaw",
        "fireclaw.guest_daemon",
        "fireclaw.guest_daemon.clis",
        "fireclaw.guest_daemon.cli_decoders",
        "fireclaw.guest_daemon.cli_spec",
        "fireclaw.guest_daemon.cli_stream",
    }


# --- the parser's bounds (streams made here) -------------------------------------


def test_a_line_over_the_cap_is_one_failure_and_the_stream_goes_on() -> None:
    good = b'{"type":"thread.started","thread_id":"t-1"}\n'
    done = b'{"type":"turn.completed","usage":{"input_tokens":3,"output_tokens":1}}\n'
    huge = (
        b'{"type":"item.completed","item":{"type":"agent_message","text":"' + b"x" * 5000 + b'"}}\n'
    )
    events = parse("codex", good + huge + done, max_line=1024)
    oversize = the(events, Failure)
    assert oversize.kind == "oversize" and oversize.line == 2 and not oversize.fatal
    assert "codex: line 2 is longer than 1024 bytes" == oversize.message
    assert the(events, Session).session_id == "t-1"
    assert the(events, Usage).input_tokens == 3


def test_an_oversize_line_in_pieces_is_reported_once_and_never_buffered_whole() -> None:
    parser = SPECS["codex"].parser(max_line=1024)
    events = parser.feed(b'{"type":"thread.started","thread_id":"t-1"}\n{"type":')
    for _ in range(100):
        events += parser.feed(b"y" * 1000)
        assert len(parser._buffer) <= 2048  # bounded while the line goes on
    events += parser.feed(b'"}\n{"type":"turn.completed","usage":{"output_tokens":2}}\n')
    events += parser.close()
    failures = only(events, Failure)
    assert [(f.kind, f.line) for f in failures] == [("oversize", 2)]
    assert the(events, Usage).output_tokens == 2
    assert the(events, Result).text == ""


def test_malformed_json_is_one_failure_naming_the_cli_and_line() -> None:
    stream = (
        b'{"type":"step_start","sessionID":"ses_1"}\n'
        b"not json at all\n"
        b"[1, 2]\n"
        b'{"type":"step_finish","sessionID":"ses_1","part":{"reason":"stop","tokens":{"input":5}}}\n'
    )
    events = parse("opencode", stream)
    malformed = only(events, Failure)
    assert [f.message for f in malformed] == [
        "opencode: line 2: not JSON: 'not json at all'",
        "opencode: line 3: not a JSON object",
    ]
    assert all(f.kind == "malformed" and not f.fatal for f in malformed)
    assert the(events, Usage).input_tokens == 5
    assert the(events, Result).ok


def test_an_unknown_event_type_is_reported_or_ignored_as_the_spec_says() -> None:
    stream = b'{"type":"thread.started","thread_id":"t-1"}\n{"type":"brand.new","x":1}\n'
    reported = parse("codex", stream)
    assert Unknown(type="brand.new", line=2) in reported
    quiet_spec: CliSpec = msgspec.structs.replace(SPECS["codex"], report_unknown=False)
    parser = quiet_spec.parser()
    assert not only(parser.feed(stream), Unknown)


def test_fields_of_the_wrong_shape_yield_what_can_be_read() -> None:
    stream = (
        b'{"type":"system","subtype":"init","session_id":42}\n'
        b'{"type":"assistant","message":{"content":"not a list"}}\n'
        b'{"type":"assistant","message":{"content":[{"type":"text","text":["x"]},7]}}\n'
        b'{"type":"result","subtype":"success","usage":{"input_tokens":"many","output_tokens":-3},'
        b'"total_cost_usd":"free","result":null}\n'
    )
    events = parse("claude-code", stream)
    usage = the(events, Usage)
    assert (usage.input_tokens, usage.output_tokens, usage.cost_usd) == (0, 0, None)
    assert the(events, Result).text == ""
    # The empty session id is refused, not passed on.
    assert not only(events, Session)


def test_a_session_id_unsafe_for_argv_is_refused() -> None:
    events = parse("codex", b'{"type":"thread.started","thread_id":"--config=evil"}\n')
    assert not only(events, Session)
    refused = [f for f in only(events, Failure) if f.kind == "malformed"]
    assert len(refused) == 1 and "refused" in refused[0].message


def test_a_stream_that_stops_without_a_result_ends_in_a_failure() -> None:
    events = parse("codex", b'{"type":"thread.started","thread_id":"t-1"}\n{"type":"turn.started"}')
    last = events[-1]
    assert (
        isinstance(last, Failure) and last.fatal and last.message == "codex ended without a result"
    )


def test_an_answer_in_many_pieces_is_capped_as_a_whole() -> None:
    piece = json.dumps({"type": "message", "role": "assistant", "content": "w" * 1000}).encode()
    stream = b'{"type":"init","session_id":"s-1"}\n' + (piece + b"\n") * 200
    stream += b'{"type":"result","status":"success","stats":{}}\n'
    events = parse("gemini-cli", stream)
    assert len(only(events, Text)) == 200
    assert len(the(events, Result).text) == MAX_TEXT


def test_aider_lines_that_only_look_like_its_counts_are_text() -> None:
    odd = b"Tokens: 1.2.3 sent, 4 received.\nTokens: 1..k sent, 4 received. Cost: $1.. message\n"
    events = parse("aider", odd)
    assert len(only(events, Text)) == 2 and not only(events, Usage)


def test_texts_are_capped() -> None:
    text = "z" * (MAX_TEXT * 2)
    line = json.dumps({"type": "item.completed", "item": {"type": "agent_message", "text": text}})
    events = parse("codex", line.encode() + b"\n", max_line=MAX_TEXT * 4)
    assert len(the(events, Text).text) <= MAX_TEXT + 3


@pytest.mark.parametrize(
    ("cli", "name"),
    [(c, n) for c, n, *_ in RUNS] + [("aider", "first.txt"), ("aider", "no-model-metadata.txt")],
)
def test_a_stream_read_byte_by_byte_gives_the_same_events(cli: str, name: str) -> None:
    data = (STREAMS / cli / name).read_bytes()
    parser = SPECS[cli].parser()
    events: list[CliEvent] = []
    for i in range(len(data)):
        events += parser.feed(data[i : i + 1])
    events += parser.close()
    assert events == parse(cli, data)


@pytest.mark.parametrize(
    ("message", "status", "kind"),
    [
        ("Rate limit reached for requests", None, "rate_limit"),
        ("upstream said 429", None, "rate_limit"),
        ("Too Many Requests", None, "rate_limit"),
        ("anything", 429, "rate_limit"),
        ("You exceeded your current quota, please check your plan", None, "exhausted"),
        ("Your credit balance is too low", None, "exhausted"),
        ("Claude AI usage limit reached|1796070000", None, "exhausted"),
        ("Cannot connect to API", None, "error"),
    ],
)
def test_refusals_are_told_apart(message: str, status: int | None, kind: str) -> None:
    assert failure_kind(message, status) == kind


# --- anything at all on the stream (fuzzed) ----------------------------------------

EXAMPLES = int(os.environ.get("FIRECLAW_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
#: The names the decoders look for, so that the fuzzer reaches past the first branch.
FIELDS = (
    "type subtype session_id thread_id sessionID model message content text usage input_tokens "
    "output_tokens cached_input_tokens cache_read_input_tokens cache_creation_input_tokens "
    "total_cost_usd result is_error permission_denials tool_name tool_input num_turns error "
    "api_error_status item command server tool arguments part tokens input output reasoning "
    "cache read write cost reason callID state stats cached status role tool_id parameters "
    "severity id name data statusCode rate_limit_info resetsAt"
).split()
TYPES = (
    "system assistant user result rate_limit_event stream_event thread.started turn.started "
    "item.completed turn.completed turn.failed error init message tool_use tool_result "
    "step_start text step_finish agent_message command_execution mcp_tool_call init "
    "error_max_turns error_max_budget_usd success tool-calls"
).split()
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(TYPES)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS), inner, max_size=6)
    ),
    max_leaves=25,
)
events_json = st.builds(
    lambda kind, body: {**body, "type": kind},
    st.sampled_from(TYPES),
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6),
)


def check_events(events: list[CliEvent]) -> None:
    for event in events:
        assert isinstance(
            event, Session | Text | ToolUse | Usage | Question | Result | Failure | Unknown
        )
        if isinstance(event, Session):
            assert SESSION_ID.match(event.session_id)
        if isinstance(event, Usage):
            assert min(event.input_tokens, event.output_tokens, event.cached_tokens) >= 0
        if isinstance(event, Text | Result):
            assert len(event.text) <= MAX_TEXT + 3 or isinstance(event, Result)


@pytest.mark.parametrize(
    "cli", sorted(name for name, spec in SPECS.items() if spec.stream == "jsonl")
)
@FUZZ
@given(lines=st.lists(events_json | st.binary(max_size=60), max_size=12), cut=st.integers(1, 64))
def test_any_json_lines_read_without_raising(cli: str, lines: list[object], cut: int) -> None:
    data = b"".join(
        (line if isinstance(line, bytes) else json.dumps(line).encode()).replace(b"\n", b" ")
        + b"\n"
        for line in lines
    )
    parser = SPECS[cli].parser(max_line=4096)
    events: list[CliEvent] = []
    for start in range(0, len(data), cut):
        events += parser.feed(data[start : start + cut])
    events += parser.close()
    check_events(events)
    assert len([e for e in events if isinstance(e, Failure) and "ended without" in e.message]) <= 1


@FUZZ
@given(text=st.text(max_size=400))
def test_any_text_reads_as_aider_without_raising(text: str) -> None:
    check_events(parse("aider", text.encode("utf-8", errors="surrogatepass")))
