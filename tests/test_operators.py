"""fireclaw.supervisor.operators: who may command the overseer, decided sans I/O.

IRC events go in as the session makes them; the time is trio's, under the
MockClock where it matters.
"""

from __future__ import annotations

from typing import Any

import trio
from fireclaw.config import CommandRateSpec, IrcSpec
from fireclaw.guest_daemon.irc_events import (
    Disconnected,
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
from fireclaw.supervisor.operators import (
    CACHE_TTL,
    MAX_WAITING,
    Obey,
    OperatorGate,
    Refuse,
    Throttle,
    Whois,
)

CONTROL = "#control"
STATUS = c.Status()


def gate(**fields: Any) -> OperatorGate:
    fields.setdefault("command_rate", CommandRateSpec(per_minute=6000, burst=1000))
    return OperatorGate(IrcSpec(server="irc.example:6667", **fields))


def said(
    nick: str = "op",
    *,
    user: str = "~op",
    host: str = "127.0.0.1",
    private: bool = False,
    text: str = "!status",
) -> Message:
    target = "overseer" if private else CONTROL
    return Message(source=nick, user=user, host=host, target=target, text=text, private=private)


def oper_reply(nick: str = "op", *, user: str = "~op", operator: bool = True) -> WhoisReply:
    return WhoisReply(nick=nick, user=user, host="127.0.0.1", operator=operator)


def in_channel(g: OperatorGate, *nicks: str) -> None:
    g.on_event(Names(channel=CONTROL, nicks=nicks), 0.0)


def verdicts(actions: list[Any]) -> list[str]:
    """Each action in a word, for short asserts."""
    words = []
    for action in actions:
        match action:
            case Obey():
                words.append("obey")
            case Refuse(reason=reason):
                words.append(f"refuse: {reason}")
            case Whois(nick=nick):
                words.append(f"whois {nick}")
            case Throttle(first=first):
                words.append("throttle" + (" (say so)" if first else ""))
    return words


# --- masks and modes -------------------------------------------------------------------


def test_a_sender_outside_the_masks_is_refused_without_asking() -> None:
    g = gate(operators=("op!*@127.0.0.1",))
    assert verdicts(g.submit(said("eve"), STATUS, 0.0)) == ["refuse: mask"]
    assert verdicts(g.submit(said("op", host="10.0.0.9"), STATUS, 0.0)) == ["refuse: mask"]


def test_hostmask_mode_obeys_the_mask_alone() -> None:
    g = gate(operator_auth="hostmask")
    assert verdicts(g.submit(said("anyone"), STATUS, 0.0)) == ["obey"]
    assert verdicts(g.submit(said("x", host="192.0.2.1"), STATUS, 0.0)) == ["refuse: mask"]


def test_oper_mode_asks_the_server_and_obeys_an_irc_operator() -> None:
    g = gate()
    in_channel(g, "op", "eve")
    assert verdicts(g.submit(said("op"), STATUS, 0.0)) == ["whois op"]
    assert verdicts(g.on_event(oper_reply("op"), 0.0)) == ["obey"]
    assert verdicts(g.submit(said("eve", user="~eve"), STATUS, 0.0)) == ["whois eve"]
    reply = oper_reply("eve", user="~eve", operator=False)
    assert verdicts(g.on_event(reply, 0.0)) == ["refuse: not operator"]


def test_account_mode_wants_a_listed_account() -> None:
    g = gate(operator_auth="account", operator_accounts=("Alice",))
    in_channel(g, "op")
    for account, verdict in [
        ("alice", "obey"),  # account names compare without case
        ("bob", "refuse: no operator account"),
        (None, "refuse: no operator account"),
    ]:
        g.on_event(UserQuit(nick="op"), 0.0)  # forget the last answer
        in_channel(g, "op")
        assert verdicts(g.submit(said(), STATUS, 0.0)) == ["whois op"]
        reply = WhoisReply(nick="op", user="~op", host="127.0.0.1", account=account)
        assert verdicts(g.on_event(reply, 0.0)) == [verdict]
    # Being an IRC operator is not an account.
    g.on_event(UserQuit(nick="op"), 0.0)
    g.submit(said(), STATUS, 0.0)
    assert verdicts(g.on_event(oper_reply(), 0.0)) == ["refuse: no operator account"]


def test_an_answer_about_someone_else_refuses() -> None:
    g = gate()
    g.submit(said(user="~op"), STATUS, 0.0)
    assert verdicts(g.on_event(oper_reply(user="~other"), 0.0)) == ["refuse: changed hands"]
    g.submit(said(), STATUS, 0.0)
    assert verdicts(g.on_event(WhoisReply(nick="op"), 0.0)) == ["refuse: changed hands"]


# --- the cache ------------------------------------------------------------------------


def test_a_yes_about_a_channel_member_is_cached() -> None:
    g = gate()
    in_channel(g, "op")
    assert verdicts(g.submit(said(), STATUS, 0.0)) == ["whois op"]
    g.on_event(oper_reply(), 0.0)
    assert verdicts(g.submit(said(), STATUS, 1.0)) == ["obey"]
    # Still bound to the user@host the answer named.
    assert verdicts(g.submit(said(user="~eve"), STATUS, 1.0)) == ["whois op"]


def test_a_no_is_not_cached_so_an_oper_counts_at_once() -> None:
    g = gate()
    in_channel(g, "op")
    g.submit(said(), STATUS, 0.0)
    assert verdicts(g.on_event(oper_reply(operator=False), 0.0)) == ["refuse: not operator"]
    assert verdicts(g.submit(said(), STATUS, 1.0)) == ["whois op"]  # after /OPER
    assert verdicts(g.on_event(oper_reply(), 1.0)) == ["obey"]


def test_a_sender_not_seen_in_the_channel_is_asked_every_time() -> None:
    g = gate()
    for _ in range(3):
        assert verdicts(g.submit(said(private=True), STATUS, 0.0)) == ["whois op"]
        assert verdicts(g.on_event(oper_reply(), 0.0)) == ["obey"]
    assert g.known == {}


def cached(g: OperatorGate, nick: str = "op") -> None:
    in_channel(g, nick)
    g.submit(said(nick), STATUS, 0.0)
    g.on_event(oper_reply(nick), 0.0)
    assert verdicts(g.submit(said(nick), STATUS, 0.0)) == ["obey"]


def test_every_way_a_nick_changes_hands_drops_it() -> None:
    ways = [
        UserQuit(nick="op"),
        UserQuit(nick="OP"),  # the server's case may differ from ours
        UserRenamed(old="op", new="op_away"),
        UserParted(nick="op", channel=CONTROL),  # PART, or a KICK of op
        UserParted(nick="op", channel="#CONTROL"),
        Joined(channel=CONTROL),  # the overseer rejoined: a fresh NAMES follows
        Kicked(channel=CONTROL, by="someone", reason=""),
        Disconnected(reason="gone"),
    ]
    for event in ways:
        g = gate()
        cached(g)
        g.on_event(event, 0.0)
        assert verdicts(g.submit(said(), STATUS, 0.0)) == ["whois op"], event
        assert "op" not in g.known


def test_a_nick_renamed_into_is_asked_about() -> None:
    g = gate()
    cached(g, "op")
    cached(g, "other")
    g.on_event(UserRenamed(old="other", new="op"), 0.0)  # impossible unless op left unseen
    assert verdicts(g.submit(said("op"), STATUS, 0.0)) == ["whois op"]


def test_events_elsewhere_keep_the_cache() -> None:
    g = gate()
    cached(g)
    g.on_event(UserParted(nick="op", channel="#agents"), 0.0)
    g.on_event(UserQuit(nick="someone"), 0.0)
    g.on_event(UserJoined(nick="eve", user="e", host="h", channel=CONTROL), 0.0)
    assert verdicts(g.submit(said(), STATUS, 0.0)) == ["obey"]


def test_a_nick_that_changes_hands_while_asked_about_is_refused() -> None:
    g = gate()
    in_channel(g, "op")
    assert verdicts(g.submit(said(), STATUS, 0.0)) == ["whois op"]
    g.on_event(UserQuit(nick="op"), 0.0)  # gone before the answer: it describes someone new
    g.on_event(UserJoined(nick="op", user="~op", host="127.0.0.1", channel=CONTROL), 0.0)
    # The newcomer's own command is a new question, not glued to the spoilt one.
    assert verdicts(g.submit(said(), STATUS, 0.0)) == ["whois op"]
    assert verdicts(g.on_event(oper_reply(), 0.0)) == ["refuse: changed hands"]
    assert "op" not in g.known
    assert verdicts(g.on_event(oper_reply(operator=False), 0.0)) == ["refuse: not operator"]


def test_commands_waiting_on_one_question_share_its_answer() -> None:
    g = gate()
    assert verdicts(g.submit(said(text="!status"), STATUS, 0.0)) == ["whois op"]
    assert verdicts(g.submit(said(text="!list"), c.List(), 0.0)) == []
    actions = g.on_event(oper_reply(), 0.0)
    assert [(type(a).__name__, a.message.text) for a in actions] == [
        ("Obey", "!status"),
        ("Obey", "!list"),
    ]
    assert verdicts(g.on_event(oper_reply(), 0.0)) == []  # an answer nobody asked for


def test_a_disconnect_refuses_what_waits() -> None:
    g = gate()
    g.submit(said("a", user="~a"), STATUS, 0.0)
    g.submit(said("b", user="~b"), STATUS, 0.0)
    refused = verdicts(g.on_event(Disconnected(reason="x"), 0.0))
    assert refused == ["refuse: disconnected"] * 2
    assert verdicts(g.on_event(oper_reply("a", user="~a"), 0.0)) == []


def test_waiting_commands_are_bounded() -> None:
    g = gate()
    for n in range(MAX_WAITING):
        assert verdicts(g.submit(said(f"n{n}"), STATUS, 0.0)) == [f"whois n{n}"]
    assert verdicts(g.submit(said("late"), STATUS, 0.0)) == ["refuse: busy"]
    g.on_event(WhoisReply(nick="n0"), 0.0)
    assert verdicts(g.submit(said("late"), STATUS, 0.0)) == ["whois late"]


async def test_a_cached_yes_expires(autojump_clock: trio.testing.MockClock) -> None:
    g = gate()
    cached(g)
    await trio.sleep(CACHE_TTL - 1)
    assert verdicts(g.submit(said(), STATUS, trio.current_time())) == ["obey"]
    await trio.sleep(1)
    assert verdicts(g.submit(said(), STATUS, trio.current_time())) == ["whois op"]


# --- the rate per sender ---------------------------------------------------------------


async def test_the_rate_is_per_sender(autojump_clock: trio.testing.MockClock) -> None:
    """3 at once, then one every 2 s (30 a minute), for each sender apart."""
    g = gate(operator_auth="hostmask", command_rate=CommandRateSpec(per_minute=30, burst=3))

    def go(nick: str) -> list[str]:
        return verdicts(g.submit(said(nick), STATUS, trio.current_time()))

    assert [go("op") for _ in range(5)] == [["obey"]] * 3 + [["throttle (say so)"], ["throttle"]]
    # Someone else has a bucket of their own.
    assert [go("op2") for _ in range(3)] == [["obey"]] * 3
    await trio.sleep(1.999)
    assert go("op") == ["throttle"]
    await trio.sleep(0.001)
    assert go("op") == ["obey"]
    assert go("op") == ["throttle (say so)"]  # said again after a command went through
    await trio.sleep(6)  # three more, not four: the bucket holds 3
    assert [go("op") for _ in range(4)] == [["obey"]] * 3 + [["throttle (say so)"]]


def test_throttled_senders_are_not_asked_about() -> None:
    g = gate(command_rate=CommandRateSpec(per_minute=1, burst=1))
    assert verdicts(g.submit(said(), STATUS, 0.0)) == ["whois op"]
    assert verdicts(g.submit(said(), STATUS, 0.0)) == ["throttle (say so)"]
