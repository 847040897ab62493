"""What an IRC session takes and gives out: its config and its events.

``IrcConfig`` is everything one client needs, checked at construction
(``ValueError`` with one line naming the field). The events are what
``IrcSession.receive`` and ``tick`` return and ``IrcClient.events()`` yields:
frozen msgspec Structs, dispatched with ``match`` on the ``Event`` union.

This module imports only the standard library, msgspec and its siblings: it
ships inside VM images.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Final

import msgspec
from msgspec import Meta

from .irc_wire import is_channel

__all__ = [
    "Disconnected",
    "Event",
    "Invited",
    "IrcConfig",
    "Joined",
    "Kicked",
    "Message",
    "Names",
    "NickChanged",
    "Registered",
    "Seconds",
    "UserJoined",
    "UserParted",
    "UserQuit",
    "UserRenamed",
    "WhoisReply",
]

_NICK_START: Final = r"A-Za-z\[\]\\`_^{|}"
_NICK: Final = re.compile(rf"[{_NICK_START}][{_NICK_START}0-9\-]*")
_USERNAME: Final = re.compile(r"[^\s@!:\x00]+")


# --- configuration ------------------------------------------------------------------


Seconds = Annotated[float, Meta(gt=0, le=86400)]


class IrcConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything one client needs. Checked at construction (``ValueError``)."""

    host: Annotated[str, Meta(min_length=1, max_length=255)]
    port: Annotated[int, Meta(ge=1, le=65535)]
    nick: Annotated[str, Meta(min_length=1, max_length=64)]
    username: Annotated[str, Meta(min_length=1, max_length=64)] = "fireclaw"
    realname: Annotated[str, Meta(max_length=256)] = "fireclaw-swarm"
    password: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    channels: tuple[str, ...] = ()
    ping_idle: Seconds = 60.0
    ping_timeout: Seconds = 120.0
    send_rate: Annotated[float, Meta(gt=0, le=1000)] = 2.0
    send_burst: Annotated[int, Meta(ge=1, le=1000)] = 5
    reconnect_base: Seconds = 1.0
    reconnect_max: Seconds = 60.0
    #: With an alternate nick, try the configured one again this often.
    nick_regain: Seconds = 30.0

    def __post_init__(self) -> None:
        if not _NICK.fullmatch(self.nick):
            raise ValueError(f"invalid nick {self.nick!r}: letters, digits and -[]\\`_^{{|}}")
        if not _USERNAME.fullmatch(self.username):
            raise ValueError(f"invalid username {self.username!r}: no blanks, '@', '!' or ':'")
        for channel in self.channels:
            if not is_channel(channel):
                raise ValueError(f"invalid channel {channel!r}: #name without blanks or commas")
        if (self.sasl_username is None) != (self.sasl_password is None):
            raise ValueError("sasl_username and sasl_password go together")
        for name in ("ping_idle", "ping_timeout", "send_rate", "reconnect_base", "reconnect_max"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, not {value!r}")
        if self.send_burst < 1:
            raise ValueError(f"send_burst must be at least 1, not {self.send_burst}")
        if self.reconnect_max < self.reconnect_base:
            raise ValueError("reconnect_max must not be below reconnect_base")


# --- events -------------------------------------------------------------------------


class Registered(msgspec.Struct, frozen=True, kw_only=True):
    """The server accepted us (001), after SASL if configured. ``nick`` may be an alternate."""

    nick: str


class Message(msgspec.Struct, frozen=True, kw_only=True):
    """A PRIVMSG to a channel we are in or to us (``private``). CTCP ACTION is ``action``."""

    source: str
    user: str
    host: str
    target: str
    text: str
    private: bool
    action: bool = False


class Invited(msgspec.Struct, frozen=True, kw_only=True):
    channel: str
    by: str


class Joined(msgspec.Struct, frozen=True, kw_only=True):
    """Our own JOIN, confirmed by the server."""

    channel: str


class Kicked(msgspec.Struct, frozen=True, kw_only=True):
    """We were kicked; the channel is no longer rejoined unless ``join`` is called again."""

    channel: str
    by: str
    reason: str


class NickChanged(msgspec.Struct, frozen=True, kw_only=True):
    """Our own nick changed (a regained nick, or a server-forced change)."""

    old: str
    new: str


class Disconnected(msgspec.Struct, frozen=True, kw_only=True):
    """The connection ended; the client reconnects on its own."""

    reason: str


class UserJoined(msgspec.Struct, frozen=True, kw_only=True):
    """Someone else joined a channel we are in."""

    nick: str
    user: str
    host: str
    channel: str


class UserParted(msgspec.Struct, frozen=True, kw_only=True):
    """Someone else left a channel we are in (PART, or KICKed by anyone)."""

    nick: str
    channel: str


class UserQuit(msgspec.Struct, frozen=True, kw_only=True):
    """Someone who shares a channel with us left the server."""

    nick: str


class UserRenamed(msgspec.Struct, frozen=True, kw_only=True):
    """Someone who shares a channel with us changed nick."""

    old: str
    new: str


class Names(msgspec.Struct, frozen=True, kw_only=True):
    """One NAMES line (353): members of ``channel``, prefixes such as ``@`` removed."""

    channel: str
    nicks: tuple[str, ...]


class WhoisReply(msgspec.Struct, frozen=True, kw_only=True):
    """The end of a WHOIS answer (318) and what it said about ``nick``.

    ``user`` and ``host`` are None when the server knows no such nick (401);
    ``operator`` is RPL_WHOISOPERATOR (313), ``account`` RPL_WHOISACCOUNT (330).
    """

    nick: str
    user: str | None = None
    host: str | None = None
    operator: bool = False
    account: str | None = None


Event = (
    Registered
    | Message
    | Invited
    | Joined
    | Kicked
    | NickChanged
    | Disconnected
    | UserJoined
    | UserParted
    | UserQuit
    | UserRenamed
    | Names
    | WhoisReply
)
