"""An answer on its way to IRC as the model writes it, without I/O.

Two pieces, each fed a little at a time::

    model chunks ──> ReplyText.feed(chunk) ──> the answer's text, piece by piece
    text pieces  ──> AnswerLines.write(text) ──> IRC lines, each once complete

``ReplyText`` reads one model reply (the decoded chunks of its stream). In
native tool mode the answer is the ``content``; once the reply turns to
``tool_calls`` nothing more of it is answer. In the JSON action mode the
content is a JSON object and the answer is its ``final`` string, decoded here
as it grows (``FinalDecoder``); an object that is a tool call, or anything
that is not ``{"final": "...`` from its first key on, gives nothing at all.

``AnswerLines`` makes IRC lines of that text: a line is ready as soon as it
ends (a newline) or fills the byte budget of a page, cut as ``paginate`` cuts
it; the unfinished line waits for ``close``. At most ``max_lines`` lines go
out: the last one allowed waits until the end, to become ``(… N more lines)``
when more followed. The first line starts with a prefix (``sender:`` in a
channel), unless it already addresses that sender. Whole answers (``close``
alone) and streamed ones give the same lines, wherever the text was split.

This module imports only the standard library and ``irc_wire``: it ships
inside VM images.
"""

from __future__ import annotations

import enum
import json
import re
from typing import Final, Protocol

from .irc_wire import casefold, paginate

__all__ = ["NO_ANSWER", "AnswerLines", "Draft", "FinalDecoder", "ReplyText", "starts_addressing"]

NO_ANSWER: Final = "(no answer)"
#: Longest opening of a JSON action (up to its final string) waited for.
MAX_OPENING: Final = 128
#: What may stand before the object: a Markdown fence a server let through.
_FENCE: Final = "```json"
_ESCAPES: Final = {
    '"': '"',
    "\\": "\\",
    "/": "/",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
}
_HEX: Final = frozenset("0123456789abcdefABCDEF")
#: Where lines end, as ``paginate`` splits them.
_NEWLINES: Final = re.compile(r"\r\n|\r|\n")


class Draft(Protocol):
    """Where a turn writes its answer while the model writes it."""

    def write(self, text: str) -> None:
        """The next piece of the reply being read."""

    def discard(self) -> None:
        """The reply written since the last discard was not the answer (a tool call,
        a failed step): its unfinished line is dropped; lines already out stay out."""


def starts_addressing(text: str, nick: str) -> bool:
    """Whether ``text`` already begins with ``nick:`` or ``nick,``."""
    body = text.lstrip()
    head = casefold(body[: len(nick)])
    return head == casefold(nick) and body[len(nick) : len(nick) + 1] in (":", ",")


# --- the text of one reply ----------------------------------------------------------


class _At(enum.Enum):
    OPENING = "opening"  # before the final string: '{"final": "', a fence maybe
    IN_FINAL = "in_final"  # inside the final string: its characters are the answer
    DONE = "done"  # the final string ended
    MUTE = "mute"  # not a final answer: nothing (more) of it


class FinalDecoder:
    """The ``final`` string of a JSON action ``{"final": "..."}``, decoded as it grows.

    ``feed(text)`` returns the answer's characters that became known, escapes
    decoded (``\\uXXXX`` surrogate pairs joined, even split across pieces).
    The action counts only when ``final`` is its first key and a string; any
    other first key (``tool``), a value of another type, or text that cannot be
    JSON (a raw control character in the string, a bad escape) makes it mute
    for good. Bounded: at most ``MAX_OPENING`` characters of the opening, or
    one escape, are held between pieces.
    """

    def __init__(self) -> None:
        self.at = _At.OPENING
        self._held = ""

    def feed(self, text: str) -> str:
        text, self._held = self._held + text, ""
        if self.at is _At.OPENING:
            found = _opening(text)
            if found is None:
                self._held = text
                if len(text) > MAX_OPENING:
                    self.at, self._held = _At.MUTE, ""
                return ""
            if found < 0:
                self.at = _At.MUTE
                return ""
            self.at, text = _At.IN_FINAL, text[found:]
        out: list[str] = []
        i = 0
        while i < len(text) and self.at is _At.IN_FINAL:
            i = self._string(text, i, out)
            if i < 0:
                break
        return "".join(out) if self.at is not _At.MUTE else ""

    def _string(self, text: str, i: int, out: list[str]) -> int:
        """Decode from ``text[i]`` in the final string; the next index, or -1 when the
        rest is held for the next piece."""
        ch = text[i]
        if ch == '"':
            self.at = _At.DONE
            return i + 1
        if ch < " ":
            self.at = _At.MUTE  # a raw control character: this is not JSON
            return i + 1
        if ch != "\\":
            out.append(ch)
            return i + 1
        if i + 1 >= len(text):
            self._held = text[i:]
            return -1
        kind = text[i + 1]
        if kind in _ESCAPES:
            out.append(_ESCAPES[kind])
            return i + 2
        if kind != "u":
            self.at = _At.MUTE
            return i + 2
        code = _hex4(text, i + 2)
        if code is None:
            if len(text) < i + 6 and all(c in _HEX for c in text[i + 2 :]):
                self._held = text[i:]
                return -1
            self.at = _At.MUTE
            return i + 2
        if 0xD800 <= code < 0xDC00:  # a high surrogate: joined with the low one after it
            after = text[i + 6 : i + 12]
            if len(after) < 6 and "\\u".startswith(after[:2]) and all(c in _HEX for c in after[2:]):
                self._held = text[i:]
                return -1
            low = _hex4(text, i + 8) if after.startswith("\\u") else None
            if low is not None and 0xDC00 <= low < 0xE000:
                out.append(chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)))
                return i + 12
        out.append(chr(code))  # a lone surrogate too, as json.loads keeps it
        return i + 6


def _blank(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _opening(text: str) -> int | None:
    """Where the final string starts in ``text`` (after '{"final": "'); None while
    ``text`` may still become that opening, -1 once it cannot."""
    i = _blank(text, 0)
    if text[i : i + 1] == "`":  # a Markdown fence a server let through
        if not text.startswith(_FENCE[:3], i):
            return None if _FENCE.startswith(text[i:]) else -1
        i += 3
        if text.startswith("json", i):
            i += 4
        elif len(text) < i + 4 and "json".startswith(text[i:]):
            return None
        i = _blank(text, i)
    for want in "{", '"':
        if i >= len(text):
            return None
        if text[i] != want:
            return -1
        i = _blank(text, i + 1) if want == "{" else i
    end = _string_end(text, i)
    if end < 0:
        return None
    try:
        key = json.loads(text[i : end + 1])
    except ValueError:
        return -1
    if key != "final":
        return -1
    for want in ":", '"':
        i = _blank(text, end + 1 if want == ":" else i + 1)
        if i >= len(text):
            return None
        if text[i] != want:
            return -1
    return i + 1


def _hex4(text: str, at: int) -> int | None:
    digits = text[at : at + 4]
    return int(digits, 16) if len(digits) == 4 and all(c in _HEX for c in digits) else None


def _string_end(text: str, start: int) -> int:
    """Index of the quote that ends the JSON string opened at ``text[start]``, or -1."""
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text[i] == '"':
            return i
        else:
            i += 1
    return -1


class ReplyText:
    """The answer's text in one model reply, from its decoded stream chunks."""

    def __init__(self, *, native: bool) -> None:
        self.native = native
        self._final = None if native else FinalDecoder()
        self._mute = False

    def feed(self, chunk: object) -> str:
        """The answer's text in ``chunk`` (a decoded event or a whole response)."""
        if self._mute or not isinstance(chunk, dict):
            return ""
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return ""
        delta = choices[0].get("delta")
        if not isinstance(delta, dict):
            delta = choices[0].get("message")
        if not isinstance(delta, dict):
            return ""
        if delta.get("tool_calls"):
            self._mute = True  # the reply is a tool call: nothing of it is the answer
            return ""
        content = delta.get("content")
        if not isinstance(content, str):
            return ""
        return content if self._final is None else self._final.feed(content)


# --- IRC lines -------------------------------------------------------------------


class AnswerLines:
    """See the module docstring. ``take()`` hands out the lines ready to send;
    ``closed`` once ``close`` was called (nothing is written after)."""

    def __init__(self, *, prefix: str, budget: int, max_lines: int, addressee: str = "") -> None:
        if max_lines < 2:
            raise ValueError(f"max_lines must be at least 2, not {max_lines}")
        if budget < 4:
            raise ValueError(f"a page budget of {budget} bytes cannot hold every character")
        self.prefix = prefix
        self.addressee = addressee
        self.budget = budget
        self.max_lines = max_lines
        self.closed = False
        self._prefixed = False  # whether the first line got its prefix
        self._line = ""  # the unfinished line (its prefix in front, once decided)
        self._written = ""  # the reply so far, since the last discard
        self._ready: list[str] = []
        self._out = 0  # lines given out or ready, the held one aside
        self._held: str | None = None
        self._more = 0  # lines past the held one

    def take(self) -> list[str]:
        ready, self._ready = self._ready, []
        return ready

    def write(self, text: str) -> None:
        if self.closed:
            return
        # \x01 would make it a CTCP; paginate drops NULs, and cuts must agree with it.
        text = text.replace("\x01", "").replace("\x00", "")
        if not self._written:
            text = text.lstrip()
        if not text:
            return
        self._written += text
        *lines, self._line = _NEWLINES.split(self._line + text)
        for line in lines:
            self._page(
                line.rstrip()
            )  # trailing blanks: nothing to see, and cut like the last line's
        self._overflow()

    def discard(self) -> None:
        self._line = self._written = ""
        if not self._out and self._held is None:
            self._prefixed = False  # the prefix went with the line: the next one gets it

    def close(self, text: str) -> None:
        """The answer was ``text``: the part not written yet is written, then the
        unfinished line and the count. A ``text`` that does not go on from what was
        written (an apology) replaces it; after lines went out it is one line."""
        if self.closed:
            return
        whole = text.replace("\x01", "").replace("\x00", "").strip()
        done = self._written.rstrip()
        if done and whole.startswith(done):
            self.write(whole[len(done) :])
        elif self._out or self._held is not None:
            self.discard()
            self._held, self._more, self.closed = None, 0, True
            self._ready += paginate(whole, self.budget)[:1] or [NO_ANSWER]
            return
        else:
            self.discard()
            self.write(whole)
        self._page(self._line.rstrip())
        if not self._out:
            self._page(NO_ANSWER)
        if self._held is not None:
            self._ready.append(self._held if not self._more else f"(… {self._more + 1} more lines)")
        self._line, self._held, self.closed = "", None, True

    def _with_prefix(self, line: str) -> str:
        """``line`` as the first line of the answer, once that is known."""
        if self._prefixed:
            return line
        self._prefixed = True
        if self.addressee and starts_addressing(line, self.addressee):
            return line
        return self.prefix + line

    def _page(self, line: str) -> None:
        if line.strip():
            for page in paginate(self._with_prefix(line), self.budget):
                self._emit(page)

    def _overflow(self) -> None:
        """Cut pages off the unfinished line while it is longer than a page, as
        ``paginate`` would cut the whole line; trailing blanks wait, as the last
        line loses them."""
        if not self._prefixed:
            if len(self._line) <= len(self.addressee):
                return  # too short yet to tell whether it addresses the addressee
            self._line = self._with_prefix(self._line)
        while len(self._line.rstrip().encode("utf-8", "replace")) > self.budget:
            data = self._line.encode("utf-8", "replace")
            end = self.budget
            while end > 0 and data[end] & 0xC0 == 0x80:
                end -= 1
            piece = data[:end].decode("utf-8", "replace")
            space = piece.rfind(" ")
            if space > len(piece) // 2:
                piece, self._line = piece[:space], self._line[space + 1 :]
            else:
                self._line = self._line[len(piece) :]
            if piece.strip():
                self._emit(piece)

    def _emit(self, page: str) -> None:
        if self._out < self.max_lines - 1:
            self._ready.append(page)
            self._out += 1
        elif self._held is None:
            self._held = page
        else:
            self._more += 1
