"""The shared IRC client: the sans-I/O core line by line, hypothesis against
hostile input, the trio adapter's timing under MockClock with an in-memory
server, and the whole client against a real ngircd with a person on the other
side played by the independent ``irc`` library.
"""

from __future__ import annotations

import base64
import errno
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import irctokens
import pytest
import trio
import trio.testing
from fireclaw.guest_daemon import irc as irc_module
from fireclaw.guest_daemon import irc_wire as irc_wire_module
from fireclaw.guest_daemon.irc import IrcClient
from fireclaw.guest_daemon.irc_events import (
    Disconnected,
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
from fireclaw.guest_daemon.irc_registration import TRANSITIONS, IllegalTransition, RegState
from fireclaw.guest_daemon.irc_session import IrcSession
from fireclaw.guest_daemon.irc_wire import (
    MAX_LINE,
    InvalidParameter,
    LineReader,
    alternate_nick,
    clean,
    encode,
    paginate,
    privmsg,
)
from fireclaw.guest_daemon.pacing import TokenBucket
from hypothesis import given, settings
from hypothesis import strategies as st
from ircd import NGIRCD, Ircd, ircd_server
from ircperson import person

E = TypeVar("E", bound=Event)
WAIT = 20.0  # real-server waits: generous for a busy machine

needs_ngircd = pytest.mark.skipif(NGIRCD is None, reason="ngircd is not installed")


def config(**overrides: Any) -> IrcConfig:
    values: dict[str, Any] = {"host": "irc.test", "port": 6667, "nick": "bot"}
    values.update(overrides)
    return IrcConfig(**values)


def sent(session: IrcSession) -> list[str]:
    return [line.decode() for line in session.data_to_send()]


def feed(session: IrcSession, *lines: str, now: float = 0.0) -> list[Event]:
    return session.receive("".join(line + "\r\n" for line in lines).encode(), now)


def registered(nick: str = "bot", **overrides: Any) -> IrcSession:
    session = IrcSession(config(nick=nick, **overrides), now=0.0)
    session.open()
    session.data_to_send()
    feed(session, f":srv 001 {nick} :Welcome")
    session.data_to_send()
    return session


# --- sans-I/O: registration ----------------------------------------------------------


def test_registration_flow_line_by_line() -> None:
    session = IrcSession(config(channels=("#a", "#b")), channels=["#a", "#b"], now=0.0)
    assert session.state is RegState.CONNECTING
    session.open()
    assert session.state is RegState.REGISTERING
    assert sent(session) == ["NICK bot\r\n", "USER fireclaw 0 * :fireclaw-swarm\r\n"]
    assert feed(session, ":srv NOTICE * :*** Looking up your hostname") == []
    events = feed(session, ":srv 001 bot :Welcome to IRC", ":srv 005 bot NICKLEN=30 :are supported")
    assert events == [Registered(nick="bot")]
    assert session.state is RegState.REGISTERED and session.registered
    assert session.nicklen == 30
    assert sent(session) == ["JOIN #a,#b\r\n"]
    assert feed(session, ":bot!~fireclaw@10.0.0.1 JOIN :#a") == [Joined(channel="#a")]
    assert feed(session, ":bot!~fireclaw@10.0.0.1 JOIN #b") == [Joined(channel="#b")]
    assert sorted(session.joined.values()) == ["#a", "#b"]
    feed(session, "ERROR :Closing connection")
    assert session.state is RegState.CLOSED
    assert session.close_reason == "server said: Closing connection"


def test_password_goes_first() -> None:
    session = IrcSession(config(password="s3cret pass"), now=0.0)
    session.open()
    assert sent(session)[0] == "PASS :s3cret pass\r\n"
    feed(session, ":srv 464 * :Password incorrect")
    assert session.close_reason == "the server password was refused"


def test_illegal_transition_raises() -> None:
    session = IrcSession(config(), now=0.0)
    session.open()
    with pytest.raises(IllegalTransition, match="no open from registering"):
        session.open()
    assert set(TRANSITIONS) == set(RegState)
    assert TRANSITIONS[RegState.CLOSED] == {}


def test_server_driven_moves_out_of_order_are_ignored() -> None:
    session = registered()
    assert feed(session, ":srv 001 bot :again") == []
    feed(session, ":srv CAP bot ACK :sasl", ":srv 903 bot :ok", "AUTHENTICATE +")
    assert sent(session) == [] and session.registered


def test_sasl_plain_flow() -> None:
    session = IrcSession(config(sasl_username="bot", sasl_password="hunter2"), now=0.0)
    session.open()
    assert sent(session) == [
        "CAP LS 302\r\n",
        "NICK bot\r\n",
        "USER fireclaw 0 * :fireclaw-swarm\r\n",
    ]
    assert session.state is RegState.NEGOTIATING
    feed(session, ":srv CAP * LS * :multi-prefix")
    assert sent(session) == []  # more LS lines to come
    feed(session, ":srv CAP * LS :sasl=PLAIN,EXTERNAL")
    assert sent(session) == ["CAP REQ sasl\r\n"]
    feed(session, ":srv CAP * ACK :sasl")
    assert session.state is RegState.AUTHENTICATING
    assert sent(session) == ["AUTHENTICATE PLAIN\r\n"]
    feed(session, "AUTHENTICATE +")
    (line,) = sent(session)
    payload = line.removeprefix("AUTHENTICATE ").removesuffix("\r\n")
    assert base64.b64decode(payload) == b"\0bot\0hunter2"
    feed(session, ":srv 900 bot bot!u@h bot :You are now logged in", ":srv 903 bot :SASL ok")
    assert sent(session) == ["CAP END\r\n"]
    assert session.state is RegState.REGISTERING
    assert feed(session, ":srv 001 bot :Welcome") == [Registered(nick="bot")]


def test_sasl_payload_in_400_byte_chunks() -> None:
    # 597 + 3 bytes -> exactly 800 base64 characters: two full chunks, then "+".
    session = IrcSession(config(sasl_username="u", sasl_password="p" * 597), now=0.0)
    session.open()
    feed(session, ":srv CAP * LS :sasl", ":srv CAP * ACK sasl")
    session.data_to_send()
    feed(session, "AUTHENTICATE +")
    lines = sent(session)
    assert [len(line) for line in lines] == [len("AUTHENTICATE \r\n") + 400] * 2 + [16]
    assert lines[-1] == "AUTHENTICATE +\r\n"
    joined = "".join(line[len("AUTHENTICATE ") : -2] for line in lines[:2])
    assert base64.b64decode(joined) == b"\0u\0" + b"p" * 597


@pytest.mark.parametrize(
    "reply",
    [
        ":srv CAP * LS :multi-prefix",  # not offered
        ":srv CAP * LS :sasl=EXTERNAL",  # no PLAIN
    ],
)
def test_sasl_not_offered_registers_without(reply: str) -> None:
    session = IrcSession(config(sasl_username="u", sasl_password="p"), now=0.0)
    session.open()
    session.data_to_send()
    feed(session, reply)
    assert sent(session) == ["CAP END\r\n"]
    assert feed(session, ":srv 001 bot :hi") == [Registered(nick="bot")]


@pytest.mark.parametrize("failure", ["904", "905", "906", "908", "902"])
def test_sasl_failure_registers_without(failure: str) -> None:
    session = IrcSession(config(sasl_username="u", sasl_password="p"), now=0.0)
    session.open()
    feed(session, ":srv CAP * LS :sasl", ":srv CAP * ACK :sasl", "AUTHENTICATE +")
    session.data_to_send()
    feed(session, f":srv {failure} bot :nope")
    assert sent(session) == ["CAP END\r\n"]
    assert session.state is RegState.REGISTERING


def test_cap_nak_and_servers_without_cap() -> None:
    session = IrcSession(config(sasl_username="u", sasl_password="p"), now=0.0)
    session.open()
    feed(session, ":srv CAP * LS :sasl", ":srv CAP * NAK :sasl")
    assert sent(session)[-1] == "CAP END\r\n"
    ancient = IrcSession(config(sasl_username="u", sasl_password="p"), now=0.0)
    ancient.open()
    assert feed(ancient, ":srv 421 * CAP :Unknown command", ":srv 001 bot :hi") == [
        Registered(nick="bot")
    ]


def test_ping_gets_pong_in_every_state() -> None:
    session = IrcSession(config(), now=0.0)
    session.open()
    session.data_to_send()
    feed(session, "PING :abc def")
    assert sent(session) == ["PONG :abc def\r\n"]
    session = registered()
    feed(session, ":srv PING srv.example")
    assert sent(session) == ["PONG srv.example\r\n"]


# --- sans-I/O: nicks -------------------------------------------------------------------


def test_alternate_nicks() -> None:
    assert [alternate_nick("agent", n, 30) for n in range(6)] == [
        "agent",
        "agent_",
        "agent__",
        "agent1",
        "agent2",
        "agent3",
    ]
    assert alternate_nick("abcdefghi", 1, 9) == "abcdefgh_"
    assert alternate_nick("abcdefghi", 2, 9) == "abcdefg__"
    assert alternate_nick("abcdefghi", 14, 9) == "abcdefg12"
    assert alternate_nick("a", 3, 1) == "a1"  # the suffix is never cut


def test_nick_collision_tries_alternates_then_regains_on_quit() -> None:
    session = IrcSession(config(nick="agent"), now=0.0)
    session.open()
    session.data_to_send()
    tried = []
    for code in ("433", "433", "436", "433"):
        feed(session, f":srv {code} * {session.nick} :Nickname already in use")
        tried += sent(session)
    assert tried == ["NICK agent_\r\n", "NICK agent__\r\n", "NICK agent1\r\n", "NICK agent2\r\n"]
    assert feed(session, ":srv 001 agent2 :Welcome", now=5.0) == [Registered(nick="agent2")]
    assert session.nick == "agent2"
    session.data_to_send()
    # Someone else quitting changes nothing; the holder quitting frees the nick.
    feed(session, ":other!u@h QUIT :bye", now=6.0)
    assert sent(session) == []
    feed(session, ":Agent!u@h QUIT :ghost gone", now=7.0)  # nicks compare case-insensitively
    assert sent(session) == ["NICK agent\r\n"]
    assert feed(session, ":agent2!u@h NICK :agent", now=7.5) == [
        NickChanged(old="agent2", new="agent")
    ]
    assert session.nick == "agent"
    assert session.next_deadline() == pytest.approx(7.5 + 60.0)  # only the idle PING is left


def test_regain_when_the_holder_changes_nick() -> None:
    session = IrcSession(config(nick="agent"), now=0.0)
    session.open()
    feed(session, ":srv 433 * agent :in use", ":srv 001 agent_ :hi")
    session.data_to_send()
    feed(session, ":agent!u@h NICK :someone")
    assert sent(session) == ["NICK agent\r\n"]


def test_regain_on_a_slow_timer() -> None:
    session = IrcSession(config(nick="agent", nick_regain=30.0, ping_idle=1000.0), now=0.0)
    session.open()
    feed(session, ":srv 433 * agent :in use", ":srv 001 agent_ :hi", now=2.0)
    session.data_to_send()
    assert session.next_deadline() == pytest.approx(32.0)
    session.tick(31.9)
    assert sent(session) == []
    session.tick(32.0)
    assert sent(session) == ["NICK agent\r\n"]
    feed(session, ":srv 433 agent_ agent :Nickname already in use", now=32.1)
    assert sent(session) == [] and session.nick == "agent_"  # no alternates once registered
    assert session.next_deadline() == pytest.approx(62.0)


def test_erroneous_nick_shrinks_to_the_server_limit() -> None:
    session = IrcSession(config(nick="averyverylongnick"), now=0.0)
    session.open()
    session.data_to_send()
    for _ in range(12):
        feed(session, f":srv 432 * {session.nick} :Erroneous nickname")
        if len(session.nick) <= 9:
            break
    assert len(session.nick) <= 9
    assert feed(session, f":srv 001 {session.nick} :hi") == [Registered(nick=session.nick)]


def test_gives_up_when_no_nick_is_accepted() -> None:
    session = IrcSession(config(nick="agent"), now=0.0)
    session.open()
    for _ in range(40):
        feed(session, f":srv 433 * {session.nick} :in use")
    assert session.state is RegState.CLOSED
    assert session.close_reason is not None and "accepted none" in session.close_reason


# --- sans-I/O: what arrives ---------------------------------------------------------------


def test_messages_invites_kicks() -> None:
    session = registered(nick="bot")
    assert feed(session, ":alice!~al@10.1.2.3 PRIVMSG #ops :bot: status?") == [
        Message(
            source="alice",
            user="~al",
            host="10.1.2.3",
            target="#ops",
            text="bot: status?",
            private=False,
        )
    ]
    (dm,) = feed(session, ":alice!~al@10.1.2.3 PRIVMSG bot :psst")
    assert isinstance(dm, Message) and dm.private and dm.target == "bot"
    (action,) = feed(session, ":alice!a@h PRIVMSG #ops :\x01ACTION waves\x01")
    assert isinstance(action, Message) and action.action and action.text == "waves"
    assert feed(session, ":alice!a@h PRIVMSG bot :\x01VERSION\x01") == []
    assert sent(session) == []  # CTCP queries get no reply
    (ops,) = feed(session, ":alice!a@h PRIVMSG @#ops :ops only")
    assert isinstance(ops, Message) and not ops.private
    assert feed(session, ":alice!a@h NOTICE bot :notices are not messages") == []
    assert feed(session, ":alice!a@h INVITE bot :#secret") == [
        Invited(channel="#secret", by="alice")
    ]
    feed(session, ":bot!u@h JOIN #ops")
    assert feed(session, ":alice!a@h KICK #ops bob :not you") == [
        UserParted(nick="bob", channel="#ops")
    ]
    assert feed(session, ":alice!a@h KICK #ops bot :out") == [
        Kicked(channel="#ops", by="alice", reason="out")
    ]
    assert session.joined == {}


def test_other_people_coming_and_going() -> None:
    session = registered()
    assert feed(session, ":bot!u@h JOIN #ops") == [Joined(channel="#ops")]
    assert feed(session, ":srv 353 bot = #ops :@alice +bob bot") == [
        Names(channel="#ops", nicks=("alice", "bob", "bot"))
    ]
    assert feed(session, ":carol!c@10.0.0.1 JOIN #ops") == [
        UserJoined(nick="carol", user="c", host="10.0.0.1", channel="#ops")
    ]
    assert feed(session, ":carol!c@h NICK :dave") == [UserRenamed(old="carol", new="dave")]
    assert feed(session, ":dave!c@h PART #ops :bye") == [UserParted(nick="dave", channel="#ops")]
    assert feed(session, ":bob!b@h QUIT :gone") == [UserQuit(nick="bob")]
    assert session.joined == {"#ops": "#ops"}


def test_whois_answers_are_gathered_until_318() -> None:
    session = registered()
    assert (
        feed(
            session,
            ":srv 311 bot Admin ~adm 127.0.0.1 * :real name",
            ":srv 319 bot Admin :#control",
            ":srv 313 bot Admin :is an IRC operator",
            ":srv 330 bot Admin acct :is logged in as",
        )
        == []
    )
    assert feed(session, ":srv 318 bot admin :End of WHOIS list") == [
        WhoisReply(nick="Admin", user="~adm", host="127.0.0.1", operator=True, account="acct")
    ]
    # No such nick: 401, then 318 alone.
    assert feed(session, ":srv 401 bot ghost :No such nick", ":srv 318 bot ghost :End") == [
        WhoisReply(nick="ghost")
    ]
    # Answers about two nicks interleaved stay apart; an unfinished one does not leak.
    assert feed(
        session,
        ":srv 311 bot a ua ha * :x",
        ":srv 311 bot b ub hb * :x",
        ":srv 313 bot b :is an IRC operator",
        ":srv 318 bot a :End",
    ) == [WhoisReply(nick="a", user="ua", host="ha")]
    assert feed(session, ":srv 318 bot b :End") == [
        WhoisReply(nick="b", user="ub", host="hb", operator=True)
    ]


def test_own_hostmask_tightens_the_page_budget() -> None:
    session = registered(nick="bot")
    before = session.budget("PRIVMSG", "#c")
    feed(session, ":bot!~fireclaw@10.0.0.1 JOIN #c")
    after = session.budget("PRIVMSG", "#c")
    assert after == MAX_LINE - 2 - len(":bot!~fireclaw@10.0.0.1 PRIVMSG #c :")
    assert before < after


def test_hostile_chunk_does_not_hide_the_valid_line() -> None:
    reader = LineReader()
    chunk = (
        b"\r\n   \r\n"  # blank lines
        b"@a=b\r\n"  # tags only
        b":prefix\r\n"  # no command
        b"@a=b :prefix\r\n"
        + b"A" * 20_000  # far longer than any line may be
        + b"\r\n"
        + b"\xff\xfe\xfd PRIVMSG\r"  # invalid UTF-8, bare CR
        + b":\r\n"
        + b"\x00\x00\r\n"
        + b":alice!a@h PRIVMSG #c :still here\r\n"
    )
    lines = reader.feed(chunk)
    assert lines[-1].command == "PRIVMSG" and lines[-1].params == ["#c", "still here"]
    assert reader.dropped >= 5
    session = registered()
    events = session.receive(chunk, 1.0)
    assert events[-1] == Message(
        source="alice", user="a", host="h", target="#c", text="still here", private=False
    )


def test_long_line_split_across_chunks_is_discarded_to_its_end() -> None:
    reader = LineReader(max_line=100)
    assert reader.feed(b"PRIVMSG #c :" + b"x" * 95) == []
    assert reader.feed(b"y" * 50) == []  # over the cap: discarding
    assert reader.feed(b"zzz\nPING :a") == []  # the end of the long line, and half of the next
    (ping,) = reader.feed(b"b\r\n")
    assert ping.command == "PING" and ping.params == ["ab"]
    assert reader.dropped == 1


def test_line_endings() -> None:
    reader = LineReader()
    lines = reader.feed(b"PING a\nPING b\r\nPING c\rPING d\r")
    assert [line.params[0] for line in lines] == ["a", "b", "c", "d"]
    assert reader.feed(b"\n") == []


# --- sans-I/O: what goes out -------------------------------------------------------------


def test_clean() -> None:
    assert clean("a\r\nb\x00c\x01d\te") == "abc\x01d\te"


def test_an_injected_command_stays_one_line() -> None:
    line = privmsg("#c", "a\r\nQUIT :x")
    assert line == b"PRIVMSG #c :aQUIT :x\r\n"
    assert line.count(b"\r\n") == 1 and b"\n" not in line[:-2] and b"\r" not in line[:-2]
    assert b"\x00" not in privmsg("#c", "nul\x00here")


@pytest.mark.parametrize("prefix", range(4))
@pytest.mark.parametrize("char", ["é", "€", "\U0001f600"])
def test_encoder_cuts_at_512_bytes_on_a_character(prefix: int, char: str) -> None:
    line = privmsg("#c", "x" * prefix + char * 600)
    assert len(line) <= MAX_LINE and line.endswith(b"\r\n")
    body = line[:-2].decode("utf-8")  # strict: no split character
    assert irctokens.tokenise(body).params == ["#c", body.removeprefix("PRIVMSG #c :")]
    assert len(line) > MAX_LINE - len(char.encode())  # nothing cut that would have fit


def test_encoder_parameter_rules() -> None:
    assert encode("privmsg", "#c", "hello") == b"PRIVMSG #c :hello\r\n"
    assert encode("JOIN", "#c") == b"JOIN #c\r\n"
    assert encode("PRIVMSG", "#c", ":)") == b"PRIVMSG #c ::)\r\n"
    assert encode("PRIVMSG", "#c", "") == b"PRIVMSG #c :\r\n"
    assert encode("QUIT") == b"QUIT\r\n"
    for bad in ("#a b", ":x", ""):
        with pytest.raises(InvalidParameter):
            encode("PRIVMSG", bad, "text")
    for command in ("", "PRIV MSG", "12", "X\r\nQUIT"):
        with pytest.raises(InvalidParameter):
            encode(command, "x")
    with pytest.raises(InvalidParameter, match="too long"):
        encode("PRIVMSG", "#" + "c" * 600, "text")


def test_paginate() -> None:
    assert paginate("one\r\ntwo\n\n   \nthree\rfour", 100) == ["one", "two", "three", "four"]
    words = " ".join(f"word{n}" for n in range(100))
    pages = paginate(words, 50)
    assert all(len(page.encode()) <= 50 for page in pages)
    assert " ".join(pages) == words  # split at spaces, nothing lost
    pages = paginate("é" * 100, 11)
    assert all(len(page.encode()) <= 11 for page in pages) and "".join(pages) == "é" * 100
    assert paginate("a\x00b", 10) == ["ab"]
    with pytest.raises(ValueError, match="budget"):
        paginate("x", 3)


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=10.0)
    for _ in range(3):
        assert bucket.delay(10.0) == 0
        bucket.take(10.0)
    assert bucket.delay(10.0) == pytest.approx(0.5)
    assert bucket.delay(10.25) == pytest.approx(0.25)
    assert bucket.delay(10.5) == 0
    bucket.take(10.5)
    assert bucket.delay(100.0) == 0  # refills to the burst, never beyond
    for _ in range(3):
        bucket.take(100.0)
    assert bucket.delay(100.0) == pytest.approx(0.5)


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="invalid nick"):
        config(nick="1bot")
    with pytest.raises(ValueError, match="invalid channel"):
        config(channels=("#a b",))
    with pytest.raises(ValueError, match="go together"):
        config(sasl_username="u")
    with pytest.raises(ValueError, match="send_rate"):
        config(send_rate=0.0)


# --- hypothesis ---------------------------------------------------------------------------

_atoms = st.sampled_from(
    [
        "\r",
        "\n",
        "\r\n",
        "\x00",
        ":",
        "@",
        " ",
        "  ",
        "!",
        ",",
        "*",
        "+",
        "\x01",
        "=",
        ";",
        "PRIVMSG",
        "NOTICE",
        "PING",
        "PONG",
        "JOIN",
        "PART",
        "KICK",
        "INVITE",
        "NICK",
        "QUIT",
        "CAP",
        "LS",
        "ACK",
        "NAK",
        "AUTHENTICATE",
        "ERROR",
        "001",
        "005",
        "433",
        "432",
        "903",
        "904",
        "464",
        "NICKLEN=",
        "CHANTYPES=",
        "CASEMAPPING=",
        "ACTION",
        "#c",
        "&c",
        "@#c",
        "bot",
        "bot_",
        "alice!a@h",
        "sasl",
        "é",
        "\U0001f600",
        "\udcff",
        "x" * 600,
        "y" * 9000,
    ]  # fmt: skip
)
_hostile_lines = st.lists(st.one_of(_atoms, st.text(max_size=20)), max_size=30).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=3000), max_size=8))
def test_fuzz_random_bytes_never_raise(chunks: list[bytes]) -> None:
    fresh = IrcSession(config(), now=0.0)
    fresh.open()
    for session in (fresh, registered()):
        for now, chunk in enumerate(chunks):
            session.receive(chunk, float(now))
            session.tick(float(now))
        for line in session.data_to_send():
            assert len(line) <= MAX_LINE


@settings(max_examples=300, deadline=None)
@given(st.lists(_hostile_lines, max_size=12), st.integers(min_value=1, max_value=600))
def test_fuzz_hostile_lines_never_raise(lines: list[str], split: int) -> None:
    data = "\r\n".join(lines).encode("utf-8", "surrogatepass")
    sasl = IrcSession(config(sasl_username="u", sasl_password="p"), now=0.0)
    sasl.open()
    for session in (sasl, registered(), registered(nick="agent_")):
        for start in range(0, len(data), split):
            session.receive(data[start : start + split], 1.0)
        session.receive(b"\r\n:alice!a@h PRIVMSG #c :after\r\n", 2.0)
        for line in session.data_to_send():
            assert len(line) <= MAX_LINE and line.endswith(b"\r\n")
            assert not any(ch in line[:-2] for ch in b"\r\n\x00")


@settings(max_examples=300, deadline=None)
@given(st.text(), st.sampled_from(["#c", "bot", "#" + "c" * 40]))
def test_fuzz_outgoing_text_stays_one_line(text: str, target: str) -> None:
    line = privmsg(target, text)
    assert len(line) <= MAX_LINE and line.endswith(b"\r\n")
    assert not any(ch in line[:-2] for ch in b"\r\n\x00")
    assert irctokens.tokenise(line[:-2].decode("utf-8")).params[0] == target
    budget = registered().budget("PRIVMSG", target)
    for page in paginate(text, budget):
        assert len(page.encode("utf-8", "replace")) <= budget
        assert "\r" not in page and "\n" not in page and "\x00" not in page
        assert len(privmsg(target, page)) <= MAX_LINE


# --- the trio adapter under MockClock ---------------------------------------------------------


class Link:
    """The server end of one client connection, over memory streams."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buffer = b""
        self.closed = False

    async def line(self) -> str:
        """The next line from the client ("" once it closed the connection)."""
        while b"\r\n" not in self._buffer:
            data = await self.stream.receive_some(65536)
            if not data:
                self.closed = True
                return ""
            self._buffer += data
        raw, self._buffer = self._buffer.split(b"\r\n", 1)
        return raw.decode()

    async def send(self, *lines: str) -> None:
        await self.stream.send_all("".join(line + "\r\n" for line in lines).encode())

    async def register(self, nick: str = "bot") -> None:
        assert (await self.line()).startswith("NICK ")
        assert (await self.line()).startswith("USER ")
        await self.send(f":srv 001 {nick} :Welcome")


class Network:
    """Hands the client memory streams; the test takes the server ends from ``accept``."""

    def __init__(self) -> None:
        self._links_in, self._links_out = trio.open_memory_channel[Link](16)
        self.attempts: list[float] = []
        self.refuse = 0

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        self.attempts.append(trio.current_time())
        if self.refuse:
            self.refuse -= 1
            raise OSError(errno.ECONNREFUSED, "Connection refused")
        client, server = trio.testing.memory_stream_pair()
        self._links_in.send_nowait(Link(server))
        return client

    async def accept(self) -> Link:
        return await self._links_out.receive()


def fake_client(network: Network, **overrides: Any) -> IrcClient:
    # The longest delay full jitter allows, so backoff times are exact.
    return IrcClient(config(**overrides), connect=network.connect, uniform=lambda lo, hi: hi)


async def next_event(client: IrcClient, kind: type[E], within: float = WAIT) -> E:
    with trio.fail_after(within):
        async for event in client.events():
            if isinstance(event, kind):
                return event
    raise AssertionError("the event channel closed")


def pending_events(client: IrcClient) -> list[Event]:
    events = []
    while True:
        try:
            events.append(client.events().receive_nowait())
        except trio.WouldBlock:
            return events


async def test_idle_ping_then_ping_timeout_then_reconnect(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = Network()
    client = fake_client(network, ping_idle=30.0, ping_timeout=20.0, reconnect_base=1.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        link = await network.accept()
        await link.register()
        t0 = trio.current_time()
        assert (await link.line()) == "PING fireclaw-1"
        assert trio.current_time() - t0 == pytest.approx(30.0)
        event = await next_event(client, Disconnected, within=60)
        assert trio.current_time() - t0 == pytest.approx(50.0)
        assert event.reason == "no reply to PING for 20s"
        await network.accept()
        assert trio.current_time() - t0 == pytest.approx(51.0)
        nursery.cancel_scope.cancel()


async def test_traffic_and_pongs_keep_the_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = Network()
    client = fake_client(network, ping_idle=30.0, ping_timeout=20.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        link = await network.accept()
        await link.register()
        t0 = trio.current_time()
        pings = []
        while trio.current_time() - t0 < 300:
            line = await link.line()
            assert line.startswith("PING ")
            pings.append(trio.current_time() - t0)
            await trio.sleep(5)  # the server answers late, within the timeout
            await link.send(f":srv PONG srv :{line.split()[-1]}")
        assert pings == pytest.approx([30.0 + 35.0 * n for n in range(len(pings))])
        assert not [e for e in pending_events(client) if isinstance(e, Disconnected)]
        nursery.cancel_scope.cancel()


async def test_registration_timeout(autojump_clock: trio.testing.MockClock) -> None:
    network = Network()
    client = fake_client(network, ping_timeout=15.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        t0 = trio.current_time()
        await network.accept()  # and never answer
        event = await next_event(client, Disconnected)
        assert trio.current_time() - t0 == pytest.approx(15.0)
        assert event.reason == "not registered after 15s"
        nursery.cancel_scope.cancel()


async def test_reconnect_backoff_is_exponential_and_capped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = Network()
    network.refuse = 5
    client = fake_client(network, reconnect_base=1.0, reconnect_max=8.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        link = await network.accept()
        gaps = [b - a for a, b in zip(network.attempts, network.attempts[1:], strict=False)]
        assert gaps == pytest.approx([1.0, 2.0, 4.0, 8.0, 8.0])
        await link.register()
        await next_event(client, Registered)
        await link.stream.aclose()  # the server goes away after a good connection
        event = await next_event(client, Disconnected)
        assert event.reason == "the server closed the connection"
        lost = trio.current_time()
        await network.accept()
        assert trio.current_time() - lost == pytest.approx(1.0)  # a fresh start: base delay
        nursery.cancel_scope.cancel()


async def test_backoff_draws_full_jitter(autojump_clock: trio.testing.MockClock) -> None:
    network = Network()
    network.refuse = 4
    draws: list[tuple[float, float]] = []

    def uniform(lo: float, hi: float) -> float:
        draws.append((lo, hi))
        return hi / 2

    client = IrcClient(
        config(reconnect_base=2.0, reconnect_max=10.0), connect=network.connect, uniform=uniform
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        await network.accept()
        assert draws == [(0.0, 2.0), (0.0, 4.0), (0.0, 8.0), (0.0, 10.0)]
        gaps = [b - a for a, b in zip(network.attempts, network.attempts[1:], strict=False)]
        assert gaps == pytest.approx([1.0, 2.0, 4.0, 5.0])
        nursery.cancel_scope.cancel()


async def test_output_is_throttled(autojump_clock: trio.testing.MockClock) -> None:
    network = Network()
    client = fake_client(network, send_rate=2.0, send_burst=5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        link = await network.accept()
        await link.register()  # NICK and USER used 2 of the 5 tokens
        t0 = trio.current_time()
        await next_event(client, Registered)
        for n in range(20):
            await client.privmsg("#c", f"line {n}")
        arrivals = []
        for n in range(20):
            assert (await link.line()) == f"PRIVMSG #c :line {n}"
            arrivals.append(trio.current_time() - t0)
        assert arrivals == pytest.approx([0.0] * 3 + [0.5 * k for k in range(1, 18)])
        nursery.cancel_scope.cancel()


async def test_lines_wait_for_registration_and_joins(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = Network()
    client = fake_client(network, channels=("#a",))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        await client.privmsg("#a", "early\nbird")
        link = await network.accept()
        await link.register()
        assert [await link.line() for _ in range(3)] == [
            "JOIN #a",
            "PRIVMSG #a :early",
            "PRIVMSG #a :bird",
        ]
        nursery.cancel_scope.cancel()


async def test_rejoins_after_reconnect_but_not_after_a_kick(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = Network()
    client = fake_client(network, channels=("#a", "#b"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        link = await network.accept()
        await link.register()
        assert await link.line() == "JOIN #a,#b"
        await link.send(":bot!u@h JOIN #a", ":bot!u@h JOIN #b")
        await client.join("#c")
        assert await link.line() == "JOIN #c"
        await link.send(":op!o@h KICK #a bot :bye")
        assert await next_event(client, Kicked) == Kicked(channel="#a", by="op", reason="bye")
        await link.stream.aclose()
        await next_event(client, Disconnected)
        link = await network.accept()
        await link.register()
        assert await link.line() == "JOIN #b,#c"
        assert client.channels == ("#b", "#c")
        nursery.cancel_scope.cancel()


async def test_pong_jumps_the_queue(autojump_clock: trio.testing.MockClock) -> None:
    network = Network()
    client = fake_client(network, send_rate=1.0, send_burst=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        link = await network.accept()
        await link.register()
        for n in range(5):
            await client.privmsg("#c", f"line {n}")
        await link.send("PING :hurry")
        lines = [await link.line() for _ in range(6)]
        assert lines.index("PONG hurry") <= 1
        nursery.cancel_scope.cancel()


async def test_quit_sends_pending_lines_then_quit(autojump_clock: trio.testing.MockClock) -> None:
    network = Network()
    client = fake_client(network)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        link = await network.accept()
        await link.register()
        await next_event(client, Registered)

        async def server() -> None:
            assert await link.line() == "PRIVMSG #c :last words"
            assert await link.line() == "QUIT :stopped by the supervisor"
            await link.send("ERROR :Closing connection")
            await link.stream.aclose()

        nursery.start_soon(server)
        await client.privmsg("#c", "last words")
        t0 = trio.current_time()
        await client.quit("stopped by the supervisor")
        assert trio.current_time() - t0 < 1.0
    assert not client.registered
    assert not [e for e in pending_events(client) if isinstance(e, Disconnected)]


async def test_quit_gives_up_on_a_silent_server(autojump_clock: trio.testing.MockClock) -> None:
    network = Network()
    client = fake_client(network)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        link = await network.accept()
        await link.register()
        await next_event(client, Registered)
        t0 = trio.current_time()
        await client.quit("bye")
        assert trio.current_time() - t0 == pytest.approx(irc_module.QUIT_TIMEOUT)
    assert await link.line() == "QUIT :bye"


async def test_slow_consumer_loses_the_oldest_events(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(irc_module, "EVENT_BUFFER", 3)
    network = Network()
    client = fake_client(network)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        link = await network.accept()
        await link.register()
        await link.send(*(f":a!u@h PRIVMSG bot :m{n}" for n in range(10)), "PING :sync")
        assert await link.line() == "PONG sync"
        events = pending_events(client)
        assert [e.text for e in events if isinstance(e, Message)] == ["m7", "m8", "m9"]
        assert client.dropped_events == 8  # Registered and m0..m6
        nursery.cancel_scope.cancel()


async def test_bad_targets_are_refused() -> None:
    client = IrcClient(config())
    for target in ("", "#a b", "a,b", ":x", "a\r\nQUIT"):
        with pytest.raises(InvalidParameter):
            await client.privmsg(target, "hi")
    with pytest.raises(InvalidParameter):
        await client.join("nochannel")


# --- against a real ngircd ------------------------------------------------------------------


@pytest.fixture
async def ircd() -> AsyncIterator[Ircd]:
    async with ircd_server() as server:
        yield server


def real_client(ircd: Ircd, nick: str, **overrides: Any) -> IrcClient:
    values: dict[str, Any] = {"reconnect_base": 0.05, "reconnect_max": 0.5}
    values.update(overrides)
    return IrcClient(IrcConfig(host=ircd.host, port=ircd.port, nick=nick, **values))


@asynccontextmanager
async def running(client: IrcClient) -> AsyncIterator[IrcClient]:
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT):
            await nursery.start(client.run)
        yield client
        with trio.fail_after(WAIT):
            await client.quit("test over")


async def joined(client: IrcClient, *channels: str) -> None:
    waiting = set(channels)
    while waiting:
        waiting.discard((await next_event(client, Joined)).channel)


@needs_ngircd
async def test_ngircd_register_join_and_talk(ircd: Ircd) -> None:
    async with person(ircd.address, "alice", "#ops") as alice:
        async with running(real_client(ircd, "bot", channels=("#ops", "#agents"))) as client:
            assert client.registered and client.nick == "bot"
            await joined(client, "#ops", "#agents")
            alice.do("privmsg", "#ops", "bot: how are you?")
            message = await next_event(client, Message)
            assert (message.source, message.target, message.text) == (
                "alice",
                "#ops",
                "bot: how are you?",
            )
            assert not message.private and message.host == "127.0.0.1"
            alice.do("privmsg", "bot", "a secret")
            message = await next_event(client, Message)
            assert (message.target, message.text, message.private) == ("bot", "a secret", True)
            alice.do("action", "#ops", "waves")
            message = await next_event(client, Message)
            assert message.action and message.text == "waves"
            await client.privmsg("#ops", "fine\r\nQUIT :thanks")
            first, second = await alice.message_in("#ops"), await alice.message_in("#ops")
            assert [first.arguments[0], second.arguments[0]] == ["fine", "QUIT :thanks"]
            alice.do("invite", "bot", "#elsewhere")
            assert await next_event(client, Invited) == Invited(channel="#elsewhere", by="alice")
        gone = await alice.aexpect(
            "bot quitting", lambda e: e.type == "quit" and e.source.nick == "bot"
        )
        assert "test over" in gone.arguments[0]


@needs_ngircd
async def test_ngircd_nick_collision_then_regain(ircd: Ircd) -> None:
    async with person(ircd.address, "agent", "#agents") as holder:
        client = real_client(ircd, "agent", channels=("#agents",))
        async with running(client):
            assert client.nick == "agent_"
            await joined(client, "#agents")
            await holder.astop()
            changed = await next_event(client, NickChanged)
            assert changed == NickChanged(old="agent_", new="agent")
            assert client.nick == "agent"


@needs_ngircd
async def test_ngircd_killed_and_restarted(ircd: Ircd) -> None:
    client = real_client(ircd, "bot", channels=("#ops",))
    async with running(client):
        await joined(client, "#ops")
        await ircd.kill()
        lost = await next_event(client, Disconnected)
        assert lost.reason in (
            "the server closed the connection",
            "connection lost: Connection reset by peer",
        )
        assert not client.registered
        await ircd.start()
        assert await next_event(client, Registered) == Registered(nick="bot")
        await joined(client, "#ops")
        async with person(ircd.address, "alice", "#ops") as alice:
            alice.do("privmsg", "#ops", "welcome back")
            assert (await next_event(client, Message)).text == "welcome back"


@needs_ngircd
async def test_ngircd_thirty_long_lines_all_arrive(ircd: Ircd) -> None:
    async with person(ircd.address, "alice", "#ops") as alice:
        client = real_client(ircd, "bot", channels=("#ops",))
        async with running(client):
            await joined(client, "#ops")
            lines = [f"{n:02d} " + "é" * 200 + "x" * 60 for n in range(30)]  # 463 bytes each
            for line in lines:
                await client.privmsg("#ops", line)
            got = [(await alice.message_in("#ops")).arguments[0] for _ in lines]
            assert got == lines
            assert client.registered
            assert not [e for e in pending_events(client) if isinstance(e, Disconnected)]
    assert not ircd.saw("Request too long") and not ircd.saw("exhausted")


@needs_ngircd
async def test_ngircd_long_reply_is_paginated_within_limits(ircd: Ircd) -> None:
    async with person(ircd.address, "alice", "#ops") as alice:
        client = real_client(ircd, "bot", channels=("#ops",), send_rate=10.0, send_burst=10)
        async with running(client):
            await joined(client, "#ops")
            text = " ".join(f"wörd{n}" for n in range(300))
            await client.privmsg("#ops", text)
            pieces: list[str] = []
            while " ".join(pieces) != text:
                pieces.append((await alice.message_in("#ops")).arguments[0])
            assert len(pieces) > 4
    assert not ircd.saw("Request too long")


@needs_ngircd
async def test_ngircd_server_password(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=irc_module.log.name)
    async with ircd_server(password="opensesame") as ircd:
        async with running(real_client(ircd, "bot", password="opensesame")) as client:
            assert client.registered
        # Even the line-by-line debug log does not show the password it sent.
        assert "PASS <redacted>" in caplog.text
        assert "opensesame" not in caplog.text
        wrong = real_client(ircd, "intruder", password="guess")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wrong.run)
            lost = await next_event(wrong, Disconnected)
            assert "password" in lost.reason.lower() or "denied" in lost.reason.lower()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("line", "logged"),
    [
        (b"PASS hunter2\r\n", b"PASS <redacted>\r\n"),
        (b"OPER fireclaw hunter2\r\n", b"OPER <redacted>\r\n"),
        (b"AUTHENTICATE aHVudGVyMg==\r\n", b"AUTHENTICATE <redacted>\r\n"),
        (b"AUTHENTICATE PLAIN\r\n", b"AUTHENTICATE PLAIN\r\n"),
        (b"AUTHENTICATE +\r\n", b"AUTHENTICATE +\r\n"),
        (b"PRIVMSG #swarm :PASS the salt\r\n", b"PRIVMSG #swarm :PASS the salt\r\n"),
    ],
)
def test_a_logged_line_hides_what_carries_a_password(line: bytes, logged: bytes) -> None:
    assert irc_wire_module.loggable(line) == logged
