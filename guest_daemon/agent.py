"""The chat harness at work: a ``chat.Turn`` driven against the model and the tools.

``ChatAgent`` is what a ``Promote`` with a ``ChatHarness`` makes of the
guest: ``answer(prompt)`` runs one turn (a task, or a question on IRC with
its conversation so far) to a ``TurnOutcome``. A later ``Promote`` (a new
model or persona) makes a new ``ChatAgent``; a turn already running keeps
the one it started with, so a change takes effect at the next turn.

Bounds: the whole turn has ``harness.timeout`` seconds (a cancel scope here,
at the call site); each tool run ``harness.tool_timeout`` (in ``tools``).
A caller cancelling the turn closes the model's stream and kills the tool
that runs (``Children.track``), and gets the cancellation, not an outcome.

Given a ``Draft`` (an IRC question), a turn writes each reply's answer text
to it as the model streams it (``answer_stream.ReplyText``), and discards it
when the reply turns out not to be the final answer (a tool call, a failed
step): the final answer reaches IRC line by line before the turn ends. Lines
of such a reply that were complete are out already, as the model's words (a
native model's preface to its tool call); a JSON tool call writes nothing.

The tool mode ``auto`` asks the server once per base URL and model (cached
in ``ToolModes``) and falls back to the JSON action mode.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from .answer_stream import Draft, ReplyText
from .chat import Answer, Calls, Failed, Retry, Turn
from .model_reply import Reply, ToolCall
from .openai_client import ModelError, complete, tool_support
from .protocol import ChatHarness
from .tools import Toolbox, ToolResult, read_memory

log = logging.getLogger("fireclaw.guest_daemon")

#: ``await model(base_url, body)`` -> the reply; ``openai_client.complete`` by default.
#: A turn with a draft passes ``on_chunk=`` too, as ``complete`` takes it.
Model = Callable[..., Awaitable[Reply]]
#: ``await probe(base_url)`` -> whether native tools are supported.
Probe = Callable[[str], Awaitable[bool]]
#: ``await report(call, result)`` for every tool run: the audit trail, an IRC notice.
Report = Callable[[ToolCall, ToolResult], Awaitable[None]]


@dataclass(frozen=True)
class TurnOutcome:
    """How a turn ended: ``ok`` with the final answer, or not with the reason."""

    ok: bool
    text: str
    steps: int


class ToolModes:
    """Whether each (base URL, model) takes native tools, asked once."""

    def __init__(self, probe: Probe = tool_support) -> None:
        self._probe = probe
        self._known: dict[tuple[str, str], bool] = {}

    async def native(self, harness: ChatHarness) -> bool:
        if harness.tool_mode != "auto":
            return harness.tool_mode == "native"
        key = (harness.base_url, harness.model)
        if key not in self._known:
            self._known[key] = await self._probe(harness.base_url)
            log.info(
                "model %s: %s tool calls",
                harness.model,
                "native" if self._known[key] else "JSON action",
            )
        return self._known[key]


def system_prompt(name: str, role: str, persona: str, workdir: str, memory: str) -> str:
    """Who the agent is (its persona), where it works, and what it remembers."""
    parts = [f"You are {name}, an agent of the role {role}.", persona.strip()]
    parts.append(f"Your working directory is {workdir}.")
    if memory:
        parts.append(f"What you saved to MEMORY.md earlier:\n{memory}")
    return "\n\n".join(part for part in parts if part)


class ChatAgent:
    """One agent identity with a chat harness; see the module docstring."""

    def __init__(
        self,
        harness: ChatHarness,
        *,
        name: str,
        role: str,
        persona: str,
        toolbox: Toolbox,
        modes: ToolModes,
        model: Model = complete,
    ) -> None:
        self.harness = harness
        self.name = name
        self.role = role
        self.persona = persona
        self.toolbox = toolbox
        self._modes = modes
        self._model = model

    async def answer(
        self,
        prompt: str,
        *,
        report: Report,
        history: Sequence[Mapping[str, str]] = (),
        draft: Draft | None = None,
    ) -> TurnOutcome:
        """Run one turn on ``prompt`` within the harness's timeout; the answer is
        written to ``draft`` as it streams, when there is one."""
        harness = self.harness
        with trio.move_on_after(harness.timeout):
            native = await self._modes.native(harness)
            # A local file of at most a MiB: read in place, as a thread would cost more.
            memory = read_memory(self.toolbox.root)
            turn = Turn(
                model=harness.model,
                system=system_prompt(self.name, self.role, self.persona, self.toolbox.root, memory),
                prompt=prompt,
                tools=self.toolbox.specs,
                native=native,
                max_steps=harness.max_steps,
                max_tokens=harness.max_tokens,
                history=history,
            )
            return await self._drive(turn, report, draft)
        return TurnOutcome(False, f"no final answer within {harness.timeout:g}s", 0)

    async def _drive(self, turn: Turn, report: Report, draft: Draft | None) -> TurnOutcome:
        while True:
            body = turn.request()
            if isinstance(body, Failed):
                return TurnOutcome(False, body.reason, turn.steps)
            try:
                reply = await self._ask(body, turn.native, draft)
            except ModelError as exc:
                return TurnOutcome(False, str(exc), turn.steps)
            action = turn.on_reply(reply)
            if draft is not None and not isinstance(action, Answer):
                draft.discard()
            match action:
                case Answer(text=text):
                    return TurnOutcome(True, text, turn.steps)
                case Failed(reason=reason):
                    return TurnOutcome(False, reason, turn.steps)
                case Retry(why=why):
                    log.info("step %d failed: %s", turn.steps, why)
                case Calls(calls=calls):
                    for call in calls:
                        result = await self.toolbox.run(call)
                        await report(call, result)
                        turn.on_result(call, result.for_model())

    async def _ask(self, body: dict[str, Any], native: bool, draft: Draft | None) -> Reply:
        """One model call; its answer text streamed to ``draft`` as it comes."""
        if draft is None:
            return await self._model(self.harness.base_url, body)
        text = ReplyText(native=native)

        def on_chunk(chunk: object) -> None:
            if piece := text.feed(chunk):
                draft.write(piece)

        return await self._model(self.harness.base_url, body, on_chunk=on_chunk)
