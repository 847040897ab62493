"""The chat harness's tool loop, without I/O: what to ask the model, what its reply means.

One ``Turn`` is one task or one IRC question. It builds the body of each
``/v1/chat/completions`` request and reads each reply (a ``Reply``, model_reply.py)
into the next action::

    Turn.request() ──> body        (or Failed: the step cap is reached)
    Turn.on_reply(reply) ──> Answer(text)         the final answer
                             Calls([ToolCall...]) run them, then on_result() each
                             Retry                ask again (a failed step)
                             Failed(reason)       give up

Its states are a transition table (``TRANSITIONS``); an illegal move is a bug
and raises ``TurnStateError``.

Two tool modes. ``native``: the request carries ``tools`` and the model
answers with ``tool_calls``. ``json``: the request carries a
``response_format`` JSON schema that allows exactly ``{"tool": NAME,
"arguments": {...}}`` or ``{"final": TEXT}``, which llama.cpp enforces by
grammar for any model, and tool results go back as user messages.

A failed step is a model call that gave nothing usable: a reply cut off by
``finish_reason: length``, an empty reply, a malformed action, or only calls
to unknown tools or with arguments that are not a JSON object. The model is
told what was wrong and asked again, within the step cap. The same call
(tool and arguments) ``REPEAT_LIMIT`` times in a row ends the turn.

How a reply is read from what servers send (streamed or whole, each server
in its own way) is in ``model_reply``; this module sees only the ``Reply``.

This module imports only the standard library: it ships inside VM images.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from .model_reply import Reply, ToolCall

#: The same tool call (name and arguments) this many times in a row ends the turn.
REPEAT_LIMIT: Final = 3
#: Characters of one tool output shown to the model; the rest is cut from the middle.
SHOWN_OUTPUT: Final = 4000


class TurnStateError(Exception):
    """A ``Turn`` was driven out of order."""


# --- tools as the model sees them ---------------------------------------------


@dataclass(frozen=True)
class ToolSpec:
    """A tool offered to the model: its name, what it does, its JSON schema."""

    name: str
    description: str
    parameters: Mapping[str, Any]

    def native(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": dict(self.parameters),
            },
        }


def action_schema(tools: Sequence[ToolSpec]) -> dict[str, Any]:
    """The JSON schema of one action in JSON mode: a tool call or the final answer."""
    final = {
        "type": "object",
        "properties": {"final": {"type": "string"}},
        "required": ["final"],
        "additionalProperties": False,
    }
    choices: list[dict[str, Any]] = [
        {
            "type": "object",
            "properties": {"tool": {"const": tool.name}, "arguments": dict(tool.parameters)},
            "required": ["tool", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    return {"oneOf": [*choices, final]} if choices else final


def truncate_middle(text: str, limit: int = SHOWN_OUTPUT) -> str:
    """``text`` cut to about ``limit`` characters, keeping its head and tail, with a
    marker saying how much was cut from the middle."""
    if len(text) <= limit:
        return text
    keep = max(0, limit - 60)
    head, tail = text[: keep // 2], text[len(text) - (keep - keep // 2) :]
    return f"{head}\n[... {len(text) - len(head) - len(tail)} characters cut ...]\n{tail}"


# --- the turn ------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    text: str


@dataclass(frozen=True)
class Calls:
    calls: tuple[ToolCall, ...]


@dataclass(frozen=True)
class Retry:
    why: str


@dataclass(frozen=True)
class Failed:
    reason: str


Action = Answer | Calls | Retry | Failed


class State(enum.Enum):
    READY = "ready"  # the next request may be built
    ASKING = "asking"  # a request is out; its reply is awaited
    RUNNING = "running"  # tool calls are out; their results are awaited
    DONE = "done"


class Event(enum.Enum):
    REQUEST = "request"
    REPLY_RETRY = "reply_retry"
    REPLY_CALLS = "reply_calls"
    REPLY_END = "reply_end"
    RESULTS_IN = "results_in"
    GIVE_UP = "give_up"


TRANSITIONS: Final[dict[State, dict[Event, State]]] = {
    State.READY: {Event.REQUEST: State.ASKING, Event.GIVE_UP: State.DONE},
    State.ASKING: {
        Event.REPLY_RETRY: State.READY,
        Event.REPLY_CALLS: State.RUNNING,
        Event.REPLY_END: State.DONE,
    },
    State.RUNNING: {Event.RESULTS_IN: State.READY, Event.REPLY_END: State.DONE},
    State.DONE: {},
}

JSON_MODE_RULES: Final = (
    "Answer with exactly one JSON object and nothing else: either"
    ' {"tool": NAME, "arguments": {...}} to use a tool (you will be told its result),'
    ' or {"final": TEXT} with your answer.'
)


class Turn:
    """One task or question worked through to a final answer or a failure.

    ``history`` is earlier user/assistant messages (an IRC conversation).
    ``tools`` are those the agent has; ``native`` picks the tool mode.
    """

    def __init__(
        self,
        *,
        model: str,
        system: str,
        prompt: str,
        tools: Sequence[ToolSpec],
        native: bool,
        max_steps: int,
        max_tokens: int,
        history: Sequence[Mapping[str, str]] = (),
    ) -> None:
        self.model = model
        self.tools = {tool.name: tool for tool in tools}
        self.native = native
        self.max_steps = max_steps
        self.max_tokens = max_tokens
        self.steps = 0
        self.state = State.READY
        rules = "" if native else "\n\n" + JSON_MODE_RULES + _tool_list(tools)
        self.messages: list[dict[str, Any]] = [
            {"role": "system", "content": system + rules},
            *({"role": m["role"], "content": m["content"]} for m in history),
            {"role": "user", "content": prompt},
        ]
        self._pending: dict[str, ToolCall] = {}
        self._last_call: tuple[str, str] | None = None
        self._repeats = 0

    def _move(self, event: Event) -> None:
        try:
            self.state = TRANSITIONS[self.state][event]
        except KeyError:
            raise TurnStateError(f"{event.value} in state {self.state.value}") from None

    def request(self) -> dict[str, Any] | Failed:
        """The body of the next model call, or Failed when the step cap is reached."""
        if self.steps >= self.max_steps:
            self._move(Event.GIVE_UP)
            return Failed(f"no final answer within {self.max_steps} model calls")
        self._move(Event.REQUEST)
        self.steps += 1
        body: dict[str, Any] = {
            "model": self.model,
            "messages": list(self.messages),
            "max_tokens": self.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.native and self.tools:
            body["tools"] = [tool.native() for tool in self.tools.values()]
            body["tool_choice"] = "auto"
        elif not self.native:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": "action",
                    "strict": True,
                    "schema": action_schema(list(self.tools.values())),
                },
            }
        return body

    def on_reply(self, reply: Reply) -> Action:
        """What the model's reply to the last request means."""
        if reply.finish_reason == "length":
            return self._retry(
                f"Your reply was cut off at {self.max_tokens} tokens. Answer again, much shorter."
            )
        calls = reply.tool_calls if self.native else []
        if not self.native:
            action = self._read_action(reply.content)
            if isinstance(action, str):
                return self._retry(f"That was not a valid action ({action}). {JSON_MODE_RULES}")
            if isinstance(action, Answer):
                self._move(Event.REPLY_END)
                return action
            calls = [action]
        if not calls:
            if reply.content.strip():
                self._move(Event.REPLY_END)
                return Answer(reply.content.strip())
            return self._retry("Your reply was empty. Answer the question.")
        for n, call in enumerate(calls):
            call.id = call.id or f"call_{self.steps}_{n}"
        self._remember(reply.content, calls)
        for call in calls:
            if call.name not in self.tools:
                known = ", ".join(self.tools) or "none"
                call.error = f"unknown tool {call.name!r}; the tools are: {known}"
            if call.error:
                self._answer(call, f"error: {call.error}")
        runnable = tuple(call for call in calls if not call.error)
        if not runnable:
            self._move(Event.REPLY_RETRY)
            return Retry("; ".join(call.error for call in calls))
        for call in runnable:
            key = (call.name, json.dumps(call.arguments, sort_keys=True))
            self._repeats = self._repeats + 1 if key == self._last_call else 1
            self._last_call = key
            if self._repeats >= REPEAT_LIMIT:
                self._move(Event.REPLY_END)
                return Failed(f"the model called {call.name} the same way {REPEAT_LIMIT} times")
        self._pending = {call.id: call for call in runnable}
        self._move(Event.REPLY_CALLS)
        return Calls(runnable)

    def on_result(self, call: ToolCall, output: str) -> None:
        """The result of one call from the last ``Calls``: shown to the model, cut."""
        if self.state is not State.RUNNING or self._pending.pop(call.id, None) is None:
            raise TurnStateError(f"result for {call.id} not awaited")
        self._answer(call, truncate_middle(output))
        if not self._pending:
            self._move(Event.RESULTS_IN)

    def _retry(self, note: str) -> Retry:
        self._move(Event.REPLY_RETRY)
        self.messages.append({"role": "user", "content": note})
        return Retry(note)

    def _read_action(self, content: str) -> Answer | ToolCall | str:
        """The action in ``content``, or what is wrong with it. A server that does not
        enforce the schema may let the model wrap it in a Markdown code fence."""
        text = content.strip()
        if text.startswith("```") and text.endswith("```") and len(text) > 6:
            text = text[3:-3].removeprefix("json").strip()
        try:
            value = json.loads(text)
        except ValueError:
            return "not JSON"
        if not isinstance(value, dict):
            return "not a JSON object"
        # A final answer is sent on as it streams when "final" comes first: then it wins.
        final = value.get("final")
        if isinstance(final, str) and ("tool" not in value or next(iter(value)) == "final"):
            return Answer(final.strip())
        tool = value.get("tool")
        if not isinstance(tool, str):
            return 'neither "tool" nor "final"'
        arguments = value.get("arguments", {})
        raw = json.dumps(arguments)
        if not isinstance(arguments, dict):
            return ToolCall("", tool, None, raw, "arguments must be a JSON object")
        return ToolCall("", tool, arguments, raw)

    def _remember(self, content: str, calls: Sequence[ToolCall]) -> None:
        """The assistant's message that asked for ``calls``, in the history."""
        if self.native:
            self.messages.append(
                {
                    "role": "assistant",
                    "content": content or None,
                    "tool_calls": [
                        {
                            "id": call.id,
                            "type": "function",
                            "function": {"name": call.name, "arguments": call.raw_arguments},
                        }
                        for call in calls
                    ],
                }
            )
        else:
            self.messages.append({"role": "assistant", "content": content})

    def _answer(self, call: ToolCall, text: str) -> None:
        if self.native:
            self.messages.append({"role": "tool", "tool_call_id": call.id, "content": text})
        else:
            self.messages.append({"role": "user", "content": f"Result of {call.name}:\n{text}"})


def _tool_list(tools: Sequence[ToolSpec]) -> str:
    if not tools:
        return "\nYou have no tools: always answer with final."
    lines = [f"- {t.name}: {t.description} Arguments: {json.dumps(t.parameters)}" for t in tools]
    return "\nTools:\n" + "\n".join(lines)
