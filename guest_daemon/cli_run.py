"""A coding-agent CLI as the agent's harness: one headless run per task or IRC turn.

``run_cli(cli, prompt, ...)`` does, for the spec ``cli.cli`` names (clis.py):

1. resumes the session it is given (a waiting task's, answered), else the one
   the last run left in ``<workspace>/.cli/<cli>/session`` (read through
   ``confine``: a symlink planted there is not followed); a CLI that resumes
   without an id (aider reads its history file back) resumes once a run of it
   has answered;
2. makes the CLI's state folders and files under the workspace as the agent
   user (``confine.py mkdir`` and ``write``), so that a named agent's CLI state
   lives on its workspace disk and outlives its VM;
3. starts it as the agent user in the workspace, leading its own process
   group, with the daemon's environment (less its token), the role's secrets,
   then what the spec sets (its state folders, the gateway's URL and key);
   its process group is killed after ``timeout``;
4. reads its stdout with ``cli_stream`` into the answer, and reports through
   ``audit`` each tool it says it used and, once it ends, its own usage
   report, as the tool ``usage_claim``: the guest's claim, never what a budget
   counts (the gateway meters what it carried itself);
5. keeps the session id it named for the next run;
6. when the CLI stopped to ask something (``cli_stream.Question``: a
   permission it was denied, its turn limit), gives the question and the
   session with the outcome, for the task to wait for an answer.

Nothing the CLI does makes it raise: a failure is the outcome's code and text.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import trio

from . import confine
from .cli_spec import CliSpec, Invocation, SpecError
from .cli_stream import (
    CliEvent,
    Failure,
    Question,
    Result,
    Session,
    ToolUse,
    Unknown,
    Usage,
    reset_hint,
)
from .clis import SPECS
from .harness import (
    REAP_TIMEOUT,
    Children,
    OutputCap,
    child_env,
    one_line,
    signal_group,
    spawn,
    spawn_failure,
    task_output,
)
from .protocol import MAX_OUTPUT_CHUNK, MAX_RETRY_AFTER, CliHarness, Limited
from .users import RunAs, python_for

log = logging.getLogger("fireclaw.guest_daemon")

#: Under the CLI's state folder: the session its next run resumes.
SESSION_FILE: Final = "session"
#: What a resume without an id (aider) keeps there once a run has answered.
RESUMABLE: Final = "history"
MAX_SESSION_BYTES: Final = 256
#: The CLI's stderr kept for the line a run with no answer reports.
MAX_STDERR: Final = 8 * 1024
#: The audit trail's name for the CLI's own usage report.
USAGE_TOOL: Final = "usage_claim"
#: Exit code of a run that gave no answer (as the chat harness's).
EXIT_NO_ANSWER: Final = 1
#: Exit code of a run that could not be set up (a spec that refuses what it was given).
EXIT_SETUP: Final = 78
#: Tool uses of one run put on the audit trail; a CLI that says it used more is
#: still read to its end, its further tool uses counted but not sent.
MAX_AUDITED_TOOLS: Final = 1000
#: Seconds the agent user's helper may take to make a folder or write a file.
HELPER_TIMEOUT: Final = 30.0

#: (tool, arguments as JSON text, exit code, seconds, output): one audit line.
Audit = Callable[[str, str, int, float, str], Awaitable[None]]


@dataclass(frozen=True)
class CliOutcome:
    code: int
    text: str
    truncated: bool
    session: str | None = None  # what the next run resumes
    #: It stopped to ask this (the questions of the run, as one).
    question: Question | None = None
    #: It failed because its provider refused its account: the host may retry
    #: the task on another account.
    limited: Limited | None = None


def tool_name(name: str) -> str:
    """A tool the CLI used, as a name the audit trail takes: ``cli_`` and a word."""
    word = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_") or "tool"
    return f"cli_{word}"[:64]


@dataclass
class Collector:
    """What a run's events add up to (no I/O): its session, answer, failure or
    question, how many tools it used, and the sum of its own usage reports."""

    session: str | None = None
    answer: Result | None = None
    failure: Failure | None = None
    questions: list[Question] = field(default_factory=list)
    tools: int = 0  # how many it used
    usage: Usage | None = None

    def take(self, event: CliEvent) -> None:
        match event:
            case Session(session_id=session_id) if session_id:
                self.session = session_id
            case Result():
                self.answer = event
            case Question():
                self.questions.append(event)
            case Failure(fatal=True) if self.failure is None:
                self.failure = event
            case Failure(message=message):
                log.info("cli: %s", one_line(message, 200))
            case ToolUse():
                self.tools += 1
            case Usage():
                self.usage = event if self.usage is None else _add(self.usage, event)
            case Unknown(type=kind):
                log.info("cli: an event of type %s, not known to its spec", kind[:40])

    @property
    def question(self) -> Question | None:
        """What the run stopped to ask, its questions joined (a denied permission
        and the turn limit it then hit), of the first one's kind."""
        if not self.questions:
            return None
        text = "; ".join(dict.fromkeys(q.text for q in self.questions))
        return Question(kind=self.questions[0].kind, text=text)

    def claim(self, cli: str, metered: bool, resumed: str | None) -> str:
        """The usage report as the audit trail keeps it: marked as the CLI's own,
        with the session it ran in and the one it was started to resume."""
        usage = self.usage or Usage()
        return json.dumps(
            {
                "cli": cli,
                "claim": "the CLI's own report; budgets count what the gateway metered",
                "session": self.session,
                "resumed": resumed,
                "through_gateway": metered,
                "input_tokens": usage.input_tokens,
                "output_tokens": usage.output_tokens,
                "cached_tokens": usage.cached_tokens,
                "cost_usd": usage.cost_usd,
                "exact": usage.exact,
                "tool_uses": self.tools,
            }
        )

    def limited(self, code: int, now: float) -> Limited | None:
        """Whether a run that ended with ``code`` failed on its provider's refusal
        of the account (a rate limit, a spent quota), and until when, as the
        CLI said (``now``: unix time, for a relative "try again in ...")."""
        failure = self.failure
        if code == 0 or failure is None or failure.own:
            return None
        if failure.kind not in ("rate_limit", "exhausted"):
            return None
        resets = failure.resets_at or reset_hint(failure.message, now)
        wait = None if resets is None else min(MAX_RETRY_AFTER, max(0.0, resets - now))
        return Limited(kind=failure.kind, retry_after=wait, message=one_line(failure.message, 300))

    def outcome(self, cli: str, code: int, *, note: str, stderr: str) -> tuple[int, str]:
        """The run's ``(exit code, text)`` from what it said and how it exited."""
        if note:
            partial = self.answer.text if self.answer is not None else ""
            return code, f"{partial}\n{note}".strip()
        if self.answer is not None and self.answer.ok and code == 0:
            return 0, self.answer.text
        if (question := self.question) is not None:
            return EXIT_NO_ANSWER, f"{cli} stopped to ask ({question.kind}): {question.text}"
        if self.failure is not None:
            return code or EXIT_NO_ANSWER, f"{cli}: {self.failure.message}"
        if self.answer is not None:
            return code or EXIT_NO_ANSWER, self.answer.text
        why = one_line(stderr.strip().splitlines()[-1], 300) if stderr.strip() else "no output"
        return code or EXIT_NO_ANSWER, f"{cli} exited {code} with no answer ({why})"


def _add(a: Usage, b: Usage) -> Usage:
    costs = [c for c in (a.cost_usd, b.cost_usd) if c is not None]
    return Usage(
        input_tokens=a.input_tokens + b.input_tokens,
        output_tokens=a.output_tokens + b.output_tokens,
        cached_tokens=a.cached_tokens + b.cached_tokens,
        cost_usd=sum(costs) if costs else None,
        exact=a.exact and b.exact,
    )


def read_session(spec: CliSpec, root: str) -> str | None:
    """The session the CLI's last run in ``root`` left, if any."""
    path = posixpath.join(spec.state_dir(root), SESSION_FILE)
    try:
        data = confine.read_in(root, path, MAX_SESSION_BYTES)
    except confine.Refused:
        return None
    return data.decode("utf-8", errors="replace").strip() or None


def plan(
    spec: CliSpec,
    cli: CliHarness,
    prompt: str,
    *,
    root: str,
    model: str,
    resume: str | None = None,
) -> tuple[Invocation, str | None]:
    """The run to make, and the session it resumes: ``resume`` (an answered
    question's), else the last one, when there is one the spec can take.
    Raises SpecError for what the spec cannot take, ``resume`` included."""
    if resume is not None:
        if spec.resume is None:
            raise SpecError(f"{spec.name} cannot resume a session")
        return invocation_for(spec, cli, prompt, root=root, model=model, session=resume), resume
    session = read_session(spec, root)

    def invocation(session: str | None) -> Invocation:
        return invocation_for(spec, cli, prompt, root=root, model=model, session=session)

    if session is not None:
        try:
            return invocation(session), session
        except SpecError as exc:
            log.info("%s: not resuming: %s", spec.name, exc)
    return invocation(None), None


def invocation_for(
    spec: CliSpec, cli: CliHarness, prompt: str, *, root: str, model: str, session: str | None
) -> Invocation:
    return spec.invocation(
        prompt,
        workspace=root,
        model=model,
        session=session,
        gateway=cli.gateway,
        turns=cli.max_turns,
        budget_usd=cli.max_budget_usd,
    )


async def _as_agent(
    user: RunAs, env: Mapping[str, str], root: str, args: Sequence[str], data: bytes = b""
) -> str | None:
    """Run ``confine.py ARGS`` as ``user``: None, or its one-line complaint."""
    argv = [python_for(user), "-I", confine.__file__, *args]
    with trio.move_on_after(HELPER_TIMEOUT):
        done = await trio.run_process(
            argv,
            stdin=data,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=root,
            env={**env, **user.env()},
            **user.spawn_options(),
        )
        if done.returncode == 0:
            return None
        return one_line(done.stderr.decode("utf-8", errors="replace") or f"exit {done.returncode}")
    return f"took more than {HELPER_TIMEOUT:g}s"


async def prepare(
    spec: CliSpec, run: Invocation, *, root: str, user: RunAs, env: Mapping[str, str]
) -> str | None:
    """Make the CLI's state folders and write its files, as the agent user."""
    folders = sorted({*spec.state_env(root).values(), spec.state_dir(root)})
    complaint = await _as_agent(user, env, root, ["mkdir", root, *folders])
    for path, body in run.files.items():
        if complaint is None:
            complaint = await _as_agent(user, env, root, ["write", root, path], body.encode())
    return complaint


async def run_cli(
    cli: CliHarness,
    prompt: str,
    children: Children,
    base_env: Mapping[str, str],
    *,
    root: str,
    model: str,
    user: RunAs,
    audit: Audit,
    label: str = "turn",
    resume: str | None = None,
) -> CliOutcome:
    """Run the CLI ``cli`` names on ``prompt`` in ``root``, resuming the session
    ``resume`` if given; see the module docstring."""
    spec = SPECS[cli.cli]
    env = child_env(base_env)
    try:
        run, resumed = plan(spec, cli, prompt, root=root, model=model, resume=resume)
    except SpecError as exc:
        return CliOutcome(EXIT_SETUP, str(exc), False)
    complaint = await prepare(spec, run, root=root, user=user, env=env)
    if complaint is not None:
        return CliOutcome(EXIT_SETUP, f"{spec.name}: cannot set up its state: {complaint}", False)
    # The secrets first: what the spec sets (the gateway's key) wins over them.
    overrides = {**cli.secrets.values, **run.env}
    try:
        proc = await spawn(
            run.argv, env=env, cwd=root, merge_stderr=False, user=user, overrides=overrides
        )
    except (OSError, ValueError) as exc:
        code, error = spawn_failure(exc)
        log.info("%s: cannot start %s: %s", label, run.argv[0], error)
        return CliOutcome(code, f"{spec.name}: {error}", False)
    how = f"resuming {resumed}" if resumed else "a new session"
    log.info("%s: started %s (%s, pid %d)", label, spec.name, how, proc.pid)
    started = trio.current_time()
    parser, seen, stderr = spec.parser(), Collector(), OutputCap(MAX_STDERR)

    async def read_stdout() -> None:
        assert proc.stdout is not None
        while chunk := await proc.stdout.receive_some(MAX_OUTPUT_CHUNK):
            for event in parser.feed(bytes(chunk)):
                seen.take(event)
                if isinstance(event, ToolUse) and seen.tools <= MAX_AUDITED_TOOLS:
                    await audit(tool_name(event.name), event.arguments, 0, 0.0, "")
        for event in parser.close():
            seen.take(event)

    async def read_stderr() -> None:
        assert proc.stderr is not None
        while chunk := await proc.stderr.receive_some(MAX_OUTPUT_CHUNK):
            stderr.feed(chunk)

    note = ""
    async with children.track(proc):
        with trio.move_on_after(cli.timeout) as deadline:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_stdout)
                nursery.start_soon(read_stderr)
            code = await proc.wait()
        if deadline.cancelled_caught:
            signal_group(proc.pid, signal.SIGKILL)
            note = f"timed out after {cli.timeout:g}s"
            code = -signal.SIGKILL
            with trio.move_on_after(REAP_TIMEOUT):
                await proc.wait()
    elapsed = trio.current_time() - started
    await audit(USAGE_TOOL, seen.claim(spec.name, run.metered, resumed), code, elapsed, "")
    text_err = stderr.kept.decode("utf-8", errors="replace")
    code, text = seen.outcome(spec.name, code, note=note, stderr=text_err)
    limited = seen.limited(code, time.time())
    session = await _keep_session(spec, seen, code, root=root, user=user, env=env)
    await trio.to_thread.run_sync(os.sync)  # its state is on the disk before the answer goes
    output, truncated = task_output(text.encode(), truncated=False)
    log.info("%s: %s exited %d after %.1fs", label, spec.name, code, elapsed)
    return CliOutcome(code, output, truncated, session, seen.question, limited)


async def _keep_session(
    spec: CliSpec, seen: Collector, code: int, *, root: str, user: RunAs, env: Mapping[str, str]
) -> str | None:
    """Write down what the next run resumes: the id the CLI named, or for a CLI that
    resumes without one, that a run of it has answered."""
    takes_id = spec.resume is not None and any("{session}" in arg for arg in spec.resume)
    if takes_id:
        session = seen.session
    else:
        session = RESUMABLE if spec.resume is not None and code == 0 else None
    if session is None:
        return None
    path = posixpath.join(spec.state_dir(root), SESSION_FILE)
    complaint = await _as_agent(user, env, root, ["write", root, path], session.encode() + b"\n")
    if complaint is not None:
        log.warning("%s: cannot keep its session: %s", spec.name, complaint)
    return session
