"""IRC on the wire, sans-I/O: lines out (``encode``, ``paginate``), lines in
(``LineReader``), names compared as servers compare them (``casefold``).

Hardening, once, at the edge (the server and every person on it are untrusted):

* ``LineReader`` splits incoming bytes itself on CR and LF, drops blank lines,
  discards lines longer than ``MAX_INCOMING`` bytes, decodes UTF-8 with
  replacement and hands each line to ``irctokens.tokenise`` on its own: a line
  irctokens rejects is counted and dropped and never affects the next one.
* ``encode`` builds every outgoing line: CR, LF and NUL are removed from every
  parameter, a parameter that is empty, holds a space or starts with ``:`` is
  only allowed last, and the line is cut to ``MAX_LINE`` bytes with its CRLF,
  never inside a UTF-8 character. ``paginate`` splits long text into pieces.
* ``loggable`` is what a log may show of a line: never a password.

The session that uses these is ``irc_session``. This module imports only the
standard library and irctokens: it ships inside VM images.
"""

from __future__ import annotations

import re
from typing import Final

from irctokens.line import Line, tokenise

__all__ = [
    "MAX_INCOMING",
    "MAX_LINE",
    "InvalidParameter",
    "IrcError",
    "LineReader",
    "alternate_nick",
    "casefold",
    "clean",
    "encode",
    "is_channel",
    "loggable",
    "message_budget",
    "paginate",
    "privmsg",
]

#: Longest line on the wire, in bytes, including the CRLF (RFC 1459 and 2812).
MAX_LINE: Final = 512
#: Longest incoming line accepted, in bytes (IRCv3 message tags make lines longer).
MAX_INCOMING: Final = 8191
_BODY: Final = MAX_LINE - 2
_CLEAN: Final = str.maketrans("", "", "\r\n\x00")
_COMMAND: Final = re.compile(r"[A-Za-z]+|[0-9]{3}")
_NEWLINES: Final = re.compile(r"\r\n|\r|\n")
_CHANNEL_BAD: Final = re.compile(r"[\s,\x00\x07]")
_RFC1459: Final = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ[]\\~", "abcdefghijklmnopqrstuvwxyz{}|^")
_STRICT: Final = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ[]\\", "abcdefghijklmnopqrstuvwxyz{}|")
_ASCII: Final = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_CASEMAPS: Final = {"rfc1459": _RFC1459, "strict-rfc1459": _STRICT, "ascii": _ASCII}
# Commands whose last parameter is free text: always sent as a trailing ":" parameter.
_TEXT_COMMANDS: Final = frozenset({"PRIVMSG", "NOTICE", "QUIT", "PART", "KICK", "TOPIC", "USER"})


class IrcError(Exception):
    """Base of the IRC client's errors."""


class InvalidParameter(IrcError, ValueError):
    """A command or parameter that cannot be sent; ``str()`` is one line."""


# --- text on the wire ----------------------------------------------------------------


def clean(text: str) -> str:
    """``text`` without CR, LF and NUL (every other character is kept)."""
    return text.translate(_CLEAN)


def _cut(data: bytes, limit: int) -> bytes:
    """The longest prefix of UTF-8 ``data`` within ``limit`` bytes that ends on a character."""
    if len(data) <= limit:
        return data
    end = limit
    while end > 0 and data[end] & 0xC0 == 0x80:
        end -= 1
    return data[:end]


def encode(command: str, *params: str) -> bytes:
    """One wire line, CRLF included, at most ``MAX_LINE`` bytes.

    Every parameter is cleaned (CR, LF, NUL removed). Only the last may be
    empty, hold spaces or start with ``:`` (free text, such as PRIVMSG's, is
    always sent as that last, trailing parameter); an earlier one like that raises
    ``InvalidParameter``, as does a command that is not letters or 3 digits.
    An over-long line loses the end of its last parameter, on a character
    boundary.
    """
    if not _COMMAND.fullmatch(command):
        raise InvalidParameter(f"invalid IRC command {command!r}")
    command = command.upper()
    text = command in _TEXT_COMMANDS
    parts = [command]
    for index, param in enumerate(params, 1):
        param = clean(param)
        awkward = not param or " " in param or param.startswith(":")
        if index < len(params):
            if awkward:
                raise InvalidParameter(
                    f"{command} parameter {index} {param!r}: empty, a space or a leading ':'"
                )
        elif awkward or text:
            param = ":" + param
        parts.append(param)
    data = " ".join(parts).encode("utf-8", "replace")
    if len(data) > _BODY:
        head = len(" ".join(parts[:-1]).encode("utf-8", "replace")) + 2
        if not params or head >= _BODY:
            raise InvalidParameter(f"{command} line is too long before its last parameter")
        data = _cut(data, _BODY)
    return data + b"\r\n"


def privmsg(target: str, text: str) -> bytes:
    """One PRIVMSG line: ``text`` cleaned and cut to fit, never a second command."""
    return encode("PRIVMSG", target, text)


def paginate(text: str, budget: int) -> list[str]:
    """``text`` as pieces of at most ``budget`` UTF-8 bytes each.

    Lines are split on CR/LF first; blank lines are dropped and NULs removed.
    A line longer than ``budget`` is split at the last space in the second
    half of the piece, else at the budget, never inside a character.
    """
    if budget < 4:
        raise ValueError(f"a page budget of {budget} bytes cannot hold every character")
    pages: list[str] = []
    for line in _NEWLINES.split(text):
        line = line.replace("\x00", "")
        while len(encoded := line.encode("utf-8", "replace")) > budget:
            piece = _cut(encoded, budget).decode("utf-8", "replace")
            space = piece.rfind(" ")
            if space > len(piece) // 2:
                piece, line = piece[:space], line[space + 1 :]
            else:
                line = line[len(piece) :]
            if piece.strip():
                pages.append(piece)
        if line.strip():
            pages.append(line)
    return pages


def message_budget(*, nick: str, username: str, host: str, command: str, target: str) -> int:
    """Bytes of text that fit in one ``command`` to ``target`` as the server relays it.

    Others receive ``:nick!user@host COMMAND target :text``, which must also fit
    in ``MAX_LINE``; the server may prefix the username with ``~``.
    """
    relayed = f":{nick}!~{username}@{host} {command} {target} :"
    return max(4, _BODY - len(relayed.encode("utf-8", "replace")))


def is_channel(name: str, chantypes: str = "#&+!") -> bool:
    """True for a name that can be JOINed: a channel prefix, no blanks, commas, BEL or NUL."""
    return 1 < len(name) <= 64 and name[0] in chantypes and not _CHANNEL_BAD.search(name)


def casefold(name: str, casemapping: str = "rfc1459") -> str:
    """``name`` folded the way the server compares nicks and channels."""
    return name.translate(_CASEMAPS.get(casemapping, _RFC1459))


def alternate_nick(nick: str, attempt: int, nicklen: int) -> str:
    """The ``attempt``-th nick to try instead of ``nick``: nick_, nick__, nick1, nick2, ...

    Cut to ``nicklen`` characters by shortening ``nick``, never the suffix.
    """
    if attempt <= 0:
        return nick[:nicklen]
    suffix = "_" * attempt if attempt <= 2 else str(attempt - 2)
    return nick[: max(1, nicklen - len(suffix))] + suffix


# --- incoming lines -----------------------------------------------------------------


class LineReader:
    """Bytes in, tokenised lines out; never raises for anything the peer sends.

    ``dropped`` counts lines that were too long or that irctokens rejected.
    """

    def __init__(self, max_line: int = MAX_INCOMING) -> None:
        self.max_line = max_line
        self.dropped = 0
        self._partial = bytearray()
        self._discarding = False

    def feed(self, data: bytes | bytearray) -> list[Line]:
        pieces = bytes(data).replace(b"\r", b"\n").split(b"\n")
        lines: list[Line] = []
        for piece in pieces[:-1]:
            raw = self._complete(piece)
            if raw is not None and (line := self._tokenise(raw)) is not None:
                lines.append(line)
        self._extend(pieces[-1])
        return lines

    def _complete(self, piece: bytes) -> bytes | None:
        if self._discarding:  # the tail of a line already counted as too long
            self._discarding = False
            return None
        raw = bytes(self._partial) + piece
        self._partial.clear()
        if len(raw) > self.max_line:
            self.dropped += 1
            return None
        return raw

    def _extend(self, piece: bytes) -> None:
        if self._discarding:
            return
        self._partial += piece
        if len(self._partial) > self.max_line:
            self._partial.clear()
            self._discarding = True
            self.dropped += 1

    def _tokenise(self, raw: bytes) -> Line | None:
        text = raw.decode("utf-8", "replace")
        if not text.strip():
            return None
        try:
            return tokenise(text)
        except Exception:  # irctokens raises assorted errors on malformed lines
            self.dropped += 1
            return None


#: Commands whose parameters carry a secret: a log shows them without it.
SECRET_COMMANDS: Final = frozenset({b"PASS", b"OPER", b"AUTHENTICATE"})


def loggable(line: bytes) -> bytes:
    """``line`` as it may be logged: the parameters of a line that carries a
    password (PASS, OPER, a SASL payload) are replaced by ``<redacted>``."""
    command, _, rest = line.partition(b" ")
    if command.upper() not in SECRET_COMMANDS or rest.rstrip(b"\r\n") in (b"PLAIN", b"+"):
        return line
    return command + b" <redacted>\r\n"
