"""An agent on IRC: the reply policy and the text rules without I/O, the timing of
answers and loops under MockClock with a small in-memory IRC server, and the
whole presence against a real ngircd with a person on the other side played by
the independent ``irc`` library.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from fireclaw.guest_daemon.agent_irc import BUSY, FAILED, AgentPresence, Answer, Draft
from fireclaw.guest_daemon.agent_rules import (
    InvalidPresence,
    ReplyPolicy,
    addressed_to,
    irc_config,
    is_agent,
    mentions,
    reply_lines,
)
from fireclaw.guest_daemon.answer_stream import NO_ANSWER
from fireclaw.guest_daemon.irc_wire import MAX_LINE, casefold, privmsg
from fireclaw.guest_daemon.protocol import IrcPresence
from ircd import NGIRCD, Ircd, ircd_server
from ircperson import Person, person
from irctokens.line import Line, tokenise

WAIT = 20.0  # real-server waits: generous for a busy machine
VIRTUAL_WAIT = 1000.0  # MockClock waits: virtual seconds, far past every scenario

needs_ngircd = pytest.mark.skipif(NGIRCD is None, reason="ngircd is not installed")


def presence(nick: str, *channels: str, **overrides: Any) -> IrcPresence:
    values: dict[str, Any] = {
        "host": "irc.test",
        "port": 6667,
        "nick": nick,
        "channels": list(channels or ("#agents",)),
    }
    values.update(overrides)
    return IrcPresence(**values)


# --- the reply policy, with exact times ----------------------------------------------------


def test_people_are_always_answered() -> None:
    policy = ReplyPolicy(10.0)
    policy.answered(0.0, to_agent=True)
    assert policy.should_answer(0.0, from_agent=False)
    assert policy.should_answer(5.0, from_agent=False)
    assert not policy.should_answer(5.0, from_agent=True)


def test_cooldown_after_answering_an_agent() -> None:
    policy = ReplyPolicy(10.0)
    assert policy.should_answer(0.0, from_agent=True)
    policy.answered(100.0, to_agent=True)
    assert policy.quiet_until == 110.0
    assert not policy.should_answer(100.0, from_agent=True)
    assert not policy.should_answer(109.999, from_agent=True)
    assert policy.should_answer(110.0, from_agent=True)


def test_answering_a_person_starts_no_cooldown() -> None:
    policy = ReplyPolicy(10.0)
    policy.answered(0.0, to_agent=False)
    assert policy.should_answer(0.0, from_agent=True)
    assert policy.quiet_until == -math.inf


def test_consecutive_agent_answers_double_the_quiet_up_to_calm() -> None:
    policy = ReplyPolicy(10.0, calm=60.0)
    quiet = []
    for now in (0.0, 15.0, 40.0, 90.0):
        assert policy.should_answer(now, from_agent=True)
        policy.answered(now, to_agent=True)
        quiet.append(policy.quiet_until - now)
    assert quiet == [10.0, 20.0, 40.0, 60.0]
    assert not policy.should_answer(149.999, from_agent=True)
    policy.answered(150.0, to_agent=True)  # capped at calm, so by now it is calm again
    assert policy.quiet_until == 160.0


def test_the_doubling_starts_over_after_calm_or_a_person() -> None:
    policy = ReplyPolicy(10.0, calm=60.0)
    policy.answered(0.0, to_agent=True)
    policy.answered(20.0, to_agent=True)
    assert policy.quiet_until == 40.0 and policy.streak == 2
    policy.answered(100.0, to_agent=True)  # 80 s since the last agent answer: calm
    assert policy.quiet_until == 110.0 and policy.streak == 1
    policy.answered(115.0, to_agent=True)
    assert policy.quiet_until == 135.0
    policy.answered(120.0, to_agent=False)  # a person: the quiet period runs on ...
    assert not policy.should_answer(134.0, from_agent=True)
    policy.answered(140.0, to_agent=True)  # ... but the next one is back to the base
    assert policy.quiet_until == 150.0


def test_a_loop_slower_than_the_cooldown_still_ends() -> None:
    """Two agents, each taking 11 s to answer, cooldown 10 s."""
    alice, bob = ReplyPolicy(10.0), ReplyPolicy(10.0)
    now, speaker, listener, said = 0.0, alice, bob, 0
    while listener.should_answer(now, from_agent=True) and said < 100:
        now += 11.0
        listener.answered(now, to_agent=True)
        speaker, listener = listener, speaker
        said += 1
    assert said == 4 and now == 44.0


def test_zero_cooldown_never_holds_back() -> None:
    policy = ReplyPolicy(0.0)
    policy.answered(0.0, to_agent=True)
    policy.answered(0.0, to_agent=True)
    assert policy.should_answer(0.0, from_agent=True)
    with pytest.raises(ValueError, match="cooldown"):
        ReplyPolicy(-1.0)


# --- who is an agent, what is a mention, what goes out -------------------------------


def test_agents_are_known_by_their_username() -> None:
    assert is_agent("~agent") and is_agent("agent") and is_agent("Agent")
    assert not is_agent("~carol") and not is_agent("agent2") and not is_agent("")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alice: what is 2+2?", True),
        ("ALICE, hi", True),
        ("ask Alice about it", True),
        ("@alice?", True),
        ("alice's turn", True),
        ("malice aforethought", False),
        ("alice_ is someone else", False),
        ("alice2 too", False),
        ("alice-bob", False),
        ("nothing here", False),
        ("", False),
    ],
)
def test_mentions(text: str, expected: bool) -> None:
    assert mentions(text, "alice") is expected


def test_mentions_fold_with_the_irc_casemapping() -> None:
    assert mentions("hey [bot]", "{BOT}")
    assert mentions("ping a^b", "A~B")
    assert not mentions("ping a^b", "A~B", casemapping="ascii")


def test_addressed_to_drops_the_address_only() -> None:
    nicks = ["alice_", "alice"]
    assert addressed_to("alice: what is 2+2?", nicks) == "what is 2+2?"
    assert addressed_to("  Alice ,  status", nicks) == "status"
    assert addressed_to("alice_: hi", nicks) == "hi"
    assert addressed_to("hey alice, status?", nicks) == "hey alice, status?"
    assert addressed_to("alice:", nicks) == "alice:"
    assert addressed_to("alice is here", nicks) == "alice is here"
    assert addressed_to("malice: no", nicks) is None


def test_reply_lines_are_capped_and_fit() -> None:
    assert reply_lines("4", prefix="carol: ", budget=400) == ["carol: 4"]
    assert reply_lines("  \n\n ", prefix="carol: ", budget=400) == ["carol: " + NO_ANSWER]
    assert reply_lines("\x01PING 1\x01", prefix="", budget=400) == ["PING 1"]
    text = "\n".join(f"line {n}" for n in range(50))
    lines = reply_lines(text, prefix="carol: ", budget=400, max_lines=10)
    assert lines == ["carol: line 0", *(f"line {n}" for n in range(1, 9)), "(… 41 more lines)"]
    assert reply_lines("a\nb", prefix="", budget=400, max_lines=2) == ["a", "b"]
    assert reply_lines("a\nb\nc", prefix="", budget=400, max_lines=2) == ["a", "(… 2 more lines)"]
    long = reply_lines("é" * 1000, prefix="carol: ", budget=100)
    assert all(len(line.encode()) <= 100 for line in long) and len(long) == 10
    with pytest.raises(ValueError):
        reply_lines("x", prefix="", budget=400, max_lines=1)


def test_irc_config_of_a_presence() -> None:
    config = irc_config(presence("alice", "#agents", "#ops", "#agents", password="pw"))
    assert (config.nick, config.username, config.realname) == ("alice", "agent", "fireclaw agent")
    assert config.channels == ("#agents", "#ops") and config.password == "pw"
    assert irc_config(presence("alice")).password is None
    with pytest.raises(InvalidPresence, match="^IRC presence of alice: invalid channel"):
        irc_config(presence("alice", "agents"))
    with pytest.raises(InvalidPresence, match="invalid nick"):
        AgentPresence(presence("1alice"), echo)


async def echo(sender: str, where: str, text: str, draft: Draft) -> str:
    return text


# --- under MockClock, with an IRC server in memory ----------------------------------------


class _Link:
    """The server end of one client connection."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.nick = ""
        self.user = ""
        self.registered = False
        self._lock = trio.Lock()

    @property
    def mask(self) -> str:
        return f"{self.nick}!~{self.user}@{FakeIrcd.HOST}"

    async def send(self, line: str) -> None:
        async with self._lock:
            try:
                await self.stream.send_all(line.encode() + b"\r\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass


class FakeIrcd:
    """Just enough of an IRC server for agents: NICK/USER, JOIN, PART, PRIVMSG, PING, QUIT.

    Agents connect through ``connect``; people are nicks the test speaks for
    with ``say``. Every PRIVMSG is logged with the (virtual) time it passed.
    """

    HOST = "fake.test"

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.links: dict[str, _Link | None] = {}  # folded nick -> link (None: a person)
        self.members: dict[str, set[str]] = {}  # folded channel -> nicks
        self.log: list[tuple[float, str, str, str]] = []  # (time, from, to, text)
        self.quits: list[tuple[str, str]] = []
        self._changed = trio.lowlevel.ParkingLot()

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        self._nursery.start_soon(self._serve, _Link(server))
        return client

    def person(self, nick: str, *channels: str) -> None:
        self.links[casefold(nick)] = None
        for channel in channels:
            self.members.setdefault(casefold(channel), set()).add(nick)

    def in_channel(self, nick: str, channel: str) -> bool:
        return nick in self.members.get(casefold(channel), set())

    async def until(self, check: Callable[[], bool]) -> None:
        with trio.fail_after(VIRTUAL_WAIT):
            while not check():
                await self._changed.park()

    def said(self, t0: float) -> list[tuple[float, str, str, str]]:
        """The log from ``t0`` on, with times relative to it."""
        return [(at - t0, who, to, text) for at, who, to, text in self.log if at >= t0]

    async def say(self, nick: str, target: str, text: str) -> None:
        await self._privmsg(f"{nick}!~{nick}@{self.HOST}", nick, target, text)

    async def _privmsg(self, mask: str, nick: str, target: str, text: str) -> None:
        self.log.append((trio.current_time(), nick, target, text))
        if target.startswith("#"):
            recipients = self.members.get(casefold(target), set()) - {nick}
        else:
            recipients = {target}
        for name in sorted(recipients):
            link = self.links.get(casefold(name))
            if link is not None:
                await link.send(f":{mask} PRIVMSG {target} :{text}")
        self._changed.unpark_all()

    async def _serve(self, link: _Link) -> None:
        buffer = b""
        try:
            while True:
                data = await link.stream.receive_some(65536)
                if not data:
                    return
                buffer += data
                while b"\r\n" in buffer:
                    raw, buffer = buffer.split(b"\r\n", 1)
                    if not await self._handle(link, tokenise(raw.decode())):
                        return
        finally:
            if self.links.get(casefold(link.nick)) is link:
                del self.links[casefold(link.nick)]
            for nicks in self.members.values():
                nicks.discard(link.nick)
            await link.stream.aclose()
            self._changed.unpark_all()

    async def _handle(self, link: _Link, line: Line) -> bool:
        params = line.params
        match line.command:
            case "NICK":
                if casefold(params[0]) in self.links:
                    await link.send(f":{self.HOST} 433 * {params[0]} :Nickname already in use")
                    return True
                link.nick = params[0]
                self.links[casefold(link.nick)] = link
            case "USER":
                link.user = params[0]
            case "JOIN":
                for channel in params[0].split(","):
                    self.members.setdefault(casefold(channel), set()).add(link.nick)
                    await link.send(f":{link.mask} JOIN :{channel}")
            case "PART":
                self.members.get(casefold(params[0]), set()).discard(link.nick)
            case "PRIVMSG":
                await self._privmsg(link.mask, link.nick, params[0], params[1])
            case "PING":
                await link.send(f":{self.HOST} PONG {self.HOST} :{params[-1]}")
            case "QUIT":
                self.quits.append((link.nick, params[0] if params else ""))
                return False
        if not link.registered and link.nick and link.user:
            link.registered = True
            await link.send(f":{self.HOST} 001 {link.nick} :Welcome")
        self._changed.unpark_all()
        return True


@asynccontextmanager
async def fake_network() -> AsyncIterator[tuple[FakeIrcd, trio.Nursery]]:
    async with trio.open_nursery() as nursery:
        yield FakeIrcd(nursery), nursery
        nursery.cancel_scope.cancel()


async def start(
    ircd: FakeIrcd, nursery: trio.Nursery, nick: str, answer: Answer, **options: Any
) -> AgentPresence:
    cooldown = options.pop("cooldown", 10.0)
    agent = AgentPresence(
        presence(nick, "#agents", cooldown=cooldown), answer, connect=ircd.connect, **options
    )
    with trio.fail_after(VIRTUAL_WAIT):
        await nursery.start(agent.run)
    await ircd.until(lambda: ircd.in_channel(nick, "#agents"))
    return agent


def pinger(delay: float) -> tuple[Answer, Answer]:
    """alice asks bob, bob answers alice; each takes ``delay`` seconds."""

    async def alice(sender: str, where: str, text: str, draft: Draft) -> str:
        await trio.sleep(delay)
        return "bob: ping"

    async def bob(sender: str, where: str, text: str, draft: Draft) -> str:
        await trio.sleep(delay)
        return "ok" if sender == "carol" else "alice: pong"

    return alice, bob


async def test_two_agents_fall_silent_after_the_cooldown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    alice_answer, bob_answer = pinger(4.0)
    async with fake_network() as (ircd, nursery):
        ircd.person("carol", "#agents")
        await start(ircd, nursery, "alice", alice_answer)
        await start(ircd, nursery, "bob", bob_answer)
        t0 = trio.current_time()
        await ircd.say("carol", "#agents", "alice: please ping your friend")
        await ircd.until(lambda: len(ircd.said(t0)) == 4)
        # bob answered alice at 8 and so answers no agent until 18: alice's ping at 12 is
        # dropped; had bob answered it, it would come before the answer to this marker.
        await ircd.say("carol", "#agents", "bob: marker")
        await ircd.until(lambda: len(ircd.said(t0)) == 6)
        assert ircd.said(t0) == [
            (0.0, "carol", "#agents", "alice: please ping your friend"),
            (4.0, "alice", "#agents", "carol: bob: ping"),
            (8.0, "bob", "#agents", "alice: pong"),
            (12.0, "alice", "#agents", "bob: ping"),
            (12.0, "carol", "#agents", "bob: marker"),
            (16.0, "bob", "#agents", "carol: ok"),
        ]


async def test_agents_with_a_slow_harness_still_stop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Answers take 11 s, longer than the 10 s cooldown: the quiet doubles and wins."""
    alice_answer, bob_answer = pinger(11.0)
    async with fake_network() as (ircd, nursery):
        ircd.person("carol", "#agents")
        await start(ircd, nursery, "alice", alice_answer)
        await start(ircd, nursery, "bob", bob_answer)
        t0 = trio.current_time()
        await ircd.say("carol", "#agents", "alice: please ping your friend")
        await ircd.until(lambda: len(ircd.said(t0)) == 6)
        await ircd.say("carol", "#agents", "bob: marker")
        await ircd.until(lambda: len(ircd.said(t0)) == 8)
        assert [(at, who, text) for at, who, _, text in ircd.said(t0)] == [
            (0.0, "carol", "alice: please ping your friend"),
            (11.0, "alice", "carol: bob: ping"),
            (22.0, "bob", "alice: pong"),  # bob quiet until 32
            (33.0, "alice", "bob: ping"),  # alice quiet until 43
            (44.0, "bob", "alice: pong"),  # second in a row: quiet 20 s, until 64
            (55.0, "alice", "bob: ping"),  # dropped by bob
            (55.0, "carol", "bob: marker"),
            (66.0, "bob", "carol: ok"),
        ]


async def test_one_answer_at_a_time_then_busy_once_per_sender(
    autojump_clock: trio.testing.MockClock,
) -> None:
    taken = trio.Event()
    release = trio.Event()

    async def slow(sender: str, where: str, text: str, draft: Draft) -> str:
        taken.set()
        await release.wait()
        return f"re {text}"

    async with fake_network() as (ircd, nursery):
        ircd.person("carol", "#agents")
        ircd.person("dave", "#agents")
        await start(ircd, nursery, "alice", slow)
        t0 = trio.current_time()
        await ircd.say("carol", "#agents", "alice: q0")
        with trio.fail_after(VIRTUAL_WAIT):
            await taken.wait()
        for n in range(1, 12):  # 8 wait, 3 are refused: carol is told once
            await ircd.say("carol", "#agents", f"alice: q{n}")
        await ircd.say("dave", "#agents", "alice: mine")

        def from_alice() -> list[str]:
            return [text for _, who, _, text in ircd.said(t0) if who == "alice"]

        # A second refusal for carol would come before dave's.
        await ircd.until(lambda: f"dave: {BUSY}" in from_alice())
        assert from_alice() == [f"carol: {BUSY}", f"dave: {BUSY}"]
        release.set()
        await ircd.until(lambda: len(from_alice()) == 2 + 9)
        assert from_alice()[2:] == [f"carol: re q{n}" for n in range(9)]


async def test_failures_become_one_line_apologies(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def troubled(sender: str, where: str, text: str, draft: Draft) -> str:
        if text == "crash":
            raise RuntimeError("Traceback (most recent call last): secret")
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async with fake_network() as (ircd, nursery):
        ircd.person("carol", "#agents")
        await start(ircd, nursery, "alice", troubled, answer_timeout=30.0)
        t0 = trio.current_time()
        await ircd.say("carol", "#agents", "alice: crash")
        await ircd.say("carol", "alice", "hang")
        await ircd.until(lambda: len(ircd.said(t0)) == 4)
        assert [entry for entry in ircd.said(t0) if entry[1] == "alice"] == [
            (0.0, "alice", "#agents", f"carol: {FAILED}"),
            (30.0, "alice", "carol", "sorry, that took too long (over 30s)"),
        ]


async def test_a_runaway_answer_is_cut_to_ten_lines(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def chatty(sender: str, where: str, text: str, draft: Draft) -> str:
        return "\n".join(f"line {n}" for n in range(1000))

    async with fake_network() as (ircd, nursery):
        ircd.person("carol", "#agents")
        await start(ircd, nursery, "alice", chatty)
        t0 = trio.current_time()
        await ircd.say("carol", "#agents", "tell me everything, alice")
        await ircd.say("carol", "#agents", "alice: again")
        await ircd.until(lambda: len(ircd.said(t0)) == 22)
        answer = ["carol: line 0", *(f"line {n}" for n in range(1, 9)), "(… 991 more lines)"]
        assert [text for _, who, _, text in ircd.said(t0) if who == "alice"] == answer * 2


async def test_retune_joins_parts_and_changes_nick(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with fake_network() as (ircd, nursery):
        ircd.person("carol", "#agents")
        agent = await start(ircd, nursery, "alice", echo, cooldown=10.0)
        agent.retune(presence("alice", "#ops", cooldown=3.0))
        await ircd.until(lambda: ircd.in_channel("alice", "#ops"))
        await ircd.until(lambda: not ircd.in_channel("alice", "#agents"))
        assert agent.policy.cooldown == 3.0
        with pytest.raises(InvalidPresence):
            agent.retune(presence("alice", "bad channel"))
        agent.retune(presence("alicia", "#ops"))
        await ircd.until(lambda: ircd.in_channel("alicia", "#ops"))
        assert ircd.quits == [("alice", "reconnecting as alicia")]
        t0 = trio.current_time()
        await ircd.say("carol", "alicia", "still there?")
        await ircd.until(lambda: len(ircd.said(t0)) == 2)
        assert ircd.said(t0)[1][1:] == ("alicia", "carol", "still there?")
        with trio.fail_after(VIRTUAL_WAIT):
            await agent.leave("done")
        await ircd.until(lambda: ("alicia", "done") in ircd.quits)


async def test_leave_before_registration(autojump_clock: trio.testing.MockClock) -> None:
    dialled = trio.Event()
    servers: list[trio.abc.Stream] = []

    async def silent(host: str, port: int) -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        servers.append(server)  # a server that never answers
        dialled.set()
        return client

    agent = AgentPresence(presence("alice"), echo, connect=silent)
    with trio.fail_after(VIRTUAL_WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.run)
            await dialled.wait()
            asked = trio.current_time()
            await agent.leave("bye")  # no QUIT to wait for: nobody knows us yet
            assert trio.current_time() == asked
    assert agent.client is not None and not agent.client.registered


# --- against a real ngircd ------------------------------------------------------------------


@pytest.fixture
async def ircd() -> AsyncIterator[Ircd]:
    async with ircd_server() as server:
        yield server


@asynccontextmanager
async def agent_on(
    ircd: Ircd, nick: str, answer: Answer, *channels: str, cooldown: float = 10.0
) -> AsyncIterator[AgentPresence]:
    agent = AgentPresence(
        presence(nick, *channels, host=ircd.host, port=ircd.port, cooldown=cooldown), answer
    )
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT):
            await nursery.start(agent.run)
        yield agent
        with trio.fail_after(WAIT):
            await agent.leave("test over")


async def joined(someone: Person, *nicks: str) -> None:
    """Wait until ``someone`` has seen each of ``nicks`` join a channel."""
    waiting = set(nicks)
    while waiting:
        event = await someone.aexpect(
            f"{', '.join(sorted(waiting))} joining",
            lambda e: e.type == "join" and e.source.nick in waiting,
        )
        waiting.discard(event.source.nick)


@needs_ngircd
async def test_ngircd_answers_mentions_and_private_messages(ircd: Ircd) -> None:
    calls: list[tuple[str, str, str]] = []

    async def answer(sender: str, where: str, text: str, draft: Draft) -> str:
        calls.append((sender, where, text))
        return f"you said {text}"

    async with person(ircd.address, "carol", "#agents", "#ops") as carol:
        async with agent_on(ircd, "alice", answer, "#agents", "#ops"):
            joins = {(await carol.next_from("alice")).target for _ in range(2)}
            assert joins == {"#agents", "#ops"}
            carol.do("privmsg", "#agents", "just chatting, nobody asked")
            carol.do("privmsg", "#agents", "malice and alice_ are not her")
            carol.do("privmsg", "#ops", "ALICE: what is 2+2?")
            reply = await carol.next_from("alice")  # nothing for the chatter before it
            assert (reply.type, reply.target) == ("pubmsg", "#ops")
            assert reply.arguments[0] == "carol: you said what is 2+2?"
            carol.do("privmsg", "#agents", "is alice around?")
            reply = await carol.next_from("alice")
            assert (reply.target, reply.arguments[0]) == (
                "#agents",
                "carol: you said is alice around?",
            )
            carol.do("privmsg", "alice", "a secret")
            reply = await carol.next_from("alice")
            assert (reply.type, reply.target, reply.arguments[0]) == (
                "privmsg",
                "carol",
                "you said a secret",
            )
            assert calls == [
                ("carol", "#ops", "what is 2+2?"),
                ("carol", "#agents", "is alice around?"),
                ("carol", "private", "a secret"),
            ]


@needs_ngircd
async def test_ngircd_joins_when_invited_and_stays_out_when_kicked(ircd: Ircd) -> None:
    async with person(ircd.address, "carol", "#agents", "#other") as carol:
        async with agent_on(ircd, "alice", echo, "#agents"):
            await joined(carol, "alice")
            carol.do("invite", "alice", "#other")
            join = await carol.next_from("alice")
            assert (join.type, join.target) == ("join", "#other")
            carol.do("privmsg", "#other", "alice: hello here")
            assert (await carol.next_from("alice")).arguments[0] == "carol: hello here"
            carol.do("kick", "#other", "alice", "out")
            await carol.aexpect(
                "alice kicked", lambda e: e.type == "kick" and e.arguments[0] == "alice"
            )
            carol.do("privmsg", "alice", "marker")
            reply = await carol.next_from("alice")  # a rejoin would come before it
            assert (reply.type, reply.arguments[0]) == ("privmsg", "marker")


@needs_ngircd
async def test_ngircd_leave_quits_with_the_message(ircd: Ircd) -> None:
    async with person(ircd.address, "carol", "#agents") as carol:
        agent = AgentPresence(presence("alice", host=ircd.host, port=ircd.port), echo)
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                await nursery.start(agent.run)
                await joined(carol, "alice")
                await agent.leave("stopping")
            # run() has returned: the nursery closed by itself
        gone = await carol.next_from("alice")
        assert gone.type == "quit" and "stopping" in gone.arguments[0]


@needs_ngircd
async def test_ngircd_two_agents_do_not_loop(ircd: Ircd) -> None:
    # The cooldown is long so that no wall-clock delay can let a third round through;
    # nothing in the test waits for it to pass.
    alice_answer, bob_answer = pinger(0.0)
    async with person(ircd.address, "carol", "#agents") as carol:
        async with agent_on(ircd, "alice", alice_answer, cooldown=60.0):
            async with agent_on(ircd, "bob", bob_answer, cooldown=60.0):
                await joined(carol, "alice", "bob")
                carol.do("privmsg", "#agents", "alice: please ping your friend")
                heard: list[tuple[str, str]] = []
                for _ in range(3):
                    message = await carol.message_in("#agents")
                    heard.append((message.source.nick, message.arguments[0]))
                carol.do("privmsg", "#agents", "bob: marker")
                message = await carol.message_in("#agents")  # a third round would come first
                heard.append((message.source.nick, message.arguments[0]))
                assert heard == [
                    ("alice", "carol: bob: ping"),
                    ("bob", "alice: pong"),
                    ("alice", "bob: ping"),
                    ("bob", "carol: ok"),
                ]


@needs_ngircd
async def test_ngircd_line_breaks_cannot_make_commands(ircd: Ircd) -> None:
    async def unescape(sender: str, where: str, text: str, draft: Draft) -> str:
        # A harness whose output has every kind of line break and a NUL.
        return text.replace(" | ", "\r\n").replace(" / ", "\r").replace(" ~ ", "\n\x00")

    async with person(ircd.address, "carol", "#agents", "#evil") as carol:
        async with agent_on(ircd, "alice", unescape):
            await joined(carol, "alice")
            carol.do("privmsg", "alice", "say | QUIT :gotcha / JOIN #evil ~ PRIVMSG #evil :pwned")
            seen = [await carol.next_from("alice") for _ in range(4)]
            assert [(e.type, e.arguments[0]) for e in seen] == [
                ("privmsg", "say"),
                ("privmsg", "QUIT :gotcha"),
                ("privmsg", "JOIN #evil"),
                ("privmsg", "PRIVMSG #evil :pwned"),
            ]
            carol.do("privmsg", "alice", "still there?")
            reply = await carol.next_from("alice")
            assert (reply.type, reply.arguments[0]) == ("privmsg", "still there?")


def test_an_answer_line_is_one_wire_line() -> None:
    lines = reply_lines("a\r\nQUIT :x\x00\rb", prefix="carol: ", budget=400)
    assert lines == ["carol: a", "QUIT :x", "b"]
    for line in lines:
        wire = privmsg("#agents", line)
        assert wire.count(b"\r\n") == 1 and len(wire) <= MAX_LINE


async def test_lines_written_to_the_draft_go_out_before_the_answer_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def streaming(sender: str, where: str, text: str, draft: Draft) -> str:
        draft.write("first line\nsecond ")
        await trio.sleep(100)
        if text == "fail":
            draft.write("line\nthird, never finished")
            await trio.sleep(100)
            raise RuntimeError("the model went away")
        draft.write("line\n")
        return "first line\nsecond line\nlast"

    async with fake_network() as (ircd, nursery):
        ircd.person("carol", "#agents")
        await start(ircd, nursery, "alice", streaming)
        t0 = trio.current_time()
        await ircd.say("carol", "#agents", "alice: go")
        await ircd.until(lambda: len(ircd.said(t0)) == 4)
        assert [entry for entry in ircd.said(t0) if entry[1] == "alice"] == [
            (0.0, "alice", "#agents", "carol: first line"),
            (100.0, "alice", "#agents", "second line"),
            (100.0, "alice", "#agents", "last"),
        ]
        # A failure after lines went out: they stay, the apology ends the answer.
        await ircd.say("carol", "alice", "fail")
        await ircd.until(lambda: len(ircd.said(t0)) == 8)
        t1 = ircd.said(t0)[4][0]
        assert ircd.said(t0)[5:] == [
            (t1, "alice", "carol", "first line"),
            (t1 + 100, "alice", "carol", "second line"),
            (t1 + 200, "alice", "carol", FAILED),
        ]
