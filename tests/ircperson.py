"""Someone on IRC, played by the ``irc`` library (not the project's client).

Everything the library does happens in a thread of its own: calls are queued
to it, and what the server sends comes back through ``expect``, which waits
for a matching event with a deadline. Trio tests use ``aexpect``, ``astart``,
``astop``, ``next_from``, ``message_in`` and ``person``, which wait in a worker
thread so that the trio run goes on meanwhile.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import irc.client
import trio

Event = irc.client.Event

WAIT = 30.0  # seconds: generous for a busy machine

#: What another client's doings look like to the ``irc`` library (replies to our own
#: commands, such as "inviting", carry the other nick too, but are not its doing).
DEEDS = frozenset({"pubmsg", "privmsg", "action", "join", "part", "quit", "kick", "nick"})


class Person:
    def __init__(
        self,
        address: tuple[str, int],
        nick: str,
        *,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.nick = nick
        self._address = address
        self._username = username
        self._password = password
        self._reactor = irc.client.Reactor()
        self._reactor.add_global_handler("all_events", self._record, -10)
        self._connection = self._reactor.server()
        self._inbox: queue.Queue[Event] = queue.Queue()
        self.seen: list[Event] = []
        self._claimed: set[int] = set()
        self._expecting = threading.Lock()  # seen and _claimed, against an abandoned aexpect
        self._calls: queue.Queue[Callable[[], object]] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"person-{nick}", daemon=True)

    def _record(self, connection: irc.client.ServerConnection, event: Event) -> None:
        self._inbox.put(event)

    def _loop(self) -> None:
        self._connection.connect(
            *self._address, self.nick, password=self._password, username=self._username
        )
        while not self._stop.is_set():
            self._reactor.process_once(0.05)
            while True:
                try:
                    call = self._calls.get_nowait()
                except queue.Empty:
                    break
                call()
        if self._connection.is_connected():
            self._connection.disconnect("leaving")

    def do(self, method: str, *args: Any) -> None:
        """Run ``connection.method(*args)`` in the person's thread."""
        self._calls.put(partial(getattr(self._connection, method), *args))

    def say(self, target: str, text: str) -> None:
        self.do("privmsg", target, text)

    def send_raw(self, line: str) -> None:
        self.do("send_raw", line)

    def expect(self, what: str, predicate: Callable[[Event], bool], timeout: float = WAIT) -> Event:
        """The earliest matching event not claimed by an earlier ``expect``, waiting for
        one to arrive if need be; fails naming ``what``. Events that arrive in another
        order than expected are kept for the ``expect`` that wants them."""
        with self._expecting:
            return self._expect(what, predicate, timeout)

    def _expect(self, what: str, predicate: Callable[[Event], bool], timeout: float) -> Event:
        for i, event in enumerate(self.seen):
            if i not in self._claimed and predicate(event):
                self._claimed.add(i)
                return event
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                seen = [f"{e.type} {e.source} {e.target} {e.arguments}" for e in self.seen[-15:]]
                raise AssertionError(
                    f"{self.nick} never saw {what}; last seen:\n" + "\n".join(seen)
                )
            try:
                event = self._inbox.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            self.seen.append(event)
            if predicate(event):
                self._claimed.add(len(self.seen) - 1)
                return event

    async def aexpect(
        self,
        what: str,
        predicate: Callable[[Event], bool],
        timeout: float = WAIT,  # noqa: ASYNC109 - the worker thread needs the deadline
    ) -> Event:
        """``expect`` for trio code, with the same rules and the same failure."""
        with trio.fail_after(timeout + 5):  # only if the thread itself overruns
            return await trio.to_thread.run_sync(
                self.expect, what, predicate, timeout, abandon_on_cancel=True
            )

    async def next_from(self, nick: str) -> Event:
        """The earliest thing ``nick`` did (said, joined, quit, ...) that no ``expect``
        has claimed yet. Once every earlier deed of ``nick`` has been claimed, this is
        what ``nick`` did next: anything else from ``nick`` in between would be it."""
        return await self.aexpect(
            f"something from {nick}",
            lambda e: e.type in DEEDS and e.source is not None and e.source.nick == nick,
        )

    async def message_in(self, channel: str) -> Event:
        """The earliest message in ``channel`` that no ``expect`` has claimed yet."""
        return await self.aexpect(
            f"a message in {channel}", lambda e: e.type == "pubmsg" and e.target == channel
        )

    def said(self, target: str, fragment: str, timeout: float = WAIT) -> Event:
        """Wait for a message in ``target`` (a channel, or us) containing ``fragment``."""
        return self.expect(
            f"{fragment!r} in {target}",
            lambda e: (
                e.type in ("pubmsg", "privmsg")
                and e.target.lower() == target.lower()
                and fragment in e.arguments[0]
            ),
            timeout,
        )

    def oper(self, name: str, password: str) -> None:
        """``/OPER name password``; returns once the server made us an IRC operator."""
        self.do("oper", name, password)
        answer = self.expect(
            "an answer to OPER",
            lambda e: e.type in ("youreoper", "passwdmismatch", "nooperhost"),
        )
        assert answer.type == "youreoper", f"{self.nick}: OPER refused ({answer.type})"

    def join(self, channel: str) -> None:
        self.do("join", channel)
        self.expect(
            f"joining {channel}",
            lambda e: e.type == "join" and e.target == channel and e.source.nick == self.nick,
        )

    def start(self, *channels: str) -> Person:
        self._thread.start()
        self.expect("the welcome", lambda e: e.type == "welcome")
        for channel in channels:
            self.join(channel)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    async def astart(self, *channels: str) -> Person:
        """``start`` for trio code."""
        return await trio.to_thread.run_sync(self.start, *channels, abandon_on_cancel=True)

    async def astop(self) -> None:
        """``stop`` for trio code; harmless if already stopped, or never started."""
        self._stop.set()
        if self._thread.ident is not None:
            await trio.to_thread.run_sync(self._thread.join, 10)


@asynccontextmanager
async def person(
    address: tuple[str, int], nick: str, *channels: str, username: str | None = None
) -> AsyncIterator[Person]:
    """Someone connected and in ``channels`` for the block, gone after it."""
    someone = Person(address, nick, username=username)
    try:
        yield await someone.astart(*channels)
    finally:
        await someone.astop()
