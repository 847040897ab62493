"""Sans-I/O IRC client core: one client session.

Nothing here awaits, reads a clock or touches a socket: bytes go in with the
time they arrived (``now``), events and lines to send come out. The trio
adapter in ``irc.py`` drives it; the tests drive it line by line. Lines are
read and written with ``irc_wire`` (the hardening at the edge is there); the
config and the events are in ``irc_events``; registration moves through the
transition table of ``irc_registration``.

Exceptions::

    IrcError                (irc_wire)
    ├── InvalidParameter    a command or parameter that cannot be put on the wire
    └── IllegalTransition   a registration move the table does not allow (a bug)

Server input never raises: malformed lines are dropped and counted, lines
that make no sense in the current state are ignored.

This module imports only the standard library, msgspec, irctokens and its
siblings: it ships inside VM images.
"""

from __future__ import annotations

import base64
import logging
import math
from collections.abc import Iterable
from typing import Final

import msgspec
from irctokens.hostmask import hostmask
from irctokens.line import Line

from .irc_events import (
    Event,
    Invited,
    IrcConfig,
    Joined,
    Kicked,
    Message,
    Names,
    NickChanged,
    Registered,
    UserJoined,
    UserParted,
    UserQuit,
    UserRenamed,
    WhoisReply,
)
from .irc_registration import TRANSITIONS, IllegalTransition, RegEvent, RegState
from .irc_wire import (
    MAX_LINE,
    LineReader,
    alternate_nick,
    casefold,
    clean,
    encode,
    is_channel,
    message_budget,
)

__all__ = [
    "DEFAULT_NICKLEN",
    "HOST_GUESS",
    "MAX_NICK_ATTEMPTS",
    "MAX_WHOIS",
    "SASL_CHUNK",
    "IrcSession",
]

log = logging.getLogger("fireclaw.irc")

#: A server's nick length before its ISUPPORT says otherwise (RFC 2812, ngircd).
DEFAULT_NICKLEN: Final = 9
#: Longest hostname a server may show for us before we have seen our own.
HOST_GUESS: Final = 63
#: Nicks tried at registration before giving up on this connection.
MAX_NICK_ATTEMPTS: Final = 30
#: SASL AUTHENTICATE payloads are sent in chunks of this many characters.
SASL_CHUNK: Final = 400
#: WHOIS answers being gathered at once; a server sending more loses the oldest.
MAX_WHOIS: Final = 64
#: Channel membership prefixes NAMES may put before a nick (ISUPPORT PREFIX).
_MEMBER_PREFIXES: Final = "~&@%+"

# Replies that refuse a nick: in use, collision, erroneous, temporarily unavailable.
_NICK_REFUSED: Final = frozenset({"433", "436", "432", "437"})
# SASL failures: 902 nick locked, 904 failed, 905 too long, 906 aborted, 908 mechanisms.
_SASL_FAILED: Final = frozenset({"902", "904", "905", "906", "908"})


# --- the session ---------------------------------------------------------------------


class IrcSession:
    """One connection's worth of client state.

    ``open(now)`` queues the registration lines; ``receive(data, now)`` returns
    events; ``tick(now)`` runs the timers (idle PING, ping timeout,
    registration timeout, nick regain) and ``next_deadline()`` says when it
    wants to be ticked. Lines to send accumulate until ``data_to_send()``.
    ``close_reason`` is set once the connection should be dropped.
    ``channels`` are joined after 001 (default: the configured ones).
    """

    def __init__(
        self, config: IrcConfig, *, channels: Iterable[str] | None = None, now: float
    ) -> None:
        self.config = config
        self.state = RegState.CONNECTING
        self.nick = config.nick
        self.reader = LineReader()
        self.close_reason: str | None = None
        self.nicklen = max(DEFAULT_NICKLEN, len(config.nick))
        self.chantypes = "#&+!"
        self.casemapping = "rfc1459"
        self.joined: dict[str, str] = {}
        self.last_received = now
        self._rejoin = list(dict.fromkeys(config.channels if channels is None else channels))
        self._opened_at = now
        self._outgoing: list[bytes] = []
        self._attempts = 0
        self._caps: list[str] = []
        self._ping_sent: float | None = None
        self._pings = 0
        self._next_regain: float | None = None
        self._user = config.username
        self._host: str | None = None
        self._whois: dict[str, WhoisReply] = {}

    # -- state ---------------------------------------------------------------------

    @property
    def registered(self) -> bool:
        return self.state is RegState.REGISTERED

    def _fire(self, event: RegEvent) -> None:
        try:
            self.state = TRANSITIONS[self.state][event]
        except KeyError:
            raise IllegalTransition(f"no {event.value} from {self.state.value}") from None

    def _may(self, event: RegEvent) -> bool:
        """Fire ``event`` if the table allows it now (for moves the server drives)."""
        if event not in TRANSITIONS[self.state]:
            return False
        self._fire(event)
        return True

    def close(self, reason: str) -> None:
        """Mark the connection as finished; the first reason is kept."""
        if self.state is not RegState.CLOSED:
            self._fire(RegEvent.CLOSE)
        if self.close_reason is None:
            self.close_reason = reason

    # -- output --------------------------------------------------------------------

    def send(self, command: str, *params: str) -> None:
        self._outgoing.append(encode(command, *params))

    def data_to_send(self) -> list[bytes]:
        """The lines queued since the last call, in order."""
        lines, self._outgoing = self._outgoing, []
        return lines

    def fold(self, name: str) -> str:
        return casefold(name, self.casemapping)

    def budget(self, command: str, target: str) -> int:
        """Text bytes per ``command`` line to ``target`` (see ``message_budget``)."""
        return message_budget(
            nick="x" * max(len(self.nick), len(self.config.nick)),
            username=self._user,
            host=self._host or "x" * HOST_GUESS,
            command=command,
            target=target,
        )

    def join_lines(self, channels: Iterable[str]) -> list[bytes]:
        """JOIN lines for ``channels``, several per line where they fit."""
        lines: list[bytes] = []
        batch: list[str] = []
        for channel in channels:
            if not is_channel(channel, self.chantypes):
                continue
            if batch and len(",".join([*batch, channel])) > MAX_LINE - 2 - len("JOIN "):
                lines.append(encode("JOIN", ",".join(batch)))
                batch = []
            batch.append(channel)
        if batch:
            lines.append(encode("JOIN", ",".join(batch)))
        return lines

    # -- registration ---------------------------------------------------------------

    def open(self) -> None:
        """Queue PASS, CAP LS (with SASL), NICK and USER."""
        config = self.config
        if config.password is not None:
            self.send("PASS", config.password)
        if config.sasl_username is not None:
            self.send("CAP", "LS", "302")
            self._fire(RegEvent.OPEN_CAP)
        else:
            self._fire(RegEvent.OPEN)
        self.send("NICK", self.nick)
        self.send("USER", config.username, "0", "*", config.realname)

    def _cap_end(self) -> None:
        self.send("CAP", "END")
        self._fire(RegEvent.CAP_END)

    def _next_nick(self, refused: str, code: str) -> None:
        """Registration: the server refused ``refused``; try the next alternate."""
        self._attempts += 1
        if self._attempts >= MAX_NICK_ATTEMPTS:
            self.close(f"the server accepted none of {self._attempts} nicks based on {self.nick}")
            return
        if code == "432" and len(refused) > 1:
            # Erroneous, most likely too long for a server whose NICKLEN we do not know yet.
            self.nicklen = min(self.nicklen, len(refused) - 1)
        self.nick = alternate_nick(self.config.nick, self._attempts, self.nicklen)
        self.send("NICK", self.nick)

    # -- timers --------------------------------------------------------------------

    def next_deadline(self) -> float:
        """When ``tick`` has something to do next (``inf`` once closed)."""
        if self.state is RegState.CLOSED:
            return math.inf
        if not self.registered:
            return self._opened_at + self.config.ping_timeout
        if self._ping_sent is not None:
            deadline = self._ping_sent + self.config.ping_timeout
        else:
            deadline = self.last_received + self.config.ping_idle
        if self._next_regain is not None:
            deadline = min(deadline, self._next_regain)
        return deadline

    def tick(self, now: float) -> None:
        if self.state is RegState.CLOSED:
            return
        config = self.config
        if not self.registered:
            if now >= self._opened_at + config.ping_timeout:
                self.close(f"not registered after {config.ping_timeout:g}s")
            return
        if self._ping_sent is not None:
            if now >= self._ping_sent + config.ping_timeout:
                self.close(f"no reply to PING for {config.ping_timeout:g}s")
                return
        elif now >= self.last_received + config.ping_idle:
            self._pings += 1
            self.send("PING", f"fireclaw-{self._pings}")
            self._ping_sent = now
        if self._next_regain is not None and now >= self._next_regain:
            self.send("NICK", config.nick)
            self._next_regain = now + config.nick_regain

    # -- input ---------------------------------------------------------------------

    def receive(self, data: bytes | bytearray, now: float) -> list[Event]:
        """Feed bytes from the server; returns the events they make."""
        if data:
            self.last_received = now
            self._ping_sent = None
        events: list[Event] = []
        for line in self.reader.feed(data):
            if self.state is RegState.CLOSED:
                break
            events.extend(self.handle(line, now))
        return events

    def handle(self, line: Line, now: float) -> list[Event]:
        """One tokenised line from the server."""
        params = line.params
        command = line.command
        source = _nick_of(line.source)
        match command:
            case "PING":
                self.send("PONG", params[-1] if params else "")
            case "ERROR":
                self.close("server said: " + (clean(params[-1]) if params else "ERROR"))
            case "001":
                return self._welcome(params, now)
            case "005":
                self._isupport(params[1:-1])
            case "CAP" if len(params) >= 3:
                self._cap(params)
            case "AUTHENTICATE" if params and params[0] == "+":
                self._authenticate()
            case "903" | "907":
                if self.state is RegState.AUTHENTICATING:
                    self._cap_end()
            case _ if command in _SASL_FAILED:
                if self.state is RegState.AUTHENTICATING:
                    log.warning("SASL login failed (%s); continuing without", command)
                    self._cap_end()
            case _ if command in _NICK_REFUSED:
                refused = params[1] if len(params) >= 3 else self.nick
                if not self.registered and self.state is not RegState.CLOSED:
                    self._next_nick(refused, command)
            case "464":
                self.close("the server password was refused")
            case "NICK" if params and source:
                return self._nick(source, params[0], now)
            case "QUIT" if source:
                self._regain_if(source)
                return [UserQuit(nick=source)]
            case "JOIN" if params and source:
                return self._join(line, params[0])
            case "PART" if params and source:
                if self.fold(source) != self.fold(self.nick):
                    return [UserParted(nick=source, channel=params[0])]
                self.joined.pop(self.fold(params[0]), None)
            case "353" if len(params) >= 4:
                nicks = (n.lstrip(_MEMBER_PREFIXES) for n in params[3].split())
                return [Names(channel=params[2], nicks=tuple(n for n in nicks if n))]
            case "311" | "313" | "330" | "318" if len(params) >= 2:
                return self._whois_line(command, params)
            case "KICK" if len(params) >= 2:
                return self._kick(source or "", params)
            case "INVITE" if len(params) >= 2 and source:
                if is_channel(params[1], self.chantypes):
                    return [Invited(channel=params[1], by=source)]
            case "PRIVMSG" if len(params) >= 2 and source:
                return self._privmsg(line, params[0], params[1])
        return []

    def _whois_line(self, command: str, params: list[str]) -> list[Event]:
        """Gather one WHOIS answer; the 318 that ends it makes the event."""
        nick = params[1]
        key = self.fold(nick)
        if command == "318":
            return [self._whois.pop(key, WhoisReply(nick=nick))]
        draft = self._whois.pop(key, None) or WhoisReply(nick=nick)
        if command == "311" and len(params) >= 4:
            draft = msgspec.structs.replace(draft, user=params[2], host=params[3])
        elif command == "313":
            draft = msgspec.structs.replace(draft, operator=True)
        elif command == "330" and len(params) >= 3:
            draft = msgspec.structs.replace(draft, account=params[2])
        if len(self._whois) >= MAX_WHOIS:
            self._whois.pop(next(iter(self._whois)))
        self._whois[key] = draft
        return []

    def _welcome(self, params: list[str], now: float) -> list[Event]:
        if not self._may(RegEvent.WELCOME):
            return []
        if params and params[0] not in ("", "*"):
            self.nick = params[0]
        self._outgoing.extend(self.join_lines(self._rejoin))
        if self.fold(self.nick) != self.fold(self.config.nick):
            self._next_regain = now + self.config.nick_regain
        return [Registered(nick=self.nick)]

    def _isupport(self, tokens: list[str]) -> None:
        for token in tokens:
            key, _, value = token.partition("=")
            match key.upper():
                case "NICKLEN" if value.isdigit() and 0 < int(value) <= 512:
                    self.nicklen = int(value)
                case "CHANTYPES" if value:
                    self.chantypes = value
                case "CASEMAPPING" if value:
                    self.casemapping = value.lower()

    def _cap(self, params: list[str]) -> None:
        if self.state is not RegState.NEGOTIATING:
            return
        subcommand = params[1].upper()
        if subcommand == "LS":
            more = len(params) >= 4 and params[2] == "*"
            self._caps.extend(params[-1].split())
            if more:
                return
            offered = {}
            for cap in self._caps:
                name, _, value = cap.partition("=")
                offered[name.lower()] = value
            if "sasl" in offered and (not offered["sasl"] or "PLAIN" in offered["sasl"].split(",")):
                self.send("CAP", "REQ", "sasl")
            else:
                log.warning("the server offers no SASL PLAIN; registering without")
                self._cap_end()
        elif subcommand == "ACK" and "sasl" in params[-1].lower().split():
            self.send("AUTHENTICATE", "PLAIN")
            self._fire(RegEvent.SASL_ACK)
        elif subcommand == "NAK":
            log.warning("the server refused the sasl capability; registering without")
            self._cap_end()

    def _authenticate(self) -> None:
        if self.state is not RegState.AUTHENTICATING:
            return
        user = self.config.sasl_username or ""
        password = self.config.sasl_password or ""
        payload = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
        for start in range(0, len(payload), SASL_CHUNK):
            self.send("AUTHENTICATE", payload[start : start + SASL_CHUNK])
        if len(payload) % SASL_CHUNK == 0:  # a full last chunk (or none) needs a terminator
            self.send("AUTHENTICATE", "+")

    def _nick(self, source: str, new: str, now: float) -> list[Event]:
        if self.fold(source) != self.fold(self.nick):
            self._regain_if(source)
            return [UserRenamed(old=source, new=new)]
        old, self.nick = self.nick, new
        if self.fold(new) == self.fold(self.config.nick):
            self._next_regain = None
        elif self.registered and self._next_regain is None:
            self._next_regain = now + self.config.nick_regain
        return [NickChanged(old=old, new=new)]

    def _regain_if(self, gone: str) -> None:
        """``gone`` quit or changed nick: if it held our configured nick, take it."""
        wanted = self.config.nick
        if (
            self.registered
            and self.fold(gone) == self.fold(wanted)
            and self.fold(self.nick) != self.fold(wanted)
        ):
            self.send("NICK", wanted)

    def _join(self, line: Line, channel: str) -> list[Event]:
        source = _nick_of(line.source)
        if source is None:
            return []
        mask = hostmask(line.source or "")
        if self.fold(source) != self.fold(self.nick):
            return [
                UserJoined(
                    nick=source, user=mask.username or "", host=mask.hostname or "", channel=channel
                )
            ]
        if mask.hostname:
            self._host = mask.hostname
        if mask.username:
            self._user = mask.username.lstrip("~")
        self.joined[self.fold(channel)] = channel
        return [Joined(channel=channel)]

    def _kick(self, by: str, params: list[str]) -> list[Event]:
        channel, victim = params[0], params[1]
        if self.fold(victim) != self.fold(self.nick):
            return [UserParted(nick=victim, channel=channel)]
        self.joined.pop(self.fold(channel), None)
        reason = params[2] if len(params) >= 3 else ""
        return [Kicked(channel=channel, by=by, reason=reason)]

    def _privmsg(self, line: Line, target: str, text: str) -> list[Event]:
        action = False
        if text.startswith("\x01"):
            verb, _, rest = text.strip("\x01").partition(" ")
            if verb.upper() != "ACTION":
                return []  # other CTCP queries get no answer: nothing to leak, nothing to flood
            text, action = rest, True
        mask = hostmask(line.source or "")
        # STATUSMSG: "@#chan" reaches the channel's operators; still a channel message.
        private = not any(
            name[:1] != "" and name[0] in self.chantypes
            for name in (target, target[1:] if target[:1] in ("@", "+", "%", "~") else "")
        )
        return [
            Message(
                source=mask.nickname,
                user=mask.username or "",
                host=mask.hostname or "",
                target=target,
                text=text,
                private=private,
                action=action,
            )
        ]


def _nick_of(source: str | None) -> str | None:
    if not source:
        return None
    return source.partition("!")[0].partition("@")[0] or None
