"""Generated senders, texts and IRC events against the overseer's door: the
command parser (``commands.parse``) and the sans-I/O ``OperatorGate``.

Two kinds of run:

* Anything at all: any sender, any text, any channel, NICK/QUIT/JOIN/PART/KICK
  about anyone, WHOIS answers nobody asked for or never sent, in any order, at
  any time, over any rate. Checked after every step: no exception escapes;
  the gate's memory stays within its bounds; and no command is obeyed without
  a proof fed to the gate before it: a WHOIS answer about that nick, that
  user@host, saying operator (or a listed account), no older than the cache
  lifetime, and with no visible change of hands of the nick (QUIT, NICK, PART,
  KICK, the overseer's own rejoin or reconnect) between the command and its
  verdict.
* An honest server with people on it (``World``): operators, impostors who copy
  an operator's user@host, people who /OPER and drop it, take each other's
  nicks, leave and come back; the server answers WHOIS in order with the truth
  at the moment it answers, late, or never (the connection drops). Checked:
  the gate's view of the channel is the server's; a command is only obeyed for
  someone who is, or was within the cache lifetime, an IRC operator, the one
  exception being the race WHOIS cannot see (a nick that changes hands outside
  the channel, between question and answer, to an operator with the very same
  user@host); once every answer is in, every command has had exactly one
  verdict.

Each runs a bounded number of examples; ``FIRECLAW_FUZZ_EXAMPLES=N`` makes a
longer campaign (as in test_fuzz.py).
"""

from __future__ import annotations

import fnmatch
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

from fireclaw.config import CommandRateSpec, IrcSpec
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
from fireclaw.supervisor import commands as c
from fireclaw.supervisor import operators
from fireclaw.supervisor.operators import (
    CACHE_TTL,
    Obey,
    OperatorGate,
    Refuse,
    Throttle,
    Whois,
    fold,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("FIRECLAW_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

CONTROL = "#control"
MASKS = ("*!*@127.0.0.1", "op*!~op@*")
ACCOUNTS = ("alice",)
#: Small bounds, so that generated runs reach them.
SMALL_SENDERS = 6
SMALL_WAITING = 4


def spec(auth: str, rate: CommandRateSpec) -> IrcSpec:
    accounts = ACCOUNTS if auth == "account" else ()
    return IrcSpec(
        server="irc.example:6667",
        operator_auth=auth,  # type: ignore[arg-type]
        operators=MASKS,
        operator_accounts=accounts,
        command_rate=rate,
    )


def matches(message: Message) -> bool:
    mask = f"{message.source}!{message.user}@{message.host}".lower()
    return any(fnmatch.fnmatchcase(mask, pattern.lower()) for pattern in MASKS)


def check_bounds(gate: OperatorGate) -> None:
    """What the gate holds stays within its limits, and agrees with itself."""
    assert len(gate._senders) <= operators.MAX_SENDERS
    waiting = [len(ask.waiting) for asks in gate._questions.values() for ask in asks]
    assert sum(waiting) == gate._waiting <= operators.MAX_WAITING
    assert all(n > 0 for n in waiting)  # no question outlives its commands
    assert all(asks for asks in gate._questions.values())
    assert set(gate.known) <= gate.members  # a cached proof only for a channel member


# --- the parser -------------------------------------------------------------------------

command_texts = st.one_of(
    st.text(max_size=80),
    st.builds(
        lambda verb, args: f"!{verb} {args}",
        st.sampled_from([*c.HELP, "LIST", "Reset", "nope", ""]),
        st.text(max_size=60),
    ),
    st.from_regex(r"\A![a-z]{1,9}( [!-~]{0,12}){0,4}\Z"),
    # Control characters inside a verb or an argument: a line break, NUL, an ANSI sequence.
    st.builds(
        lambda head, ctl, tail: f"!{head}{ctl}{tail}",
        st.sampled_from(["li", "scale", "help", "x"]),
        st.sampled_from(["\n", "\r", "\x00", "\x1b[2J", "\x7f", "\u2028", "\t"]),
        st.sampled_from(["st", " worker 3", "", " !help\x07"]),
    ),
)


#: Commands whose class is not named for their verb (``Usage`` is the parser's answer
#: to a bad command).
CLASS_OF_VERB = {"usage": "usageof"}


@FUZZ
@given(command_texts)
@example("!usage")
@example("!USAGE alice")
def test_the_parser_answers_any_text_in_one_line(text: str) -> None:
    parsed = c.parse(text)
    if isinstance(parsed, c.Usage):
        assert parsed.message and parsed.message.isprintable(), parsed
        assert len(parsed.message) <= 200
    elif parsed is not None:
        assert text.strip().startswith(c.PREFIX)
        verb = text[: c.MAX_TEXT].strip()[1:].partition(" ")[0].lower()
        assert verb in c.HELP
        assert type(parsed).__name__.lower() == CLASS_OF_VERB.get(verb, verb)


# --- anything at all --------------------------------------------------------------------


# Mostly a few values, so that senders, answers and events often meet; now and
# then anything at all.
def _mostly(few: list[str], anything: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    common = st.sampled_from(few)
    return st.one_of(common, common, common, anything)


nicks = _mostly(["op", "OP", "eve"], st.text(min_size=1, max_size=12))
users = _mostly(["~op", "~eve"], st.text(max_size=8))
hosts = _mostly(["127.0.0.1", "10.0.0.9"], st.text(max_size=8))
channels = _mostly([CONTROL, "#CONTROL", "#agents"], st.text(max_size=8))
accounts = st.one_of(st.none(), st.sampled_from(["alice", "ALICE", "bob"]), st.text(max_size=6))
texts = _mostly(["!status", "!scale worker 3", "!reset worker-0"], command_texts)

messages = st.builds(
    lambda source, user, host, private, target, text: Message(
        source=source,
        user=user,
        host=host,
        target="overseer" if private else target,
        text=text,
        private=private,
    ),
    nicks,
    users,
    hosts,
    st.booleans(),
    channels,
    texts,
)
events: st.SearchStrategy[Event] = st.one_of(
    st.builds(
        WhoisReply,
        nick=nicks,
        user=st.one_of(st.none(), users),
        host=st.one_of(st.none(), hosts),
        operator=st.booleans(),
        account=accounts,
    ),
    st.builds(Names, channel=channels, nicks=st.lists(nicks, max_size=5).map(tuple)),
    st.builds(UserJoined, nick=nicks, user=users, host=hosts, channel=channels),
    st.builds(UserParted, nick=nicks, channel=channels),
    st.builds(UserQuit, nick=nicks),
    st.builds(UserRenamed, old=nicks, new=nicks),
    st.builds(Joined, channel=channels),
    st.builds(Kicked, channel=channels, by=nicks, reason=st.text(max_size=5)),
    st.builds(Disconnected, reason=st.text(max_size=5)),
)
steps = st.lists(
    st.tuples(
        st.sampled_from([0.0, 0.0, 0.5, 1.0, 3.0, CACHE_TTL - 1, CACHE_TTL, CACHE_TTL + 1]),
        # "echo": a WHOIS answer about the last sender, maybe someone else with the
        # nick; "member": the last sender joins the control channel; "again": the
        # last sender says another command.
        st.one_of(
            messages,
            messages,
            events,
            st.tuples(st.just("echo"), st.booleans(), st.booleans()),
            st.tuples(st.just("member")),
            st.tuples(st.just("again"), st.booleans()),
        ),
    ),
    min_size=20,
    max_size=100,
)
rates = st.sampled_from(
    [
        CommandRateSpec(per_minute=6000, burst=1000),
        CommandRateSpec(per_minute=60, burst=2),
        CommandRateSpec(per_minute=1, burst=1),
    ]
)


@dataclass
class _Proof:
    nick: str
    user: str | None
    host: str | None
    operator: bool
    account: str | None
    at: float
    epoch: int


class _Changes:
    """Visible changes of hands, per folded nick: a proof or a question from
    before a change must not decide a command after it."""

    def __init__(self) -> None:
        self.per_nick: dict[str, int] = {}
        self.everyone = 0

    def of(self, nick: str) -> int:
        return self.everyone * 1_000_000 + self.per_nick.get(fold(nick), 0)

    def feed(self, event: Event) -> None:
        match event:
            case UserQuit(nick=nick):
                self._bump(nick)
            case UserRenamed(old=old, new=new):
                self._bump(old)
                self._bump(new)
            case UserParted(nick=nick, channel=channel) if channel.lower() == CONTROL:
                self._bump(nick)
            case Joined(channel=channel) | Kicked(channel=channel) if channel.lower() == CONTROL:
                self.everyone += 1
            case Disconnected():
                self.everyone += 1

    def _bump(self, nick: str) -> None:
        key = fold(nick)
        self.per_nick[key] = self.per_nick.get(key, 0) + 1


def proven(auth: str, proof: _Proof) -> bool:
    if auth == "oper":
        return proof.operator
    return proof.account is not None and proof.account.lower() in ACCOUNTS


_OP = Message(
    source="op", user="~op", host="127.0.0.1", target=CONTROL, text="!status", private=False
)
_FAST = CommandRateSpec(per_minute=6000, burst=1000)
#: Sequences that reach the gate's subtler rules, run every time besides the generated ones:
#: a cached yes that expired, a nick renamed into a cached one, an answer after a QUIT.
_SEEDS = [
    [(0.0, _OP), (0.0, ("member",)), (0.0, ("echo", True, False)), (CACHE_TTL, ("again", 0))],
    [
        (0.0, _OP),
        (0.0, ("member",)),
        (0.0, ("echo", True, False)),
        (1.0, UserRenamed(old="eve", new="OP")),
        (0.0, ("again", 0)),
    ],
    [(0.0, _OP), (0.0, UserQuit(nick="op")), (0.0, ("echo", True, False))],
]


@FUZZ
@given(st.sampled_from(["oper", "account", "hostmask"]), rates, steps)
@example("oper", _FAST, _SEEDS[0])
@example("oper", _FAST, _SEEDS[1])
@example("account", _FAST, _SEEDS[2])
def test_anything_at_all_obeys_only_on_proof(
    auth: str, rate: CommandRateSpec, program: list[tuple[float, Any]]
) -> None:
    with (
        mock.patch.object(operators, "MAX_SENDERS", SMALL_SENDERS),
        mock.patch.object(operators, "MAX_WAITING", SMALL_WAITING),
    ):
        gate = OperatorGate(spec(auth, rate))
        changes = _Changes()
        proofs: list[_Proof] = []
        submitted: dict[int, int] = {}  # id(message) -> the nick's epoch when it came in
        alive: list[Message] = []  # every message stays alive, so no id() is reused
        decided: set[int] = set()
        now = 0.0
        last: Message | None = None
        for step, item in program:
            now += step
            if isinstance(item, tuple):
                if last is None:
                    continue
                if item[0] == "again":
                    item = Message(
                        source=last.source,
                        user=last.user,
                        host=last.host,
                        target=last.target,
                        text="!list" if item[1] else last.text,
                        private=last.private,
                    )
                elif item[0] == "member":
                    item = UserJoined(
                        nick=last.source, user=last.user, host=last.host, channel=CONTROL
                    )
                else:
                    _, yes, other = item
                    item = WhoisReply(
                        nick=last.source,
                        user="~someone" if other else last.user,
                        host=last.host,
                        operator=yes,
                        account="alice" if yes else None,
                    )
            if isinstance(item, Message):
                last = item
                alive.append(item)
                command = c.parse(item.text)
                if command is None:
                    continue
                submitted[id(item)] = changes.of(item.source)
                actions = gate.submit(item, command, now)
            else:
                changes.feed(item)
                if isinstance(item, WhoisReply):
                    proofs.append(
                        _Proof(
                            nick=fold(item.nick),
                            user=item.user,
                            host=item.host,
                            operator=item.operator,
                            account=item.account,
                            at=now,
                            epoch=changes.of(item.nick),
                        )
                    )
                actions = gate.on_event(item, now)
            for action in actions:
                if isinstance(action, Obey | Refuse | Throttle):
                    key = id(action.message)
                    assert key not in decided, f"decided twice: {action}"
                    decided.add(key)
                if isinstance(action, Obey):
                    check_obeyed(auth, action.message, now, proofs, changes, submitted)
                if isinstance(action, Whois):
                    assert auth != "hostmask"
            check_bounds(gate)


def check_obeyed(
    auth: str,
    message: Message,
    now: float,
    proofs: list[_Proof],
    changes: _Changes,
    submitted: dict[int, int],
) -> None:
    assert matches(message), f"obeyed outside the masks: {message}"
    if auth == "hostmask":
        return
    epoch = changes.of(message.source)
    assert submitted[id(message)] == epoch, f"obeyed across a change of hands: {message}"
    assert any(
        proof.nick == fold(message.source)
        and (proof.user, proof.host) == (message.user, message.host)
        and proven(auth, proof)
        and now - proof.at < CACHE_TTL
        and proof.epoch == epoch
        for proof in proofs
    ), f"obeyed without a proof: {message}"


# --- an honest server with people on it ------------------------------------------------

NICKS = ("op", "OP", "eve")
#: user@host of operators and of everyone else; an impostor copies an operator's.
IDENTITIES = (("~op", "127.0.0.1"), ("~eve", "127.0.0.1"))


@dataclass
class Person:
    ident: int
    nick: str
    user: str
    host: str
    operator: bool = False
    #: When they last stopped being an operator (the gate may trust a yes that long).
    deopered_at: float = -1e9
    in_channel: bool = False


@dataclass
class _Asked:
    nick: str
    epoch: int


@dataclass
class World:
    """The server's truth; the gate is fed what the overseer would see of it:
    nothing of the channel while it is out of it (kicked), nothing at all while
    its connection is down."""

    gate: OperatorGate
    now: float = 0.0
    people: list[Person] = field(default_factory=list)
    whois: deque[_Asked] = field(default_factory=deque)
    changes: _Changes = field(default_factory=_Changes)
    sent: dict[int, tuple[Message, Person]] = field(default_factory=dict)
    verdicts: dict[int, list[str]] = field(default_factory=dict)
    seq: int = 0
    connected: bool = True
    present: bool = False  # the overseer is in the channel

    def holder(self, nick: str) -> Person | None:
        return next((p for p in self.people if fold(p.nick) == fold(nick)), None)

    def feed(self, event: Event, answered: tuple[_Asked, Person] | None = None) -> None:
        self.changes.feed(event)
        self.act(self.gate.on_event(event, self.now), answered)

    def seen(self, event: Event, p: Person) -> None:
        """``event`` about ``p`` reaches the overseer only through the channel they share."""
        if p.in_channel and self.present:
            self.feed(event)

    def act(self, actions: list[Any], answered: tuple[_Asked, Person] | None = None) -> None:
        for action in actions:
            match action:
                case Whois(nick=nick):
                    self.whois.append(_Asked(nick, self.changes.of(nick)))
                case Obey(message=m) | Refuse(message=m) | Throttle(message=m):
                    key = id(m)
                    self.verdicts.setdefault(key, []).append(type(action).__name__)
                    if isinstance(action, Obey):
                        self.check_obeyed(m, answered)

    def check_obeyed(self, m: Message, answered: tuple[_Asked, Person] | None) -> None:
        _, sender = self.sent[id(m)]
        if sender.operator or self.now - sender.deopered_at < CACHE_TTL:
            return
        # WHOIS cannot tell apart two people who share a nick's history and a
        # user@host: the nick handed over unseen (outside the channel) between
        # the question and its answer.
        assert answered is not None, f"obeyed {sender} on an old proof: {m.text!r}"
        asked, holder = answered
        assert holder is not sender and holder.operator, f"obeyed {sender}: {m.text!r}"
        assert (holder.user, holder.host) == (sender.user, sender.host)
        assert self.changes.of(asked.nick) == asked.epoch, "the change of hands was seen"

    # -- what people do ---------------------------------------------------------------

    def connect(self, nick: str, ident: int, join: bool, operator: bool) -> None:
        if self.holder(nick) is None:
            user, host = IDENTITIES[ident]
            self.seq += 1
            person = Person(self.seq, nick, user, host, operator=operator)
            self.people.append(person)
            if join:
                self.join(person)

    def handover(self, nick: str, ident: int, join: bool, operator: bool) -> None:
        """Whoever has ``nick`` quits, and someone (else) connects with it."""
        old = self.holder(nick)
        if old is not None:
            self.quit(old)
        self.connect(nick, ident, join, operator)

    def join(self, p: Person) -> None:
        if not p.in_channel:
            p.in_channel = True
            self.seen(UserJoined(nick=p.nick, user=p.user, host=p.host, channel=CONTROL), p)

    def leave_channel(self, p: Person) -> None:
        if p.in_channel:
            self.seen(UserParted(nick=p.nick, channel=CONTROL), p)
            p.in_channel = False

    def quit(self, p: Person) -> None:
        self.people.remove(p)
        self.seen(UserQuit(nick=p.nick), p)

    def rename(self, p: Person, new: str) -> None:
        other = self.holder(new)
        if other is not None and other is not p:
            return
        old, p.nick = p.nick, new
        self.seen(UserRenamed(old=old, new=new), p)

    def set_operator(self, p: Person, operator: bool) -> None:
        if p.operator and not operator:
            p.deopered_at = self.now
        p.operator = operator  # a MODE on oneself: nobody else sees it

    def say(self, p: Person, private: bool, text: str) -> None:
        if not self.connected or (not private and not (p.in_channel and self.present)):
            return  # nobody hears it (the channel is +n)
        m = Message(
            source=p.nick,
            user=p.user,
            host=p.host,
            target="overseer" if private else CONTROL,
            text=text,
            private=private,
        )
        command = c.parse(text)
        assert command is not None
        self.sent[id(m)] = (m, p)
        self.act(self.gate.submit(m, command, self.now))

    def answer(self) -> None:
        """The server's answer to the oldest question: the truth about the nick now."""
        if not self.connected or not self.whois:
            return
        asked = self.whois.popleft()
        p = self.holder(asked.nick)
        if p is None:
            self.feed(WhoisReply(nick=asked.nick))
        else:
            reply = WhoisReply(nick=p.nick, user=p.user, host=p.host, operator=p.operator)
            self.feed(reply, answered=(asked, p))

    def kicked(self) -> None:
        if self.present:
            self.present = False
            self.feed(Kicked(channel=CONTROL, by="chanop", reason="out"))

    def disconnect(self) -> None:
        """The overseer's connection drops, and its questions with it."""
        if self.connected:
            self.connected = self.present = False
            self.whois.clear()
            self.feed(Disconnected(reason="gone"))

    def rejoin(self) -> None:
        """The overseer (re)connects if need be and joins: JOIN, then NAMES."""
        if not self.present:
            self.connected = self.present = True
            self.feed(Joined(channel=CONTROL))
            self.names()

    def names(self) -> None:
        if self.present:
            self.feed(
                Names(channel=CONTROL, nicks=tuple(p.nick for p in self.people if p.in_channel))
            )

    def check(self) -> None:
        check_bounds(self.gate)
        if self.present:
            assert self.gate.members == {fold(p.nick) for p in self.people if p.in_channel}


_PERSON_VERBS = ("say", "rename", "quit", "join", "part", "oper", "deoper")
_TEXTS = ["!status", "!scale worker 9", "!reset worker-0"]
doings = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(["connect", "handover"]),
            st.sampled_from(NICKS),
            st.integers(0, len(IDENTITIES) - 1),
            st.booleans(),
            st.booleans(),
        ),
        st.tuples(st.just("say"), st.integers(0, 7), st.booleans(), st.sampled_from(_TEXTS)),
        st.tuples(st.just("rename"), st.integers(0, 7), st.sampled_from(NICKS)),
        st.tuples(st.sampled_from(["quit", "join", "part", "oper", "deoper"]), st.integers(0, 7)),
        st.tuples(st.sampled_from(["answer", "answer", "answer", "answer"])),
        st.tuples(st.sampled_from(["kicked", "disconnect", "rejoin", "rejoin", "names"])),
        st.tuples(st.just("tick"), st.sampled_from([1.0, 10.0, CACHE_TTL / 2, CACHE_TTL])),
    ),
    min_size=20,
    max_size=100,
)


@FUZZ
@given(doings)
def test_an_honest_server_with_impostors_obeys_only_operators(
    program: list[tuple[Any, ...]],
) -> None:
    world = World(gate=OperatorGate(spec("oper", CommandRateSpec(per_minute=6000, burst=1000))))
    world.rejoin()
    for verb, *args in program:
        person = None
        if verb in _PERSON_VERBS and world.people:
            person = world.people[args[0] % len(world.people)]
        match verb:
            case "connect":
                world.connect(*args)
            case "handover":
                world.handover(*args)
            case "tick":
                world.now += args[0]
            case "answer":
                world.answer()
            case "kicked":
                world.kicked()
            case "disconnect":
                world.disconnect()
            case "rejoin":
                world.rejoin()
            case "names":
                world.names()
            case _ if person is None:
                pass
            case "say":
                world.say(person, args[1], args[2])
            case "rename":
                world.rename(person, args[1])
            case "quit":
                world.quit(person)
            case "join":
                world.join(person)
            case "part":
                world.leave_channel(person)
            case "oper":
                world.set_operator(person, True)
            case "deoper":
                world.set_operator(person, False)
        world.check()
    world.rejoin()
    while world.whois:  # every answer comes in at last: nothing waits for ever
        world.answer()
        world.check()
    for key, (m, _) in world.sent.items():
        verdicts = world.verdicts.get(key, [])
        assert len(verdicts) == 1, f"{m.text!r} from {m.source}: {verdicts}"
    assert world.gate._waiting == 0 and not world.gate._questions
