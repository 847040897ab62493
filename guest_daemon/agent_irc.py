"""A named agent's presence on IRC, from inside its VM.

``AgentPresence`` connects with the shared ``IrcClient`` as the agent's nick
(username ``agent``), joins the channels of its ``IrcPresence`` and answers
what is put to it with an ``Answer`` function, which the guest daemon backs
with the agent's harness::

    AgentPresence.run()                 nursery.start(): started() once registered
    ├─ worker            one question at a time: answer(sender, where, text, draft)
    │                    bounded by answer_timeout; its lines go out as the
    │                    answer writes them to the draft, the rest at its end
    └─ per connection    (a retune to another nick or server starts a new one)
       ├─ IrcClient.run  connects, registers, reconnects with backoff
       ├─ events         Message -> a question queued (at most QUEUE_SIZE waiting)
       │                 Invited -> join; Kicked -> stay out (the client forgets it)
       └─ retunes        channels joined or parted as the presence changes

What it answers:

* a private message (reply by private message) and, in a channel, a message
  that mentions its nick as a whole word anywhere, case-insensitively with
  the IRC casemapping (reply in the channel, prefixed ``sender:``). A leading
  ``nick:`` or ``nick,`` is not part of the question; see ``addressed_to``.
* never its own messages; nothing else said in channels.

How much: an answer is paginated to fit IRC lines and cut to ``max_lines``
lines, the last saying how many more there were (``reply_lines``), so a
runaway harness cannot flood a channel. An answer that writes to its
``Draft`` while it is worked on (a chat turn, as the model streams) has each
line sent as soon as it is complete (``answer_stream.AnswerLines``); what it
returns at the end is the whole answer, of which the rest is then sent.
One answer is worked on at a time; when ``QUEUE_SIZE`` more are waiting, a
person is told ``busy, try again shortly`` once (again only after a question
of theirs was queued, or the queue emptied) and the question is dropped; an
agent is not told. An answer that raises or takes longer than
``answer_timeout`` becomes a one-line apology (after the lines already sent,
if any): nothing about the failure goes to IRC.

Agents and loops: the client tells agents by their username, ``agent``
(``~agent`` on servers without ident); ``ReplyPolicy`` decides when another
agent's message is answered. People are always answered. A person's client
could use the username ``agent`` too; it is then only answered like an agent.

The rules themselves (whom to answer, when, in how many lines) are pure
functions in guest_daemon/agent_rules.py; its ``InvalidPresence`` is what a
presence that cannot be used raises here.

Nothing the server or anyone on it sends raises: bad input is logged and
dropped, as in the client underneath.

This module imports only the standard library, trio, msgspec and irctokens
(through ``irc``): it ships inside VM images.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import trio

from .agent_rules import (
    AGENT_USERNAME,
    MAX_ANSWER_LINES,
    ReplyPolicy,
    addressed_to,
    irc_config,
    is_agent,
)
from .answer_stream import NO_ANSWER, AnswerLines, Draft
from .irc import Connect, IrcClient, open_tcp
from .irc_events import (
    Disconnected,
    Invited,
    Joined,
    Kicked,
    Message,
    NickChanged,
    Registered,
)
from .irc_session import HOST_GUESS
from .irc_wire import InvalidParameter, casefold, message_budget, paginate
from .protocol import IrcPresence

__all__ = ["BUSY", "FAILED", "PRIVATE", "QUEUE_SIZE", "AgentPresence", "Answer", "Draft"]

log = logging.getLogger("fireclaw.agent_irc")

#: ``await answer(sender_nick, where, text, draft)`` -> the reply; ``where`` is
#: the channel the question was asked in, or ``"private"``. What the answer
#: writes to ``draft`` while it runs goes out line by line at once.
Answer = Callable[[str, str, str, Draft], Awaitable[str]]

PRIVATE: Final = "private"
#: Questions waiting while one is answered; more than this are refused.
QUEUE_SIZE: Final = 8
#: How long an answer may take before it becomes an apology.
ANSWER_TIMEOUT: Final = 600.0
#: Channels the agent is in at most; invitations beyond that are declined.
MAX_CHANNELS: Final = 32
#: How long a retune waits for the old connection's QUIT to go out.
RETUNE_QUIT_TIMEOUT: Final = 5.0

BUSY: Final = "busy, try again shortly"
FAILED: Final = "sorry, something went wrong while answering that"


@dataclass(frozen=True)
class _Question:
    sender: str
    where: str  # a channel, or PRIVATE
    reply_to: str  # the channel, or the sender
    text: str
    from_agent: bool


class AgentPresence:
    """One agent on IRC; see the module docstring.

    ``connect`` and ``uniform`` go to the ``IrcClient`` (tests use memory
    streams and fixed reconnect delays). The policy is ``self.policy``.
    """

    def __init__(
        self,
        presence: IrcPresence,
        answer: Answer,
        *,
        connect: Connect = open_tcp,
        uniform: Callable[[float, float], float] = random.uniform,
        answer_timeout: float = ANSWER_TIMEOUT,
        max_lines: int = MAX_ANSWER_LINES,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        irc_config(presence)
        self.presence = presence
        self.policy = ReplyPolicy(presence.cooldown)
        self.answer_timeout = answer_timeout
        self.max_lines = max_lines
        self._answer = answer
        self._connect = connect
        self._uniform = uniform
        self._client: IrcClient | None = None
        self._queue_in, self._queue_out = trio.open_memory_channel[_Question](queue_size)
        self._told_busy: set[str] = set()
        self._retuned = trio.Event()
        self._leaving = False
        self._scope = trio.CancelScope()

    @property
    def client(self) -> IrcClient | None:
        """The client of the current connection (None before ``run``)."""
        return self._client

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Be on IRC until ``leave`` or cancellation; started() once first registered."""
        started = False
        with self._scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._work)
                while not self._leaving:
                    presence = self.presence
                    client = IrcClient(
                        irc_config(presence), connect=self._connect, uniform=self._uniform
                    )
                    self._client = client
                    async with trio.open_nursery() as connection:
                        await connection.start(client.run)
                        if not started:
                            started = True
                            task_status.started()
                        connection.start_soon(self._handle_events, client)
                        connection.start_soon(self._follow, client, presence, connection)
                nursery.cancel_scope.cancel()

    async def leave(self, message: str) -> None:
        """QUIT with ``message`` and end ``run``; bound it with a cancel scope."""
        self._leaving = True
        try:
            # Before registration there is nobody to say goodbye to; and a client
            # that quits then would end its run without ever reporting started.
            if self._client is not None and self._client.registered:
                await self._client.quit(message)
        finally:
            self._scope.cancel()

    def retune(self, presence: IrcPresence) -> None:
        """Take a new presence: channels joined and parted, the cooldown changed;
        another nick, server or password reconnects as the new nick.
        ``InvalidPresence`` if it cannot be used (the old one stays)."""
        irc_config(presence)
        self.presence = presence
        self.policy.cooldown = presence.cooldown
        self._retuned.set()

    # -- connection tasks ----------------------------------------------------------

    async def _follow(
        self, client: IrcClient, presence: IrcPresence, connection: trio.Nursery
    ) -> None:
        """Apply retunes to this connection; end it when it needs another identity."""
        while True:
            await self._retuned.wait()
            self._retuned = trio.Event()
            new = self.presence
            if (new.host, new.port, new.nick, new.password) != (
                presence.host,
                presence.port,
                presence.nick,
                presence.password,
            ):
                log.info("reconnecting as %s to %s:%d", new.nick, new.host, new.port)
                with trio.move_on_after(RETUNE_QUIT_TIMEOUT):
                    await client.quit(f"reconnecting as {new.nick}")
                connection.cancel_scope.cancel()
                return
            old = {casefold(c): c for c in presence.channels}
            wanted = {casefold(c): c for c in new.channels}
            try:
                for key, channel in old.items():
                    if key not in wanted:
                        await client.part(channel, "no longer in my role")
                for key, channel in wanted.items():
                    if key not in old:
                        await client.join(channel)
            except InvalidParameter as exc:
                log.warning("retune: %s", exc)
            presence = new

    async def _handle_events(self, client: IrcClient) -> None:
        async for event in client.events():
            match event:
                case Message():
                    await self._on_message(client, event)
                case Invited(channel=channel, by=by):
                    await self._on_invite(client, channel, by)
                case Registered(nick=nick):
                    log.info("on IRC as %s", nick)
                case Joined(channel=channel):
                    log.info("joined %s", channel)
                case Kicked(channel=channel, by=by, reason=reason):
                    log.info("kicked from %s by %s (%s); not rejoining", channel, by, reason)
                case NickChanged(old=old, new=new):
                    log.info("nick %s -> %s", old, new)
                case Disconnected(reason=reason):
                    log.info("disconnected: %s", reason)

    async def _on_invite(self, client: IrcClient, channel: str, by: str) -> None:
        if len(client.channels) >= MAX_CHANNELS:
            log.warning("declined %s's invitation to %s: in %d channels", by, channel, MAX_CHANNELS)
            return
        log.info("invited to %s by %s", channel, by)
        try:
            await client.join(channel)
        except InvalidParameter as exc:
            log.warning("cannot join %s: %s", channel, exc)

    def _own_nicks(self, client: IrcClient) -> tuple[str, ...]:
        return tuple(dict.fromkeys((client.nick, self.presence.nick)))

    async def _on_message(self, client: IrcClient, message: Message) -> None:
        nicks = self._own_nicks(client)
        sender = message.source
        if not sender or casefold(sender) in {casefold(n) for n in nicks}:
            return
        if message.private:
            text = addressed_to(message.text, nicks) or message.text
            where, reply_to = PRIVATE, sender
        else:
            found = addressed_to(message.text, nicks)
            if found is None:
                return
            text, where, reply_to = found, message.target, message.target
        from_agent = is_agent(message.user)
        if from_agent and not self.policy.should_answer(trio.current_time(), from_agent=True):
            log.info("not answering agent %s in %s: cooling down", sender, where)
            return
        question = _Question(
            sender=sender, where=where, reply_to=reply_to, text=text, from_agent=from_agent
        )
        try:
            self._queue_in.send_nowait(question)
        except trio.WouldBlock:
            log.warning("busy: dropped a question from %s in %s", sender, where)
            if not from_agent and sender not in self._told_busy:
                self._told_busy.add(sender)
                await self._reply(question, BUSY)
            return
        self._told_busy.discard(sender)

    # -- answering -----------------------------------------------------------------

    async def _work(self) -> None:
        async for question in self._queue_out:
            if self._queue_out.statistics().current_buffer_used == 0:
                self._told_busy.clear()  # nobody waits any more: anyone may be told again
            await self._take(question)

    async def _take(self, question: _Question) -> None:
        if question.from_agent and not self.policy.should_answer(
            trio.current_time(), from_agent=True
        ):
            log.info("not answering agent %s in %s: cooling down", question.sender, question.where)
            return
        draft = _Draft(self._lines(question))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_lines, question, draft)
            try:
                with trio.fail_after(self.answer_timeout):
                    text = await self._answer(question.sender, question.where, question.text, draft)
            except trio.TooSlowError:
                log.warning(
                    "answer to %s took over %gs; gave up", question.sender, self.answer_timeout
                )
                text = f"sorry, that took too long (over {self.answer_timeout:g}s)"
            except Exception:
                log.exception("answer to %s failed", question.sender)
                text = FAILED
            draft.close(text)
        self.policy.answered(trio.current_time(), to_agent=question.from_agent)

    def _lines(self, question: _Question) -> AnswerLines:
        """The IRC lines of an answer to ``question``, to be written."""
        nick = self._client.nick if self._client is not None else ""
        budget = message_budget(
            nick="x" * max(len(nick), len(self.presence.nick)),
            username=AGENT_USERNAME,
            host="x" * HOST_GUESS,
            command="PRIVMSG",
            target=question.reply_to,
        )
        return AnswerLines(
            prefix="" if question.where == PRIVATE else f"{question.sender}: ",
            addressee=question.sender,
            budget=budget,
            max_lines=self.max_lines,
        )

    async def _send_lines(self, question: _Question, draft: _Draft) -> None:
        """Send the answer's lines as they become ready, until it is closed."""
        while True:
            await draft.changed()
            while lines := draft.lines.take():
                for line in lines:
                    await self._say(question.reply_to, line)
            if draft.lines.closed:
                return

    async def _reply(self, question: _Question, text: str) -> None:
        lines = self._lines(question)
        lines.close(text)
        await self._say(question.reply_to, "\n".join(lines.take()))

    async def _say(self, target: str, text: str) -> None:
        client = self._client
        if client is None:
            return
        try:
            await client.privmsg(target, text)
        except InvalidParameter as exc:
            log.warning("cannot reply to %s: %s", target, exc)

    async def notice(self, sender: str, where: str, text: str) -> None:
        """One NOTICE line about the answer being worked on for ``sender`` in ``where``
        (a tool the agent runs): cut to one line that fits, through the throttle."""
        client = self._client
        if client is None:
            return
        target = sender if where == PRIVATE else where
        budget = message_budget(
            nick="x" * max(len(client.nick), len(self.presence.nick)),
            username=AGENT_USERNAME,
            host="x" * HOST_GUESS,
            command="NOTICE",
            target=target,
        )
        line = paginate(" ".join(text.replace("\x01", "").split()) or NO_ANSWER, budget)[0]
        try:
            await client.notice(target, line)
        except InvalidParameter as exc:
            log.warning("cannot send a notice to %s: %s", target, exc)


class _Draft:
    """The ``Draft`` an answer writes to: its ``AnswerLines``, and a wake-up for
    the task that sends them."""

    def __init__(self, lines: AnswerLines) -> None:
        self.lines = lines
        self._changed = trio.Event()

    def write(self, text: str) -> None:
        self.lines.write(text)
        self._changed.set()

    def discard(self) -> None:
        self.lines.discard()

    def close(self, text: str) -> None:
        self.lines.close(text)
        self._changed.set()

    async def changed(self) -> None:
        """Until something was written (or the draft closed) since the last call."""
        await self._changed.wait()
        self._changed = trio.Event()
