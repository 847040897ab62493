"""The listener's rules of entry (supervisor/webauth.py), without a socket or a clock,
and the event-loop lag probe under trio's MockClock."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from fireclaw.config import ConfigError, parse_config
from fireclaw.supervisor.metrics import LoopLag
from fireclaw.supervisor.webapp import allowed_hosts_for
from fireclaw.supervisor.webauth import (
    LOGIN_FAILURES_BURST,
    LOGIN_FAILURES_PER_MINUTE,
    MAX_SESSIONS,
    SESSION_TTL,
    Auth,
    same_origin,
)

READ = "r" * 32
OPERATE = "o" * 32
OWN = "http://127.0.0.1:8470"


def auth(*, loopback: bool = False) -> Auth:
    return Auth([(READ, "read"), (OPERATE, "operate")], allow_loopback=loopback)


def test_a_bearer_token_is_compared_whole() -> None:
    a = auth()
    who = a.authenticate(authorization=f"Bearer {OPERATE}", cookie=None, peer="10.0.0.1", now=0)
    assert who is not None and (who.access, who.via, who.label) == ("operate", "token", "token#1")
    for wrong in (OPERATE[:-1], OPERATE + "o", "", READ.upper(), "x" * 10_000):
        assert (
            a.authenticate(authorization=f"Bearer {wrong}", cookie=None, peer=None, now=0) is None
        )
    assert a.authenticate(authorization=f"Basic {READ}", cookie=None, peer=None, now=0) is None


def test_loopback_reads_without_a_token_only_when_allowed() -> None:
    assert auth().authenticate(authorization=None, cookie=None, peer="127.0.0.1", now=0) is None
    a = auth(loopback=True)
    for peer in ("127.0.0.1", "::1", "127.8.9.10"):
        who = a.authenticate(authorization=None, cookie=None, peer=peer, now=0)
        assert who is not None and who.access == "read" and not who.may_act
    assert a.authenticate(authorization=None, cookie=None, peer="192.0.2.1", now=0) is None
    # A wrong token from loopback is refused, not let in as loopback.
    assert a.authenticate(authorization="Bearer nope", cookie=None, peer="::1", now=0) is None


def test_a_session_lasts_its_ttl_and_no_longer() -> None:
    a = auth()
    assert a.login("wrong", now=0) is None
    made = a.login(READ, now=100.0)
    assert made is not None
    sid, session = made
    assert READ not in sid and session.csrf != sid
    at = 100.0 + SESSION_TTL
    assert a.authenticate(authorization=None, cookie=sid, peer=None, now=at - 1) is not None
    assert a.authenticate(authorization=None, cookie=sid, peer=None, now=at) is None
    assert a.authenticate(authorization=None, cookie=sid, peer=None, now=0) is None  # gone


def test_sessions_are_bounded_oldest_first() -> None:
    a = auth()
    first = a.login(READ, now=0)
    assert first is not None
    for n in range(MAX_SESSIONS):
        assert a.login(READ, now=float(n)) is not None
    assert a.session(first[0], now=1.0) is None


def test_acting_needs_an_operator_the_csrf_token_and_no_foreign_origin() -> None:
    a = auth()
    made = a.login(OPERATE, now=0)
    assert made is not None
    sid, session = made
    who = a.authenticate(authorization=None, cookie=sid, peer=None, now=1)
    assert who is not None
    assert a.may_post(who, csrf=session.csrf, origin=OWN, own_origin=OWN) is None
    assert a.may_post(who, csrf=session.csrf, origin=None, own_origin=OWN) is None
    assert a.may_post(who, csrf=None, origin=OWN, own_origin=OWN) == "missing or wrong CSRF token"
    assert a.may_post(who, csrf="x", origin=OWN, own_origin=OWN) == "missing or wrong CSRF token"
    assert (
        a.may_post(who, csrf=session.csrf, origin="http://evil.example", own_origin=OWN)
        == "cross-site request refused"
    )
    reader = a.authenticate(authorization=f"Bearer {READ}", cookie=None, peer=None, now=1)
    assert reader is not None
    assert a.may_post(reader, csrf=None, origin=None, own_origin=OWN) == "token access is read-only"
    # A bearer token is not sent by a browser on its own: no CSRF token needed.
    oper = a.authenticate(authorization=f"Bearer {OPERATE}", cookie=None, peer=None, now=1)
    assert oper is not None and a.may_post(oper, csrf=None, origin=None, own_origin=OWN) is None


def test_origins_and_hosts() -> None:
    assert same_origin("HTTP://127.0.0.1:8470/", OWN)
    assert not same_origin("null", OWN) and not same_origin("http://127.0.0.1:8471", OWN)
    assert allowed_hosts_for("127.0.0.1", 8470) == {"127.0.0.1:8470", "localhost:8470"}
    assert allowed_hosts_for("::1", 80) == {"[::1]:80", "localhost:80"}
    assert allowed_hosts_for("0.0.0.0", 80) is None


def test_a_listener_with_no_way_in_is_refused() -> None:
    with pytest.raises(ValueError, match="needs a token or loopback access"):
        Auth([], allow_loopback=False)


@pytest.mark.parametrize(
    ("section", "line"),
    [
        ("{listen: localhost:8470}", "http.listen: 'localhost' is not an IP address"),
        ("{listen: '::1:8470'}", "http.listen: an IPv6 address goes in brackets"),
        ("{listen: 127.0.0.1:99999}", "http.listen: port must be a number from 1 to 65535"),
        ("{tokens: [{file: t, access: admin}]}", "http.tokens[0].access: expected one of"),
        ("{token: abc}", "http.token: unknown field"),
    ],
)
def test_a_bad_http_section_is_one_line(section: str, line: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(f"version: 1\nhttp: {section}\nroles: {{}}\n", path="/srv/swarm.yaml")
    assert str(caught.value).startswith(f"/srv/swarm.yaml: {line}")
    assert "\n" not in str(caught.value)


def test_token_files_are_anchored_beside_swarm_yaml() -> None:
    config = parse_config(
        "version: 1\nhttp: {listen: '[::1]:0', tokens: [{file: t.token, access: operate}]}\n"
        "roles: {}\n",
        path="/srv/fleet/swarm.yaml",
    )
    assert config.http is not None and config.http.address == ("::1", 0)
    assert config.http.tokens[0].file == "/srv/fleet/t.token"
    assert parse_config("version: 1\nroles: {}\n", path="/srv/swarm.yaml").http is None


async def test_loop_lag_is_how_late_a_sleeper_wakes(autojump_clock: trio.testing.MockClock) -> None:
    lag = LoopLag()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lag.run)
        await trio.sleep(LoopLag.INTERVAL * 2.5)
        assert (lag.last, lag.worst) == (0.0, 0.0)  # nothing held the loop
        # Hold the loop past the probe's wake-up: the clock jumps, nothing else runs.
        autojump_clock.jump(1.0)
        await trio.sleep(LoopLag.INTERVAL * 2)
        assert lag.worst == pytest.approx(1.0 - LoopLag.INTERVAL * 0.5)
        nursery.cancel_scope.cancel()


def test_failed_logins_are_slowed_after_a_burst() -> None:
    a = auth()
    for _ in range(LOGIN_FAILURES_BURST):
        assert a.login_wait(now=5.0) == 0.0
        assert a.login("wrong", now=5.0) is None
    assert a.login_wait(now=5.0) == pytest.approx(60.0 / LOGIN_FAILURES_PER_MINUTE)
    assert a.login_wait(now=5.0 + 60.0 / LOGIN_FAILURES_PER_MINUTE) == 0.0
    # Logging in with a right token costs nothing.
    for _ in range(3 * LOGIN_FAILURES_BURST):
        assert a.login(READ, now=100.0) is not None
    assert a.login_wait(now=100.0) == 0.0
