"""Who may use the HTTP listener: bearer tokens, login sessions and CSRF tokens.

Nothing here does I/O or reads a clock: the caller passes ``now`` and the
request's facts in, and gets a ``Principal`` (or ``None``) out, so every rule
is tested without a socket.

A request is let in by, in this order:

1. ``Authorization: Bearer <token>``: for monitors and scripts. The token is
   compared with every configured one by ``hmac.compare_digest`` (no early
   exit, so timing tells nothing about which or how much matched).
2. The session cookie a login set: for people. The login form takes a token
   once and answers with a random session id (``HttpOnly``,
   ``SameSite=Strict``); the token itself never travels again, and never in a
   URL. A session lives ``SESSION_TTL`` seconds.
3. A loopback peer, only when the config says ``allow_loopback_without_token``:
   read access.

Acting (any method but GET/HEAD) also needs, for a session, its CSRF token in
the ``X-CSRF-Token`` header (a page of ours reads it from a meta tag; another
site cannot) and no foreign ``Origin``. A bearer token is not ambient (a
browser never adds it by itself), so it needs neither.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from collections import OrderedDict
from typing import Final, Literal

import msgspec
from fireclaw.config.http import Access
from fireclaw.guest_daemon.pacing import TokenBucket

__all__ = [
    "COOKIE",
    "CSRF_HEADER",
    "LOGIN_FAILURES_BURST",
    "LOGIN_FAILURES_PER_MINUTE",
    "MAX_SESSIONS",
    "SESSION_TTL",
    "Auth",
    "Principal",
    "Session",
    "is_loopback",
    "same_origin",
]

#: The session cookie's name.
COOKIE: Final = "fireclaw_session"
#: The header a page sends its CSRF token in.
CSRF_HEADER: Final = "x-csrf-token"
#: How long a login lasts, in seconds.
SESSION_TTL: Final = 12 * 3600.0
#: Sessions kept at once; the oldest goes first, so logins cannot fill memory.
MAX_SESSIONS: Final = 256
#: Longest token accepted on the wire; a longer one is refused before comparing.
MAX_TOKEN_CHARS: Final = 512
#: Failed logins allowed at once, and then per minute: guessing is slowed to a crawl
#: while a person who mistyped can try again at once.
LOGIN_FAILURES_BURST: Final = 10
LOGIN_FAILURES_PER_MINUTE: Final = 6.0


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """Who a request comes from: how it proved it, and what it may do."""

    access: Access
    via: Literal["token", "session", "loopback"]
    #: Which token (its index in the config) or session; never the secret itself.
    label: str
    csrf: str | None = None

    @property
    def may_act(self) -> bool:
        return self.access == "operate"


class Session(msgspec.Struct, kw_only=True):
    access: Access
    label: str
    csrf: str
    expires: float


class Auth:
    """The tokens a listener accepts and the sessions it has handed out."""

    def __init__(self, tokens: list[tuple[str, Access]], *, allow_loopback: bool = False) -> None:
        if not tokens and not allow_loopback:
            raise ValueError("an HTTP listener needs a token or loopback access")
        self._tokens = [(t.encode(), access) for t, access in tokens]
        self.allow_loopback = allow_loopback
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._failures: TokenBucket | None = None

    def check_token(self, presented: str) -> tuple[Access, str] | None:
        """(access, label) of the configured token equal to ``presented``, if any."""
        if not presented or len(presented) > MAX_TOKEN_CHARS:
            return None
        given = presented.encode("utf-8", "replace")
        found: tuple[Access, str] | None = None
        for n, (token, access) in enumerate(self._tokens):
            if hmac.compare_digest(given, token) and found is None:
                found = (access, f"token#{n}")
        return found

    def login_wait(self, now: float) -> float:
        """Seconds until a login may be tried: 0 unless too many have failed lately."""
        return 0.0 if self._failures is None else self._failures.delay(now)

    def login(self, presented: str, now: float) -> tuple[str, Session] | None:
        """A new session for a valid token: (session id, session); None if invalid.
        Ask ``login_wait`` first: a failure here counts against the next tries."""
        found = self.check_token(presented)
        if found is None:
            if self._failures is None:
                rate = LOGIN_FAILURES_PER_MINUTE / 60.0
                self._failures = TokenBucket(rate, LOGIN_FAILURES_BURST, now)
            self._failures.take(now)
            return None
        access, label = found
        self._expire(now)
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.popitem(last=False)
        sid = secrets.token_urlsafe(32)
        session = Session(
            access=access, label=label, csrf=secrets.token_urlsafe(32), expires=now + SESSION_TTL
        )
        self._sessions[sid] = session
        return sid, session

    def logout(self, sid: str) -> None:
        self._sessions.pop(sid, None)

    def session(self, sid: str, now: float) -> Session | None:
        if not sid or len(sid) > MAX_TOKEN_CHARS:
            return None
        session = self._sessions.get(sid)
        if session is None:
            return None
        if session.expires <= now:
            del self._sessions[sid]
            return None
        return session

    def authenticate(
        self,
        *,
        authorization: str | None,
        cookie: str | None,
        peer: str | None,
        now: float,
    ) -> Principal | None:
        """Who sent a request with these headers from ``peer`` (an IP address)."""
        if authorization is not None:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() != "bearer":
                return None
            found = self.check_token(value.strip())
            if found is None:
                return None  # a wrong token is refused, not downgraded to loopback
            return Principal(access=found[0], via="token", label=found[1])
        if cookie is not None:
            session = self.session(cookie, now)
            if session is not None:
                return Principal(
                    access=session.access, via="session", label=session.label, csrf=session.csrf
                )
        if self.allow_loopback and peer is not None and is_loopback(peer):
            return Principal(access="read", via="loopback", label="loopback")
        return None

    def may_post(
        self, who: Principal, *, csrf: str | None, origin: str | None, own_origin: str
    ) -> str | None:
        """Why ``who`` may not send a state-changing request; None when it may."""
        if not who.may_act:
            return f"{who.via} access is read-only"
        if origin is not None and not same_origin(origin, own_origin):
            return "cross-site request refused"
        if who.via == "session":
            if (
                who.csrf is None
                or csrf is None
                or not hmac.compare_digest(csrf.encode("utf-8", "replace"), who.csrf.encode())
            ):
                return "missing or wrong CSRF token"
        return None

    def _expire(self, now: float) -> None:
        for sid in [sid for sid, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[sid]


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def same_origin(origin: str, own_origin: str) -> bool:
    """``Origin`` header equals ours (scheme://host:port), ``null`` never does."""
    return origin.rstrip("/").lower() == own_origin.rstrip("/").lower()
