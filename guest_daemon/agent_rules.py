"""The rules of an agent on IRC, without I/O: whom it answers, when, and how.

* Whom: a private message, or a channel message that mentions its nick as a
  whole word (``mentions``, ``addressed_to``: a leading ``nick:`` or ``nick,``
  is not part of the question); agents are told by their username
  (``is_agent``).
* When: ``ReplyPolicy``, the cooldown between answers to other agents, which
  doubles while agents keep answering each other, so they fall silent.
* How: ``reply_lines``, an answer cut into IRC lines, at most ``max_lines``.
* As whom: ``irc_config``, the client configuration of an ``IrcPresence``.

guest_daemon/agent_irc.py puts these to work on a connection.

Exceptions::

    AgentIrcError
    └── InvalidPresence   the IrcPresence cannot be used (a bad nick or channel)

This module imports only the standard library and msgspec (through the wire
modules): it ships inside VM images.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from typing import Final

from .answer_stream import AnswerLines
from .irc_events import IrcConfig
from .irc_wire import casefold
from .protocol import IrcPresence

__all__ = [
    "AGENT_USERNAME",
    "CALM",
    "MAX_ANSWER_LINES",
    "REALNAME",
    "AgentIrcError",
    "InvalidPresence",
    "ReplyPolicy",
    "addressed_to",
    "irc_config",
    "is_agent",
    "mentions",
    "reply_lines",
]

#: Every agent registers with this username; it is how agents know each other.
AGENT_USERNAME: Final = "agent"
REALNAME: Final = "fireclaw agent"
#: Lines one answer may take on IRC, including the "(… N more lines)" line.
MAX_ANSWER_LINES: Final = 10
#: After this long without answering an agent, the cooldown is back to its base.
CALM: Final = 300.0

# Characters a nick may hold (RFC 2812), folded: a mention is a nick not touching one.
_NICK_CHARS: Final = frozenset(casefold("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-[]\\`_^{|}"))
_ADDRESS_END: Final = re.compile(r"\s*[:,]\s*")


class AgentIrcError(Exception):
    """Base of this module's errors."""


class InvalidPresence(AgentIrcError, ValueError):
    """An ``IrcPresence`` that cannot be used; ``str()`` is one line."""


class ReplyPolicy:
    """Whether the agent answers a message now; time is passed in as ``now``.

    Messages from people are always answered. After answering another agent,
    the agent answers no agent message for ``cooldown`` seconds. Each further
    answer to an agent, with no person answered in between and less than
    ``calm`` seconds after the previous one, doubles that quiet period (up to
    ``calm``): so two agents whose round trip is slower than the cooldown
    (a harness that takes longer than it) still fall silent after a few
    exchanges instead of trading messages forever. The doubling starts over
    once the agent answers a person, or after ``calm`` seconds without
    answering an agent. A cooldown of 0 turns all of this off.
    """

    def __init__(self, cooldown: float, *, calm: float = CALM) -> None:
        if not (math.isfinite(cooldown) and cooldown >= 0):
            raise ValueError(f"cooldown must be a number of seconds >= 0, not {cooldown!r}")
        self.cooldown = cooldown
        self.calm = calm
        self.quiet_until = -math.inf
        self.streak = 0
        self._last_agent_answer = -math.inf

    def should_answer(self, now: float, from_agent: bool) -> bool:
        return not from_agent or now >= self.quiet_until

    def answered(self, now: float, to_agent: bool) -> None:
        """The agent replied at ``now`` (an answer, or an apology in its place)."""
        if not to_agent:
            self.streak = 0
            return
        if now - self._last_agent_answer >= self.calm:
            self.streak = 0
        self.streak += 1
        self._last_agent_answer = now
        quiet = min(self.cooldown * 2 ** min(self.streak - 1, 32), max(self.calm, self.cooldown))
        self.quiet_until = max(self.quiet_until, now + quiet)


def is_agent(user: str) -> bool:
    """Whether a message's username (``~agent`` without ident) is an agent's."""
    return user.removeprefix("~").lower() == AGENT_USERNAME


def _mentioned_at(folded: str, nick: str) -> Iterator[int]:
    start = 0
    while (index := folded.find(nick, start)) >= 0:
        before = folded[index - 1 : index]
        after = folded[index + len(nick) : index + len(nick) + 1]
        if before not in _NICK_CHARS and after not in _NICK_CHARS:
            yield index
        start = index + 1


def mentions(text: str, nick: str, casemapping: str = "rfc1459") -> bool:
    """Whether ``nick`` occurs in ``text`` as a whole word (not inside a longer nick)."""
    if not nick:
        return False
    folded = casefold(text, casemapping)
    return next(_mentioned_at(folded, casefold(nick, casemapping)), None) is not None


def addressed_to(text: str, nicks: Iterable[str], casemapping: str = "rfc1459") -> str | None:
    """The question in ``text`` if it mentions one of ``nicks``, else None.

    A leading ``nick:`` or ``nick,`` only says who is asked: it is removed
    (unless nothing would be left). A mention anywhere else keeps the text whole.
    """
    folded = casefold(text, casemapping)
    offset = len(text) - len(text.lstrip())
    found = False
    for nick in nicks:
        if not nick:
            continue
        want = casefold(nick, casemapping)
        for index in _mentioned_at(folded, want):
            found = True
            if index == offset:
                end = _ADDRESS_END.match(text, index + len(want))
                if end is not None and text[end.end() :].strip():
                    return text[end.end() :]
    return text if found else None


def reply_lines(
    text: str, *, prefix: str, budget: int, max_lines: int = MAX_ANSWER_LINES
) -> list[str]:
    """What an answer looks like on IRC: at most ``max_lines`` lines of ``budget`` bytes.

    ``prefix`` starts the first line. Blank lines are dropped; an empty answer
    is ``(no answer)``. When the answer is longer, the last line allowed says
    ``(… N more lines)`` instead.
    """
    lines = AnswerLines(prefix=prefix, budget=budget, max_lines=max_lines)
    lines.close(text)
    return lines.take()


def irc_config(presence: IrcPresence) -> IrcConfig:
    """The client configuration of an agent; ``InvalidPresence`` if it cannot be one."""
    try:
        return IrcConfig(
            host=presence.host,
            port=presence.port,
            nick=presence.nick,
            username=AGENT_USERNAME,
            realname=REALNAME,
            password=presence.password or None,
            channels=tuple(dict.fromkeys(presence.channels)),
        )
    except ValueError as exc:
        raise InvalidPresence(f"IRC presence of {presence.nick}: {exc}") from exc
