"""What was said in #agents lately: a bounded ring of lines for the dashboard.

The overseer sits in the agents' channel and hands each line it sees to
``ChatLog.add``. The log keeps the newest ``capacity`` lines, each numbered
(``id``, rising, never reused while the supervisor runs) so a reader asks only
for what came after the last line it has.

IRC is an untrusted edge. A line is kept as plain text: IRC formatting and
every other control character removed, cut to ``MAX_TEXT`` characters, and
every secret the supervisor holds (the IRC passwords that named agents are
given, the model server's API key) replaced by ``[redacted]``, so neither an
agent nor a person who pastes one can put it on a page. Nothing here is HTML:
the dashboard writes the text with ``textContent``.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterable
from typing import Final

import msgspec
from fireclaw.guest_daemon.lines import MIN_SECRET, REDACTED, redact

__all__ = ["MAX_TEXT", "MIN_SECRET", "REDACTED", "ChatLine", "ChatLog", "redact"]

#: An IRC line is at most 512 bytes; a nick at most what the server allows.
MAX_TEXT: Final = 512
MAX_NICK: Final = 64
#: C0 and C1 controls (IRC bold, colour, reverse, CTCP's \x01), DEL, and the
#: Unicode marks that reorder or hide text.
_CONTROLS: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")
#: mIRC colour codes: \x03 then up to two digits, optionally a comma and two more.
_COLOUR: Final = re.compile(r"\x03(?:\d{1,2}(?:,\d{1,2})?)?")


class ChatLine(msgspec.Struct, frozen=True, kw_only=True):
    """One line said in the channel: when (UNIX time), by whom, what; ``action``
    for a ``/me``."""

    id: int
    at: float
    nick: str
    text: str
    action: bool = False


def _plain(text: str) -> str:
    """``text`` without IRC formatting or control characters."""
    return _CONTROLS.sub("", _COLOUR.sub("", text))


class ChatLog:
    """The newest ``capacity`` lines of one channel. ``secrets`` is asked at
    each line (secrets change on reload)."""

    def __init__(
        self,
        channel: str,
        *,
        capacity: int = 200,
        secrets: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        self.channel = channel
        self._lines: deque[ChatLine] = deque(maxlen=capacity)
        self._secrets = secrets
        self._next = 1

    def add(self, nick: str, text: str, at: float, *, action: bool = False) -> ChatLine:
        """Keep one line, made plain and redacted; the oldest goes when full."""
        secrets = tuple(self._secrets())
        # Plain first (a secret with a colour code inside shows as the secret), then
        # redacted, then cut: cut first, a secret cut in half would be shown in part.
        line = ChatLine(
            id=self._next,
            at=at,
            nick=redact(_plain(nick), secrets)[:MAX_NICK],
            text=redact(_plain(text), secrets)[:MAX_TEXT],
            action=action,
        )
        self._next += 1
        self._lines.append(line)
        return line

    def after(self, line_id: int, limit: int | None = None) -> list[ChatLine]:
        """The lines with ``id > line_id``, oldest first; the newest ``limit`` of them."""
        lines = [line for line in self._lines if line.id > line_id]
        if limit is not None:
            lines = lines[max(0, len(lines) - limit) :]
        return lines

    @property
    def last_id(self) -> int:
        """The id of the newest line (0: none yet)."""
        return self._next - 1
