"""What a coding-agent CLI says while it works, as typed events, read without I/O.

A CLI run as a harness (``clis.py`` holds one spec per CLI) writes its progress
on stdout: JSON lines for most, plain text for aider. ``StreamParser`` takes
those bytes as they come and gives back ``CliEvent`` values::

    parser = StreamParser(spec)
    parser.feed(chunk) -> [Session | Text | ToolUse | Usage | Question | Result | Failure | Unknown]
    parser.close()     -> the events of a last line with no newline, and a
                          Failure if the run ended with no Result, Question or Failure

Everything on that stream is untrusted (the CLI speaks for a model), so the
parser is bounded and never raises for what it reads: a line longer than
``max_line`` bytes is one ``Failure(kind="oversize")`` and is skipped to its
end; a line that is not a JSON object is one ``Failure(kind="malformed")``
naming the CLI and the line number; a known event with fields of the wrong
shape yields what could be read from it; a session id that could not be
passed safely to a resume is a Failure, never an argv; an event type the spec
does not know is an ``Unknown`` or nothing, as the spec says. Texts are
capped at ``MAX_TEXT`` characters.

This module imports only the standard library and msgspec: it ships inside
VM images.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import msgspec

#: Longest line read from a CLI; a longer one is a Failure and is skipped.
MAX_LINE: Final = 1 << 20
#: Longest text an event carries (answer, tool arguments, error message).
MAX_TEXT: Final = 64 * 1024
#: What a session id must look like to be handed back to a CLI on its command line.
SESSION_ID: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


class _Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="event"):
    pass


class Session(_Event, frozen=True, kw_only=True, tag="session"):
    """The CLI named its session: the id its resume takes."""

    session_id: str
    model: str = ""


class Text(_Event, frozen=True, kw_only=True, tag="text"):
    """Text the model wrote (a whole message or a piece of one)."""

    text: str


class ToolUse(_Event, frozen=True, kw_only=True, tag="tool_use"):
    """The CLI ran (or asked to run) one of its tools."""

    name: str
    call_id: str = ""
    arguments: str = ""  # JSON text, capped


class Usage(_Event, frozen=True, kw_only=True, tag="usage"):
    """The CLI's own account of what a step or a run cost.

    It is the guest's claim: the gateway meters what went through it by
    itself. ``input_tokens`` counts the whole prompt, ``cached_tokens`` the
    part of it the server had cached (as OpenAI counts; each decoder brings
    its CLI's numbers to this). ``exact`` is false where the CLI rounds
    (aider's ``2.2k``)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float | None = None
    exact: bool = True


QuestionKind = Literal["permission", "question", "turn_limit"]


class Question(_Event, frozen=True, kw_only=True, tag="question"):
    """The CLI stopped for something only a person can give: an answer resumes it."""

    kind: QuestionKind
    text: str


class Result(_Event, frozen=True, kw_only=True, tag="result"):
    """The run's answer; ``ok`` is false when the CLI itself calls the run failed."""

    text: str
    ok: bool = True


FailureKind = Literal["error", "rate_limit", "exhausted", "malformed", "oversize"]


class Failure(_Event, frozen=True, kw_only=True, tag="failure"):
    """Something went wrong: the CLI said so, or its stream broke the rules.

    ``rate_limit`` and ``exhausted`` are the CLI's provider refusing (try
    later, or another account); ``fatal`` is false for what the CLI reports
    and carries on from (a retry, a warning)."""

    kind: FailureKind
    message: str
    line: int = 0
    fatal: bool = True
    #: When the provider said it takes calls again (unix seconds), if it said.
    resets_at: float | None = None
    #: The CLI's own limit (its budget flag), not its provider's: no other
    #: account would do better.
    own: bool = False


class Unknown(_Event, frozen=True, kw_only=True, tag="unknown"):
    """A line whose event type the spec does not know (reported, not acted on)."""

    type: str
    line: int


CliEvent = Session | Text | ToolUse | Usage | Question | Result | Failure | Unknown

_RATE_LIMIT = re.compile(r"\b429\b|rate.?limit|too many requests|overloaded", re.IGNORECASE)
_EXHAUSTED = re.compile(
    r"quota|usage limit|insufficient|credit balance|exhausted|budget|billing",
    re.IGNORECASE,
)


def failure_kind(message: str, status: int | None = None) -> FailureKind:
    """``rate_limit``, ``exhausted`` or ``error``, from what a CLI said of a refusal.

    CLIs pass their provider's words on rather than a code, so the words
    decide: a quota, budget or credit refusal is exhaustion (switch account),
    a 429 or "rate limit" without those is a rate limit (wait)."""
    if _EXHAUSTED.search(message):
        return "exhausted"
    if status == 429 or _RATE_LIMIT.search(message):
        return "rate_limit"
    return "error"


# How the CLIs say when an account takes calls again, from their providers' words:
# claude-code's "Claude AI usage limit reached|1753088400" (unix time), the
# Codex backend's usage_limit_reached error ("resets_at":1777936568,
# "resets_in_seconds":13872), codex's own "Try again in 4 days 20 hours 9
# minutes." and an OpenAI-style "Please try again in 20s".
_RESETS_AT = re.compile(r'(?:limit reached\||"?resets_?at"?\s*[:=]\s*)(\d{9,11})\b', re.I)
_RESETS_IN = re.compile(r'"?resets_in_seconds"?\s*[:=]\s*(\d{1,9})\b', re.I)
_TRY_AGAIN = re.compile(
    r"try again in\s+((?:\d{1,6}(?:\.\d+)?\s*[a-z]+[\s,]*(?:and\s+)?){1,4})", re.I
)
_PART = re.compile(r"(\d{1,6}(?:\.\d+)?)\s*([a-z]+)", re.I)
_UNIT_SECONDS: Final = {
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}  # fmt: skip


def reset_hint(message: str, now: float) -> float | None:
    """When (unix seconds) the provider's words in ``message`` say the account
    takes calls again, reading relative times from ``now``; None if they do not say."""
    if found := _RESETS_AT.search(message):
        return float(found.group(1))
    if found := _RESETS_IN.search(message):
        return now + float(found.group(1))
    if found := _TRY_AGAIN.search(message):
        parts = _PART.findall(found.group(1))
        if all(unit.lower() in _UNIT_SECONDS for _, unit in parts):
            return now + sum(float(n) * _UNIT_SECONDS[unit.lower()] for n, unit in parts)
    return None


def clip(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# --- reading decoded JSON without trusting its shape --------------------------


def get(obj: object, *path: str) -> object:
    """``obj[path[0]][path[1]]...``, or None where a step is missing or not an object."""
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def text_at(obj: object, *path: str) -> str:
    value = get(obj, *path)
    return clip(value) if isinstance(value, str) else ""


def int_at(obj: object, *path: str) -> int:
    value = get(obj, *path)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return max(0, min(int(value), 2**53))


def float_at(obj: object, *path: str) -> float | None:
    value = get(obj, *path)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if value == value and 0 <= value < 1e12 else None


def json_text(value: object) -> str:
    """``value`` as capped JSON text (tool arguments), whatever it is."""
    if value is None:
        return ""
    if isinstance(value, str):
        return clip(value, MAX_TEXT // 4)
    try:
        return clip(msgspec.json.encode(value).decode(), MAX_TEXT // 4)
    except (TypeError, ValueError, OverflowError):
        return ""


# --- the parser ---------------------------------------------------------------


@dataclass
class RunState:
    """What a decoder may remember between the lines of one run."""

    line: int = 0
    session_id: str = ""
    #: The text of the current step; a CLI whose result does not repeat its
    #: answer (codex, opencode, aider) makes its Result from it.
    step_text: list[str] = field(default_factory=list)
    #: The text of the last step that had any.
    last_text: str = ""

    def add_text(self, text: str) -> Text:
        """``text`` as an event, kept for the step's answer up to ``MAX_TEXT`` in all."""
        kept = sum(map(len, self.step_text))
        if kept < MAX_TEXT:
            self.step_text.append(text[: MAX_TEXT - kept])
        return Text(text=text)

    def end_step(self) -> str:
        """The current step's text, or the last step's that had any; starts a new step.

        Text before a tool call is the model thinking aloud: the answer is the
        text after the last one."""
        text = "".join(self.step_text)
        if text:
            self.last_text = text
        self.step_text = []
        return self.last_text


#: Turns one line of a CLI's output into events: a decoded JSON object for a
#: ``jsonl`` stream, the line's text for a ``text`` one. Returns None for an
#: event type it does not know. Must not raise for any input.
Decoder = Callable[[Any, RunState], "list[CliEvent] | None"]


class StreamParser:
    """Bytes of one CLI run in, ``CliEvent`` out; see the module docstring."""

    def __init__(
        self,
        *,
        cli: str,
        decode: Decoder,
        stream: Literal["jsonl", "text"],
        report_unknown: bool,
        max_line: int = MAX_LINE,
    ) -> None:
        self.cli = cli
        self._decode = decode
        self._stream = stream
        self._report_unknown = report_unknown
        self._max_line = max_line
        self._buffer = bytearray()
        self._skipping = False  # inside a line already reported as too long
        self._ended = False  # a Result, a Question or a fatal Failure was given
        self.state = RunState()

    def feed(self, data: bytes) -> list[CliEvent]:
        """Events of every line that ``data`` completes."""
        events: list[CliEvent] = []
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self._max_line and not self._skipping:
                    events.append(self._oversize(self.state.line + 1))
                if self._skipping:
                    self._buffer.clear()
                return events
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            self.state.line += 1
            if self._skipping:
                self._skipping = False
            elif len(line) > self._max_line:
                events.append(self._oversize(self.state.line, skip=False))
            else:
                events += self._line(line)

    def close(self) -> list[CliEvent]:
        """The end of the stream: the last unterminated line, and a Failure if the
        run never came to a Result, a Question or a fatal Failure."""
        events: list[CliEvent] = []
        if self._buffer and not self._skipping:
            self.state.line += 1
            events += self._line(bytes(self._buffer))
        self._buffer.clear()
        self._skipping = False
        if not self._ended:
            events.append(Failure(kind="error", message=f"{self.cli} ended without a result"))
            self._ended = True
        return events

    def _oversize(self, line: int, *, skip: bool = True) -> Failure:
        self._skipping = skip
        if skip:
            self._buffer.clear()
        return Failure(
            kind="oversize",
            message=f"{self.cli}: line {line} is longer than {self._max_line} bytes",
            line=line,
            fatal=False,
        )

    def _line(self, raw: bytes) -> list[CliEvent]:
        number = self.state.line
        text = raw.decode("utf-8", errors="replace").rstrip("\r")
        if self._stream == "text":
            # A blank line of text may be a paragraph break of the answer.
            decoded = self._decode(text, self.state)
        elif not text.strip():
            return []
        else:
            try:
                obj = msgspec.json.decode(text)
            except msgspec.DecodeError:
                return [self._malformed(number, f"not JSON: {clip(text.strip(), 80)!r}")]
            if not isinstance(obj, dict):
                return [self._malformed(number, "not a JSON object")]
            decoded = self._decode(obj, self.state)
            if decoded is None:
                kind = text_at(obj, "type")
                return [Unknown(type=clip(kind, 64), line=number)] if self._report_unknown else []
        return self._admit(decoded or [], number)

    def _malformed(self, line: int, why: str) -> Failure:
        return Failure(
            kind="malformed", message=f"{self.cli}: line {line}: {why}", line=line, fatal=False
        )

    def _admit(self, events: list[CliEvent], line: int) -> list[CliEvent]:
        """Drop repeats of the session id, refuse unsafe ones, note the end of the run."""
        out: list[CliEvent] = []
        for event in events:
            if isinstance(event, Session):
                if not SESSION_ID.match(event.session_id):
                    out.append(
                        self._malformed(line, f"session id {clip(event.session_id, 40)!r} refused")
                    )
                    continue
                if event.session_id == self.state.session_id:
                    continue
                self.state.session_id = event.session_id
            elif isinstance(event, Failure) and line and not event.line:
                event = msgspec.structs.replace(event, line=line)
            # A question ends the run too: the CLI stopped to wait for an answer.
            if isinstance(event, Result | Question) or (isinstance(event, Failure) and event.fatal):
                self._ended = True
            out.append(event)
        return out
