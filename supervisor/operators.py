"""Who may command the overseer: the sans-I/O decision on every ``!command``.

A hostmask proves nothing: anyone who can connect from an allowed address can
wear any nick. So a sender must match ``irc.operators`` (masks) AND prove who
they are per ``irc.operator_auth``:

* ``oper``: an IRC operator of the server (``/OPER``; WHOIS numeric 313);
* ``account``: logged in as one of ``irc.operator_accounts`` (WHOIS 330);
* ``hostmask``: the mask alone, only because the config says so.

``OperatorGate`` holds no socket and reads no clock: messages and IRC events
go in with the time, actions come out::

    submit(message, command, now)   -> [Obey | Refuse | Throttle | Whois]
    on_event(event, now)            -> [Obey | Refuse]   (WhoisReply resolves waiting commands)

Each sender (``nick!user@host``) has a token bucket first (``irc.command_rate``),
so nobody can make the overseer WHOIS or answer faster than that.

WHOIS answers are cached per nick, and only for nicks known to be in the
control channel (NAMES, JOIN): there, every way a nick can change hands (NICK,
QUIT, PART or KICK, the overseer's own reconnect or rejoin) is seen and drops
the entry. A sender outside the channel (a private message) is asked about
every time. An answer counts only if it describes the sender's own
``user@host`` and the nick did not change hands while the question was out;
otherwise the command is refused. Only a yes is cached (someone refused may
/OPER and try again), and it expires after ``ttl`` (an operator may drop
operator status without leaving).

The server answers WHOIS questions in order and always ends with 318, so
questions wait for their answer until the connection ends (``Disconnected``
refuses whatever still waits).
"""

from __future__ import annotations

import fnmatch
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Final

from fireclaw.config import IrcSpec
from fireclaw.guest_daemon.irc_events import (
    Disconnected,
    Event,
    Joined,
    Kicked,
    Message,
    Names,
    UserJoined,
    UserParted,
    UserQuit,
    UserRenamed,
    WhoisReply,
)
from fireclaw.guest_daemon.pacing import TokenBucket
from fireclaw.supervisor import commands as c

__all__ = [
    "CACHE_TTL",
    "Action",
    "Obey",
    "OperatorGate",
    "Refuse",
    "Throttle",
    "Whois",
]

#: Seconds a WHOIS answer about a channel member is trusted for.
CACHE_TTL: Final = 300.0
#: Senders whose rate state is kept; the oldest are forgotten beyond this.
MAX_SENDERS: Final = 1024
#: Commands waiting for a WHOIS answer at once; more are refused.
MAX_WAITING: Final = 64

Command = c.Command | c.Usage


@dataclass(frozen=True)
class Obey:
    message: Message
    command: Command


@dataclass(frozen=True)
class Refuse:
    """``reason`` says why, for the event log: ``mask``, ``not operator``,
    ``no operator account``, ``changed hands``, ``busy`` or ``disconnected``."""

    message: Message
    command: Command
    reason: str


@dataclass(frozen=True)
class Throttle:
    """Over the sender's rate: dropped. ``first``: the first drop since the last
    command that went through (say so once, not to every line)."""

    message: Message
    first: bool


@dataclass(frozen=True)
class Whois:
    """Ask the server ``WHOIS nick``; the answer goes to ``on_event``."""

    nick: str


Action = Obey | Refuse | Throttle | Whois


@dataclass(frozen=True)
class _Known:
    user: str
    host: str
    operator: bool
    account: str | None
    until: float


@dataclass
class _Question:
    """One WHOIS in flight and the commands waiting for its answer."""

    waiting: list[tuple[Message, Command]] = field(default_factory=list)
    #: The nick changed hands (or the channel view was reset) since it was asked.
    stale: bool = False


@dataclass
class _Sender:
    """A sender's rate: their bucket, and whether they were told they are over it."""

    bucket: TokenBucket
    warned: bool = False


_ASCII_LOWER: Final = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def fold(nick: str) -> str:
    """``nick`` with A-Z lowered: every IRC casemapping folds at least these, so
    two nicks equal here are the same nick on any server (never the reverse)."""
    return nick.translate(_ASCII_LOWER)


class OperatorGate:
    """The overseer's door; see the module docstring for the rules."""

    def __init__(self, spec: IrcSpec, *, ttl: float = CACHE_TTL) -> None:
        self.auth = spec.operator_auth
        self.masks = tuple(mask.lower() for mask in spec.operators)
        self.accounts = frozenset(account.lower() for account in spec.operator_accounts)
        self.channel = spec.control_channel.lower()
        self.rate = spec.command_rate
        self.ttl = ttl
        #: Nicks (folded) known to be in the control channel.
        self.members: set[str] = set()
        self.known: dict[str, _Known] = {}
        self._questions: dict[str, deque[_Question]] = {}
        self._waiting = 0
        self._senders: OrderedDict[str, _Sender] = OrderedDict()

    # -- commands ------------------------------------------------------------------

    def submit(self, message: Message, command: Command, now: float) -> list[Action]:
        """Decide about ``command`` from ``message`` now, or ask the server first."""
        mask = f"{message.source}!{message.user}@{message.host}"
        sender = self._sender(mask.lower(), now)
        if sender.bucket.delay(now) > 0:
            first, sender.warned = not sender.warned, True
            return [Throttle(message, first)]
        sender.bucket.take(now)
        sender.warned = False
        if not self.matches(mask):
            return [Refuse(message, command, "mask")]
        if self.auth == "hostmask":
            return [Obey(message, command)]
        key = fold(message.source)
        known = self.known.pop(key, None)
        if (
            known is not None
            and known.until > now
            and key in self.members
            and (known.user, known.host) == (message.user, message.host)
        ):
            self.known[key] = known
            return [
                self._verdict(
                    message, command, known.user, known.host, known.operator, known.account
                )
            ]
        if self._waiting >= MAX_WAITING:
            return [Refuse(message, command, "busy")]
        self._waiting += 1
        asks = self._questions.setdefault(key, deque())
        if asks and not asks[-1].stale:
            asks[-1].waiting.append((message, command))
            return []
        asks.append(_Question(waiting=[(message, command)]))
        return [Whois(message.source)]

    def matches(self, mask: str) -> bool:
        """``mask`` (``nick!user@host``) matches one of ``irc.operators``."""
        mask = mask.lower()
        return any(fnmatch.fnmatchcase(mask, pattern) for pattern in self.masks)

    def _sender(self, mask: str, now: float) -> _Sender:
        sender = self._senders.get(mask)
        if sender is None:
            if len(self._senders) >= MAX_SENDERS:
                self._senders.popitem(last=False)  # the one heard from longest ago
            bucket = TokenBucket(self.rate.per_minute / 60.0, self.rate.burst, now)
            sender = self._senders[mask] = _Sender(bucket)
        else:
            self._senders.move_to_end(mask)
        return sender

    def _verdict(
        self,
        message: Message,
        command: Command,
        user: str | None,
        host: str | None,
        operator: bool,
        account: str | None,
    ) -> Obey | Refuse:
        if (user, host) != (message.user, message.host):
            return Refuse(message, command, "changed hands")
        if not self._authenticated(operator, account):
            reason = "not operator" if self.auth == "oper" else "no operator account"
            return Refuse(message, command, reason)
        return Obey(message, command)

    def _authenticated(self, operator: bool, account: str | None) -> bool:
        if self.auth == "oper":
            return operator
        return account is not None and account.lower() in self.accounts

    # -- what the IRC connection reports ---------------------------------------------

    def on_event(self, event: Event, now: float) -> list[Action]:
        """Track the control channel and resolve questions; returns their verdicts."""
        match event:
            case WhoisReply():
                return self._answer(event, now)
            case Names(channel=channel, nicks=nicks) if channel.lower() == self.channel:
                self.members.update(fold(nick) for nick in nicks)
            case UserJoined(nick=nick, channel=channel) if channel.lower() == self.channel:
                self.members.add(fold(nick))
            case UserParted(nick=nick, channel=channel) if channel.lower() == self.channel:
                self._forget(fold(nick))
            case UserQuit(nick=nick):
                self._forget(fold(nick))
            case UserRenamed(old=old, new=new):
                was_member = fold(old) in self.members
                self._forget(fold(old))
                self._forget(fold(new))
                if was_member:
                    self.members.add(fold(new))
            case Joined(channel=channel) | Kicked(channel=channel) if (
                channel.lower() == self.channel
            ):
                self._reset()  # a fresh view of the channel follows (NAMES), or none
            case Disconnected():
                self._reset()
                return self._refuse_all("disconnected")
        return []

    def _answer(self, reply: WhoisReply, now: float) -> list[Action]:
        key = fold(reply.nick)
        asks = self._questions.get(key)
        if not asks:
            return []  # not ours, or already given up
        ask = asks.popleft()
        if not asks:
            del self._questions[key]
        self._waiting -= len(ask.waiting)
        if ask.stale:
            return [Refuse(m, cmd, "changed hands") for m, cmd in ask.waiting]
        # Only a yes is kept: someone refused may /OPER (or log in) and try again.
        if (
            key in self.members
            and reply.user is not None
            and reply.host is not None
            and self._authenticated(reply.operator, reply.account)
        ):
            self.known[key] = _Known(
                user=reply.user,
                host=reply.host,
                operator=reply.operator,
                account=reply.account,
                until=now + self.ttl,
            )
        return [
            self._verdict(m, cmd, reply.user, reply.host, reply.operator, reply.account)
            for m, cmd in ask.waiting
        ]

    def _forget(self, key: str) -> None:
        """``key`` may now be someone else: drop what we know and spoil open questions."""
        self.members.discard(key)
        self.known.pop(key, None)
        for ask in self._questions.get(key, ()):
            ask.stale = True

    def _reset(self) -> None:
        self.members.clear()
        self.known.clear()
        for asks in self._questions.values():
            for ask in asks:
                ask.stale = True

    def _refuse_all(self, reason: str) -> list[Action]:
        actions: list[Action] = [
            Refuse(m, cmd, reason)
            for asks in self._questions.values()
            for ask in asks
            for m, cmd in ask.waiting
        ]
        self._questions.clear()
        self._waiting = 0
        return actions
