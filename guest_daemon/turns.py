"""An agent's turns: tasks and IRC questions, by its harness, as the agent user.

``Turns`` is the part of a guest session that does agent work. The session
hands it every ``Promote`` (``retune``), ``Task``, IRC question and
``Cancel``; it keeps what lives across turns:

* who runs the work (``users.RunAs``) and where (the workspace, else the
  agent's own directory, ``users.AgentDir``);
* the agent: a ``ChatAgent`` for a chat harness, the command otherwise; a
  promotion replaces it for the next turn, never the one running;
* a short history per IRC conversation (a channel or a private talk):
  the last ``HISTORY_MESSAGES`` questions and answers;
* the cancel scope of every turn in flight: ``cancel`` ends them all, their
  model streams closed and tool processes killed, and a task so ended is
  reported done with ``EXIT_CANCELLED``.

A task whose CLI stopped to ask something is reported done with the question
and the CLI's session (``TaskDone.waiting``); the task's next ``Task``, with
``resume``, gives the operator's answer to that session.

Every tool run is reported to the host as a ``ToolRan`` (the audit trail) and,
for an IRC question, shown as one NOTICE line. A chat turn on an IRC question
writes its answer to the question's ``Draft`` as the model streams it; a
command harness answers whole, at its end.
"""

from __future__ import annotations

import collections
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Final

import trio

from . import lines
from .agent import ChatAgent, Model, ToolModes
from .agent_irc import PRIVATE
from .answer_stream import Draft
from .cli_run import CliOutcome, run_cli
from .cli_stream import SESSION_ID
from .harness import (
    Children,
    Identity,
    Send,
    one_line,
    run_harness,
    run_task,
    task_output,
)
from .model_reply import ToolCall
from .openai_client import complete
from .protocol import (
    EXIT_CANCELLED,
    MAX_QUESTION_CHARS,
    MAX_TOOL_ARGUMENTS,
    MAX_TOOL_OUTPUT,
    CliHarness,
    Task,
    TaskDone,
    ToolRan,
    Waiting,
)
from .tools import Toolbox, ToolResult
from .users import AgentDir, RunAs

log = logging.getLogger("fireclaw.guest_daemon")

#: Questions and answers of one IRC conversation the model sees again.
HISTORY_MESSAGES: Final = 8
#: Exit code of a chat task that ended without a final answer.
EXIT_NO_ANSWER: Final = 1

#: ``await notice(sender, where, text)``: one line on IRC beside the answer.
Notice = Callable[[str, str, str], Awaitable[None]]


def cut_bytes(text: str, limit: int) -> tuple[str, bool]:
    """``text`` at most ``limit`` bytes once encoded, head and tail kept around a
    marker; and whether anything was cut."""
    data = text.encode()
    if len(data) <= limit:
        return text, False
    marker = f"\n[... {len(data) - limit + 64} bytes cut ...]\n"
    keep = max(0, limit - 64)
    head = data[: keep // 2].decode("utf-8", errors="ignore")
    tail = data[len(data) - (keep - keep // 2) :].decode("utf-8", errors="ignore")
    return head + marker + tail, True


def waiting(ran: CliOutcome, secrets: Iterable[str] = ()) -> Waiting | None:
    """What a task waits for: the question its CLI stopped at, as one printable
    line of at most ``MAX_QUESTION_CHARS`` without the CLI's ``secrets`` (it may
    quote a command it wanted to run), with the session an answer resumes;
    None when it answered, or left no session to resume."""
    if ran.code == 0 or ran.question is None or ran.session is None:
        return None
    if not SESSION_ID.match(ran.session):
        return None  # the host would refuse the message (the wire checks it)
    text = lines.one_line(lines.redact(ran.question.text, secrets), MAX_QUESTION_CHARS)
    if not text:
        return None
    return Waiting(kind=ran.question.kind, question=text, session=ran.session)


class Turns:
    """See the module docstring. ``close`` removes what it made."""

    def __init__(
        self,
        *,
        user: RunAs,
        children: Children,
        env: Mapping[str, str],
        send: Send,
        model: Model = complete,
        modes: ToolModes | None = None,
    ) -> None:
        self.user = user
        self._children = children
        self._env = env
        self._send = send
        self._model = model
        self._modes = modes or ToolModes()
        self._dir: AgentDir | None = None  # made at first use: a parked guest makes none
        self.identity: Identity | None = None
        self.agent: ChatAgent | None = None
        self._history: dict[str, collections.deque[dict[str, str]]] = {}
        self._scopes: set[trio.CancelScope] = set()
        self._cancelled: dict[trio.CancelScope, str] = {}

    @property
    def workdir(self) -> str:
        """Where agent work runs: its workspace, else its own directory."""
        if self.identity is not None and self.identity.workspace:
            return self.identity.workspace
        if self._dir is None:
            self._dir = AgentDir(self.user)
        return self._dir.path

    def close(self) -> None:
        if self._dir is not None:
            self._dir.close()

    def retune(self, identity: Identity) -> None:
        """The agent is ``identity`` from the next turn on."""
        self.identity = identity
        self.agent = None
        if identity.chat is not None:
            toolbox = Toolbox(
                identity.chat.tools,
                root=self.workdir,
                user=self.user,
                children=self._children,
                env=self._env,
                timeout=identity.chat.tool_timeout,
            )
            for why in toolbox.absent:
                log.info("tool absent: %s", why)
            self.agent = ChatAgent(
                identity.chat,
                name=identity.name,
                role=identity.role,
                persona=identity.persona,
                toolbox=toolbox,
                modes=self._modes,
                model=self._model,
            )

    def cancel(self, reason: str) -> int:
        """End every turn in flight; how many there were."""
        for scope in self._scopes:
            self._cancelled[scope] = reason
            scope.cancel()
        return len(self._scopes)

    @contextmanager
    def _turn(self) -> Iterator[trio.CancelScope]:
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                yield scope
            finally:
                self._scopes.discard(scope)

    def _cancel_note(self, scope: trio.CancelScope) -> str:
        reason = self._cancelled.pop(scope, "")
        return one_line(f"cancelled{': ' + reason if reason else ''}", 200)

    async def task(self, msg: Task) -> None:
        """Serve a ``Task`` with one ``TaskDone``, whatever happens to the turn."""
        identity, agent = self.identity, self.agent
        if identity is not None and identity.cli is not None:
            ran: CliOutcome | None = None
            with self._turn() as scope:
                ran = await self._run_cli(
                    identity, identity.cli, msg.prompt, msg.task_id, resume=msg.resume
                )
            if ran is None or scope.cancelled_caught:
                note = self._cancel_note(scope)
                await self._send(TaskDone(task_id=msg.task_id, code=EXIT_CANCELLED, output=note))
                return
            await self._send(
                TaskDone(
                    task_id=msg.task_id,
                    code=max(-255, min(255, ran.code)),
                    output=ran.text,
                    truncated=ran.truncated,
                    waiting=waiting(ran, identity.cli.secrets.values.values()),
                    limited=ran.limited,
                )
            )
            return
        if agent is None:
            with self._turn() as scope:
                await run_task(
                    msg,
                    identity,
                    self._send,
                    self._children,
                    self._env,
                    user=self.user,
                    workdir=self.workdir,
                )
            if scope.cancelled_caught:
                note = self._cancel_note(scope)
                await self._send(TaskDone(task_id=msg.task_id, code=EXIT_CANCELLED, output=note))
            return

        async def report(call: ToolCall, result: ToolResult) -> None:
            await self._audit(msg.task_id, call, result)

        outcome = None
        with self._turn() as scope:
            outcome = await agent.answer(msg.prompt, report=report)
        if outcome is None or scope.cancelled_caught:
            code, text = EXIT_CANCELLED, self._cancel_note(scope)
        else:
            code, text = (0 if outcome.ok else EXIT_NO_ANSWER), outcome.text
        output, truncated = task_output(text.encode(), truncated=False)
        log.info("task %d: %s after %s", msg.task_id, "done" if code == 0 else text, code)
        await self._send(
            TaskDone(task_id=msg.task_id, code=code, output=output, truncated=truncated)
        )

    async def answer(
        self, sender: str, where: str, text: str, notice: Notice, draft: Draft | None = None
    ) -> str:
        """What the agent says on IRC to ``text`` from ``sender`` in ``where``; a chat
        turn writes it to ``draft`` too, as it streams."""
        identity, agent = self.identity, self.agent
        if identity is None:
            return "I am not an agent yet"
        if identity.cli is not None:
            ran: CliOutcome | None = None
            with self._turn() as scope:
                ran = await self._run_cli(identity, identity.cli, f"{sender}: {text}", 0)
            if ran is None or scope.cancelled_caught:
                return self._cancel_note(scope)
            return ran.text if ran.code == 0 else f"{ran.text}\n(exit {ran.code})"
        if agent is None:
            with self._turn() as scope:
                code, output, _ = await run_harness(
                    identity, text, self._children, self._env, user=self.user, workdir=self.workdir
                )
            if scope.cancelled_caught:
                return self._cancel_note(scope)
            return output if code == 0 else f"{output}\n(exit {code})"

        async def report(call: ToolCall, result: ToolResult) -> None:
            await self._audit(0, call, result)
            args = one_line(call.raw_arguments, 120)
            await notice(sender, where, f"[{call.name}] {args} -> exit {result.code}")

        history = self._history.setdefault(
            where if where != PRIVATE else f"{PRIVATE}:{sender}",
            collections.deque(maxlen=HISTORY_MESSAGES),
        )
        question = f"{sender}: {text}"
        outcome = None
        with self._turn() as scope:
            outcome = await agent.answer(
                question, report=report, history=list(history), draft=draft
            )
        if outcome is None or scope.cancelled_caught:
            return self._cancel_note(scope)
        if not outcome.ok:
            return f"sorry, I could not answer that ({one_line(outcome.text, 200)})"
        history.append({"role": "user", "content": question})
        history.append({"role": "assistant", "content": outcome.text})
        return outcome.text

    async def _run_cli(
        self,
        identity: Identity,
        cli: CliHarness,
        prompt: str,
        task_id: int,
        *,
        resume: str | None = None,
    ) -> CliOutcome:
        """One run of the agent's CLI, its tools and usage claim on the audit trail."""

        async def audit(tool: str, arguments: str, code: int, duration: float, out: str) -> None:
            await self._send(
                ToolRan(
                    task_id=task_id,
                    tool=tool,
                    arguments=cut_bytes(arguments, MAX_TOOL_ARGUMENTS)[0],
                    code=max(-255, min(255, code)),
                    duration=max(0.0, min(duration, 86400.0)),
                    output=cut_bytes(out, MAX_TOOL_OUTPUT)[0],
                )
            )

        return await run_cli(
            cli,
            prompt,
            self._children,
            self._env,
            root=self.workdir,
            model=identity.model,
            user=self.user,
            audit=audit,
            label=f"task {task_id}" if task_id else "question",
            resume=resume,
        )

    async def _audit(self, task_id: int, call: ToolCall, result: ToolResult) -> None:
        arguments, _ = cut_bytes(
            call.raw_arguments or json.dumps(call.arguments), MAX_TOOL_ARGUMENTS
        )
        output, cut = cut_bytes(result.output, MAX_TOOL_OUTPUT)
        log.info("tool %s: exit %d in %.2fs", call.name, result.code, result.duration)
        await self._send(
            ToolRan(
                task_id=task_id,
                tool=call.name[:64],
                arguments=arguments,
                code=max(-255, min(255, result.code)),
                duration=min(result.duration, 86400.0),
                output=output,
                truncated=cut or result.truncated,
            )
        )
