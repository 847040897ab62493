"""The command line's API client against a daemon that misbehaves.

tests/test_api.py runs the client against the real server; here a scripted
peer on a real unix socket sends what the real server never would (a broken
status line, a head too large, a body cut short, a bad chunk, silence), and
the client, which reads HTTP itself to start fast, must turn each into one
line; well-formed answers must read the same however they are cut into pieces.
"""

from __future__ import annotations

import functools
import os
import pathlib
import socket
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pytest
import trio
from fireclaw.supervisor.client import ApiClient, ApiError

T = TypeVar("T")
#: Every exchange here is local and small; this bounds a hung one on a loaded machine.
DEADLINE = 30.0


class ScriptedPeer:
    """Reads one request on ``path`` (its head, then the body its Content-Length
    announces) into ``request``, answers ``reply`` piece by piece, then closes,
    or with ``hold`` keeps the connection open until the client closes its end."""

    def __init__(self, path: pathlib.Path, reply: Sequence[bytes], *, hold: bool = False) -> None:
        self.path = path
        self.reply = reply
        self.hold = hold
        self.request = b""

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(os.fspath(self.path))
        sock.listen(1)
        async with trio.SocketListener(sock) as listener:
            task_status.started()
            async with await listener.accept() as stream:
                if not await self._read_request(stream):
                    return
                try:
                    for piece in self.reply:
                        await stream.send_all(piece)
                    while self.hold and await stream.receive_some():
                        pass
                except trio.BrokenResourceError:
                    pass  # the client gave up reading, as it should on a bad answer

    async def _read_request(self, stream: trio.SocketStream) -> bool:
        while b"\r\n\r\n" not in self.request:
            data = await stream.receive_some()
            if not data:
                return False
            self.request += data
        head = self.request.partition(b"\r\n\r\n")[0].lower()
        length = 0
        for line in head.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                length = int(line.partition(b":")[2])
        while len(self.request) - len(head) - 4 < length:
            data = await stream.receive_some()
            if not data:
                return False
            self.request += data
        return True


async def exchange(
    nursery: trio.Nursery,
    path: pathlib.Path,
    reply: Sequence[bytes],
    call: Callable[[ApiClient], T],
    *,
    hold: bool = False,
) -> tuple[T | ApiError, ScriptedPeer]:
    """``call`` on a client of a peer at ``path`` that answers ``reply``: what it
    returned or the ApiError it raised, and the peer."""
    peer = ScriptedPeer(path, reply, hold=hold)
    await nursery.start(peer.serve)
    with trio.fail_after(DEADLINE):
        try:
            result: T | ApiError = await trio.to_thread.run_sync(
                functools.partial(call, ApiClient(path)), abandon_on_cancel=True
            )
        except ApiError as exc:
            result = exc
    return result, peer


def head(status: str, *headers: str) -> bytes:
    return (f"HTTP/1.1 {status}\r\n" + "".join(f"{h}\r\n" for h in headers) + "\r\n").encode()


def stream_all(client: ApiClient) -> list[dict[str, Any]]:
    return list(client.stream("/run", {"argv": ["true"]}))


def pieces(data: bytes, *cuts: int) -> list[bytes]:
    """``data`` cut at the offsets ``cuts``."""
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


async def test_an_answer_cut_anywhere_reads_whole(
    nursery: trio.Nursery, tmp_path: pathlib.Path
) -> None:
    body = b'{"ok": true, "n": 7}'
    answer = head("200 OK", f"Content-Length: {len(body)}", "Connection: close") + body
    # Cut inside the status line, inside a header, between head and body, in the body.
    reply = pieces(answer, 5, 30, len(answer) - len(body), len(answer) - 4)
    result, peer = await exchange(nursery, tmp_path / "api.sock", reply, lambda c: c.get("/x"))
    assert result == {"ok": True, "n": 7}
    sent = peer.request.lower()
    assert sent.startswith(b"get /x http/1.1\r\n")
    assert b"content-length" not in sent  # a GET carries no body


async def test_a_body_until_close_and_what_a_post_sends(
    nursery: trio.Nursery, tmp_path: pathlib.Path
) -> None:
    reply = [head("200 OK", "Connection: close"), b'{"id"', b": 5}"]
    result, peer = await exchange(
        nursery,
        tmp_path / "api.sock",
        reply,
        lambda c: c.post("/tasks", {"role": "w", "prompt": "p"}),
    )
    assert result == {"id": 5}
    sent_head, _, sent_body = peer.request.partition(b"\r\n\r\n")
    assert sent_head.startswith(b"POST /tasks HTTP/1.1\r\n")
    assert b"content-type: application/json" in sent_head.lower()
    assert sent_body == b'{"role":"w","prompt":"p"}'


async def test_a_stream_reads_lines_across_chunks(
    nursery: trio.Nursery, tmp_path: pathlib.Path
) -> None:
    lines = b'{"vm": "w-0"}\n{"stream": "stdout", "data": "aGkK"}\n{"exit": 0}\n'
    # Chunks cut inside lines, one of them holding more than one line; the
    # chunked framing itself arrives cut at other places.
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in pieces(lines, 5, 20)) + b"0\r\n\r\n"
    reply = [head("200 OK", "Transfer-Encoding: chunked"), *pieces(chunked, 2, 7, 40)]
    result, _ = await exchange(nursery, tmp_path / "api.sock", reply, stream_all)
    assert result == [{"vm": "w-0"}, {"stream": "stdout", "data": "aGkK"}, {"exit": 0}]


@pytest.mark.parametrize(
    ("reply", "line"),
    [
        ([b"HELLO THERE\r\n\r\n"], "bad status line b'HELLO THERE\\r\\n'"),
        (
            [b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 20_000 + b"\r\n\r\n"],
            "answer head too long or cut short",
        ),
        ([head("200 OK", "Content-Length: 10"), b"abc"], "answer cut short"),
        ([head("200 OK", "Content-Length: -3"), b"abc"], "bad Content-Length '-3'"),
        ([head("200 OK", "Transfer-Encoding: chunked"), b"-3\r\nabc\r\n"], "bad chunk size"),
        ([head("200 OK", "Transfer-Encoding: chunked"), b"2\r\nabc\r\n"], "a chunk longer"),
        ([head("200 OK", "Transfer-Encoding: chunked"), b"3\r\nabc\r\n"], "answer cut short"),
        ([], "the daemon closed the connection without answering"),
    ],
    ids=[
        "bad-status-line",
        "head-over-16KiB",
        "body-cut-short",
        "negative-length",
        "bad-chunk-size",
        "chunk-over-its-size",
        "chunks-cut-short",
        "closed-without-answering",
    ],
)
async def test_a_broken_answer_is_one_line(
    nursery: trio.Nursery, tmp_path: pathlib.Path, reply: list[bytes], line: str
) -> None:
    result, _ = await exchange(nursery, tmp_path / "api.sock", reply, lambda c: c.get("/status"))
    assert isinstance(result, ApiError)
    assert str(result).startswith(f"connection to fireclaw-swarm lost: {line}"), str(result)
    assert "\n" not in str(result)
    assert result.status is None


async def test_a_stream_cut_mid_line_or_over_the_limit_is_one_line(
    nursery: trio.Nursery, tmp_path: pathlib.Path
) -> None:
    cut = [head("200 OK", "Connection: close"), b'{"exit": 0}\n{"str']
    result, _ = await exchange(nursery, tmp_path / "cut.sock", cut, stream_all)
    assert isinstance(result, ApiError)
    assert str(result) == "the daemon sent a truncated or oversized output line"

    endless = [head("200 OK", "Connection: close"), b"x" * (1024 * 1024 + 65536)]
    result, _ = await exchange(nursery, tmp_path / "endless.sock", endless, stream_all)
    assert isinstance(result, ApiError)
    assert str(result) == "connection to fireclaw-swarm lost: an output line over the limit"


async def test_an_error_answer_gives_its_own_line_and_status(
    nursery: trio.Nursery, tmp_path: pathlib.Path
) -> None:
    body = b'{"error": "no role named\\n\'nope\'"}'
    reply = [head("404 Not Found", f"Content-Length: {len(body)}", "Connection: close"), body]
    result, _ = await exchange(nursery, tmp_path / "api.sock", reply, stream_all)
    assert isinstance(result, ApiError)
    assert (str(result), result.status) == ("no role named 'nope'", 404)


async def test_silence_is_no_answer_within_the_timeout(
    nursery: trio.Nursery, tmp_path: pathlib.Path
) -> None:
    result, _ = await exchange(
        nursery, tmp_path / "api.sock", [], lambda c: c.get("/status", timeout=0.2), hold=True
    )
    assert isinstance(result, ApiError)
    assert str(result) == "no answer from fireclaw-swarm within 0.2 s"
