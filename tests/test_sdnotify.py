from __future__ import annotations

import os
import pathlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from fireclaw.supervisor import sdnotify


class Listener:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def receive(self) -> list[str]:
        # The datagram is queued before notify() returns; a timeout only guards
        # against a test that would otherwise hang.
        self.sock.settimeout(5)
        return self.sock.recv(65536).decode().split("\n")

    def empty(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(65536)
        except BlockingIOError:
            return True
        return False


@pytest.fixture
def path_listener(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield Listener(sock)


@pytest.fixture
def abstract_listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    name = f"fireclaw-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield Listener(sock)


def test_unset_socket_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready() is False


def test_missing_listener_returns_false(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody.sock"))
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", f"@fireclaw-nobody-{time.monotonic_ns()}")
    assert sdnotify.notify("READY=1") is False


def test_fields_in_one_datagram_to_a_path(path_listener: Listener) -> None:
    assert sdnotify.notify("READY=1", "STATUS=ok") is True
    assert path_listener.receive() == ["READY=1", "STATUS=ok"]


def test_abstract_namespace(abstract_listener: Listener) -> None:
    assert sdnotify.ready("3 agents ready") is True
    assert abstract_listener.receive() == ["READY=1", "STATUS=3 agents ready"]


def test_no_fields_sends_nothing(path_listener: Listener) -> None:
    assert sdnotify.notify() is False
    assert path_listener.empty()


def test_helpers(path_listener: Listener) -> None:
    assert sdnotify.ready()
    assert path_listener.receive() == ["READY=1"]
    assert sdnotify.stopping()
    assert path_listener.receive() == ["STOPPING=1"]
    assert sdnotify.watchdog()
    assert path_listener.receive() == ["WATCHDOG=1"]
    assert sdnotify.extend_timeout(2.5)
    assert path_listener.receive() == ["EXTEND_TIMEOUT_USEC=2500000"]


def test_status_cannot_inject_fields(path_listener: Listener) -> None:
    assert sdnotify.status("reload rejected:\nREADY=1")
    assert path_listener.receive() == ["STATUS=reload rejected: READY=1"]


def test_reloading_carries_monotonic_usec(path_listener: Listener) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = path_listener.receive()
    assert first == "RELOADING=1"
    key, _, value = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("2000000", None, 2.0),
        ("2000000", "self", 2.0),
        ("2000000", "1", None),
        ("2000000", "junk", None),
        (None, None, None),
        ("0", None, None),
        ("soon", None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for key, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, str(os.getpid()) if value == "self" else value)
    assert sdnotify.watchdog_interval() == expected


def test_a_listener_that_never_reads_never_blocks_the_sender(path_listener: Listener) -> None:
    """The senders run on the supervisor's event loop: once the listener's queue is
    full (unix datagram queues hold about ten), a send is dropped, not waited on.
    The sends run in a thread so that a blocking one fails the test, not hangs it."""
    results: list[bool] = []

    def send_many() -> None:
        for i in range(200):
            results.append(sdnotify.status(f"message {i}"))

    sender = threading.Thread(target=send_many, daemon=True)
    sender.start()
    sender.join(timeout=30)
    assert not sender.is_alive(), f"a send blocked after {len(results)} sent"
    assert results[0] is True and results[-1] is False
    assert path_listener.receive() == ["STATUS=message 0"]
