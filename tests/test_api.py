"""The control API server (api.py) spoken to by the real synchronous client (client.py)."""

from __future__ import annotations

import base64
import functools
import os
import pathlib
import socket
import stat
from collections.abc import AsyncGenerator, Callable
from typing import Any, Literal, TypeVar

import pytest
import trio
from fireclaw.pool.runs import NotReady, RunEvent, RunExited, RunFailed, RunOutput, RunStarted
from fireclaw.supervisor.api import ControllerError, serve_api
from fireclaw.supervisor.api_http import MAX_BODY_BYTES, ApiServerError
from fireclaw.supervisor.client import ApiClient, ApiError, SwarmNotRunning

T = TypeVar("T")


def out(stream: str, text: str) -> dict[str, object]:
    """The line the API writes for ``output(stream, text)``."""
    return {"stream": stream, "data": base64.b64encode(text.encode()).decode()}


def output(stream: Literal["stdout", "stderr"], text: str) -> RunOutput:
    return RunOutput(stream=stream, data=text.encode())


class FakeController:
    """Answers from fixed data; ``run`` behaves according to argv[0]."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.run_started = trio.Event()
        self.run_ended = trio.Event()
        self.calls: list[tuple[str, tuple[object, ...]]] = []

    async def status(self, since: int | None = None, wait: float = 0.0) -> dict[str, object]:
        self.calls.append(("status", (since, wait)))
        return {
            "version": (since or 0) + 1,
            "pid": 1,
            "roles": {"worker": {"idle": 1, "active": 0, "failed": 0, "degraded": False}},
            "agents": [
                {"name": "worker-0", "role": "worker", "state": "idle", "pid": 42, "restarts": 0}
            ],
        }

    async def run(
        self, role: str | None, argv: list[str], user: str = ""
    ) -> AsyncGenerator[RunEvent, None]:
        self.calls.append(("run", (role, argv, user) if user else (role, argv)))
        match argv[0]:
            case "chunks":
                for i in range(5):
                    yield output("stdout" if i % 2 == 0 else "stderr", f"line {i}\n")
                yield RunExited(code=3)
                return
            case "gated":
                yield output("stdout", "first\n")
                await self.release.wait()
                yield output("stdout", "second\n")
            case "refuse":
                raise ControllerError("no role named 'nope'", 404)
            case "no-vm":
                raise NotReady("worker", 30.0)
            case "fail-late":
                yield output("stdout", "partial\n")
                raise ControllerError("worker-0 was lost\nduring the run", 502)
            case "lost":
                yield RunStarted(vm="worker-0")
                yield output("stdout", "partial\n")
                yield RunFailed(reason="control connection closed (code 1006)")
                return
            case "no-such-binary":
                yield RunStarted(vm="worker-0")
                yield RunExited(code=127, error="no-such-binary: not found")
                return
            case "crash":
                raise RuntimeError("boom")
            case "hang":
                try:
                    yield output("stdout", "started\n")
                    self.run_started.set()
                    await trio.sleep_forever()
                finally:
                    self.run_ended.set()
            case "spam":
                try:
                    while True:
                        yield output("stdout", "x" * 1000 + "\n")
                finally:
                    self.run_ended.set()
        yield RunExited(code=0)

    async def submit_task(self, role: str, prompt: str) -> dict[str, object]:
        self.calls.append(("submit_task", (role, prompt)))
        return {"id": 7, "role": role, "prompt": prompt, "state": "queued"}

    async def get_task(self, task_id: int) -> dict[str, object]:
        if task_id == 404:
            raise ControllerError(f"no task {task_id}", 404)
        return {"id": task_id, "state": "done", "result": "ok"}

    async def list_tasks(self, state: str | None) -> list[dict[str, object]]:
        self.calls.append(("list_tasks", (state,)))
        return [{"id": 1, "state": state or "queued"}]

    async def scale(self, role: str, n: int) -> dict[str, object]:
        self.calls.append(("scale", (role, n)))
        return {"role": role, "target": n}

    async def reset(self, name: str) -> dict[str, object]:
        self.calls.append(("reset", (name,)))
        if name == "boom":
            raise KeyError("boom")
        return {"reset": 1}

    async def reload(self) -> dict[str, object]:
        self.calls.append(("reload", ()))
        return {"ok": True, "error": None, "applied": {"added": ["coder"]}}

    async def events(self, after: int, limit: int) -> list[dict[str, object]]:
        self.calls.append(("events", (after, limit)))
        return [
            {"id": after + 1, "at": 0.0, "kind": "started", "subject": "supervisor", "detail": {}}
        ]

    async def down(self, leave_vms: bool = False) -> dict[str, object]:
        return {"stopping": True, "leaving_vms": leave_vms}

    async def cancel(self, name: str, reason: str) -> dict[str, object]:
        self.calls.append(("cancel", (name, reason)))
        if name == "idle-0":
            raise ControllerError("idle-0 is not at work: it has no turn to stop", 409)
        return {"name": name, "vm": "worker-1", "cancelled": True}


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking client call in a thread, with a deadline."""
    with trio.fail_after(10):
        return await trio.to_thread.run_sync(functools.partial(fn, *args), abandon_on_cancel=True)


def raw_exchange(path: pathlib.Path, data: bytes) -> bytes:
    """Send raw bytes, read until the server closes; the whole answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(os.fspath(path))
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
async def served(
    nursery: trio.Nursery, tmp_path: pathlib.Path
) -> tuple[FakeController, ApiClient, pathlib.Path]:
    fake = FakeController()
    path = await nursery.start(serve_api, tmp_path / "api.sock", fake)
    return fake, ApiClient(path), path


Served = tuple[FakeController, ApiClient, pathlib.Path]


async def test_health_and_status(served: Served) -> None:
    fake, client, path = served
    assert await in_thread(client.get, "/health") == {"ok": True, "pid": os.getpid()}
    # /status is the controller's answer, whole, for the query it was given.
    assert await in_thread(client.get, "/status") == await FakeController().status()
    assert (await in_thread(client.get, "/status?since=41&wait=0.25"))["version"] == 42
    assert (await in_thread(client.get, "/status?since=7"))["version"] == 8
    assert [c for c in fake.calls if c[0] == "status"] == [
        ("status", (None, 0.0)),
        ("status", (41, 0.25)),
        ("status", (7, 10.0)),  # a long-poll without wait= waits 10 s
    ]


async def test_socket_is_private(served: Served) -> None:
    _, _, path = served
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


async def test_json_routes_reach_the_controller(served: Served) -> None:
    fake, client, _ = served
    assert (await in_thread(client.post, "/tasks", {"role": "worker", "prompt": "hi"}))["id"] == 7
    assert await in_thread(client.get, "/tasks/3") == {"id": 3, "state": "done", "result": "ok"}
    assert await in_thread(client.get, "/tasks?state=failed") == {
        "tasks": [{"id": 1, "state": "failed"}]
    }
    assert await in_thread(client.post, "/scale", {"role": "worker", "n": 3}) == {
        "role": "worker",
        "target": 3,
    }
    assert await in_thread(client.post, "/reset", {"name": "worker-0"}) == {"reset": 1}
    reloaded = {"ok": True, "error": None, "applied": {"added": ["coder"]}}
    assert await in_thread(client.post, "/reload") == reloaded  # no body
    assert await in_thread(client.post, "/reload", {}) == reloaded  # an empty one
    events = await in_thread(client.get, "/events?after=5&limit=2")
    assert events["events"][0]["id"] == 6
    assert await in_thread(client.post, "/down") == {"stopping": True, "leaving_vms": False}
    left = await in_thread(client.post, "/down", {"leave_vms": True})
    assert left == {"stopping": True, "leaving_vms": True}
    assert ("submit_task", ("worker", "hi")) in fake.calls
    assert ("list_tasks", ("failed",)) in fake.calls
    assert ("scale", ("worker", 3)) in fake.calls
    assert ("events", (5, 2)) in fake.calls
    assert ("reset", ("worker-0",)) in fake.calls
    assert fake.calls.count(("reload", ())) == 2


async def test_run_streams_lines_in_order_then_exit(served: Served) -> None:
    fake, client, _ = served
    items = await in_thread(
        lambda: list(client.stream("/run", {"role": None, "argv": ["chunks", "a"]}))
    )
    assert items[:-1] == [
        out("stdout" if i % 2 == 0 else "stderr", f"line {i}\n") for i in range(5)
    ]
    assert items[-1] == {"exit": 3}
    assert fake.calls == [("run", (None, ["chunks", "a"]))]
    await in_thread(lambda: list(client.stream("/run", {"argv": ["chunks"], "user": "root"})))
    assert fake.calls[-1] == ("run", (None, ["chunks"], "root"))


async def test_run_flushes_each_line_as_it_is_emitted(served: Served) -> None:
    fake, client, _ = served

    def consume() -> list[dict[str, Any]]:
        lines = client.stream("/run", {"argv": ["gated"]})
        # The controller emits "second" only once the client has seen "first".
        first = next(lines)
        trio.from_thread.run_sync(fake.release.set)
        return [first, *lines]

    assert await in_thread(consume) == [
        out("stdout", "first\n"),
        out("stdout", "second\n"),
        {"exit": 0},
    ]


@pytest.mark.parametrize(
    ("mode", "status", "error"),
    [
        ("refuse", 404, "no role named 'nope'"),  # a ControllerError
        ("no-vm", 503, "no worker VM became ready within 30s"),  # the pool's NotReady
    ],
)
async def test_run_refused_before_output_is_an_error_status(
    served: Served, mode: str, status: int, error: str
) -> None:
    _, client, _ = served
    with pytest.raises(ApiError) as info:
        await in_thread(lambda: list(client.stream("/run", {"argv": [mode]})))
    assert (info.value.status, str(info.value)) == (status, error)


@pytest.mark.parametrize(
    ("mode", "lines", "error"),
    [
        # A ControllerError once output was written.
        ("fail-late", [out("stdout", "partial\n")], "worker-0 was lost during the run"),
        # The pool's RunFailed: the VM named from the run's first line.
        (
            "lost",
            [{"vm": "worker-0"}, out("stdout", "partial\n")],
            "worker-0 was lost during the run: control connection closed (code 1006)",
        ),
    ],
)
async def test_run_failing_after_output_ends_with_one_error_line(
    served: Served, mode: str, lines: list[dict[str, object]], error: str
) -> None:
    _, client, _ = served
    seen: list[dict[str, Any]] = []

    def consume() -> None:
        for item in client.stream("/run", {"argv": [mode]}):
            seen.append(item)

    with pytest.raises(ApiError) as info:
        await in_thread(consume)
    assert seen == lines
    assert str(info.value) == error


async def test_run_that_could_not_start_says_why_on_stderr(served: Served) -> None:
    _, client, _ = served
    items = await in_thread(lambda: list(client.stream("/run", {"argv": ["no-such-binary"]})))
    assert items == [
        {"vm": "worker-0"},
        out("stderr", "no-such-binary: not found\n"),
        {"exit": 127},
    ]


async def test_run_crash_is_a_500(served: Served) -> None:
    _, client, _ = served
    with pytest.raises(ApiError) as info:
        await in_thread(lambda: list(client.stream("/run", {"argv": ["crash"]})))
    assert info.value.status == 500
    assert "RuntimeError: boom" in str(info.value)
    assert (await in_thread(client.get, "/health"))["ok"] is True


@pytest.mark.parametrize("mode", ["hang", "spam"])
async def test_client_leaving_mid_run_cancels_the_run(served: Served, mode: str) -> None:
    fake, client, _ = served

    def read_one_then_leave() -> dict[str, Any]:
        lines = client.stream("/run", {"argv": [mode]})
        first = next(lines)
        lines.close()
        return first

    first = await in_thread(read_one_then_leave)
    assert first["stream"] == "stdout"
    with trio.fail_after(5):
        await fake.run_ended.wait()
    assert (await in_thread(client.get, "/health"))["ok"] is True


async def test_a_long_run_does_not_block_other_requests(served: Served) -> None:
    fake, client, _ = served
    async with trio.open_nursery() as nursery:
        nursery.start_soon(in_thread, lambda: list(client.stream("/run", {"argv": ["hang"]})))
        with trio.fail_after(5):
            await fake.run_started.wait()
        assert (await in_thread(client.get, "/health"))["ok"] is True
        nursery.cancel_scope.cancel()


async def test_stop_ends_an_agents_turn_through_the_controller(served: Served) -> None:
    fake, client, _ = served
    answer = {"name": "alice", "vm": "worker-1", "cancelled": True}
    assert await in_thread(client.post, "/agents/alice/stop") == answer  # no body
    assert await in_thread(client.post, "/agents/alice/stop", {}) == answer
    assert fake.calls.count(("cancel", ("alice", "stopped through the API"))) == 2
    with pytest.raises(ApiError) as info:
        await in_thread(client.post, "/agents/idle-0/stop")
    assert (info.value.status, str(info.value)) == (
        409,
        "idle-0 is not at work: it has no turn to stop",
    )
    with pytest.raises(ApiError) as info:
        await in_thread(client.post, "/agents/alice/stop", {"now": True})
    assert info.value.status == 400 and "unknown field `now`" in str(info.value)
    with pytest.raises(ApiError) as info:
        await in_thread(client.get, "/agents/alice/stop")
    assert info.value.status == 405


async def test_controller_error_is_one_line_with_its_status(served: Served) -> None:
    _, client, _ = served
    with pytest.raises(ApiError) as info:
        await in_thread(client.get, "/tasks/404")
    assert info.value.status == 404
    assert str(info.value) == "no task 404"


async def test_unexpected_exception_is_a_500_and_the_server_lives(served: Served) -> None:
    _, client, _ = served
    with pytest.raises(ApiError) as info:
        await in_thread(client.post, "/reset", {"name": "boom"})
    assert info.value.status == 500
    assert str(info.value) == "internal error: KeyError: 'boom'"
    assert (await in_thread(client.get, "/health"))["ok"] is True


@pytest.mark.parametrize(
    ("method", "target", "body", "status", "words"),
    [
        ("GET", "/nope", None, 404, "no such endpoint: /nope"),
        ("GET", "/run", None, 405, "GET not allowed on /run (use POST)"),
        ("POST", "/status", {}, 405, "use GET"),
        ("POST", "/scale", {"role": "worker", "n": "three"}, 400, "Expected `int`, got `str`"),
        ("POST", "/scale", {"role": "worker", "n": -1}, 400, "Expected `int` >= 0"),
        ("POST", "/scale", {"role": "worker", "n": 1, "extra": 1}, 400, "unknown field `extra`"),
        ("POST", "/tasks", {"role": "worker"}, 400, "missing required field `prompt`"),
        ("POST", "/run", {"argv": []}, 400, "length >= 1"),
        ("POST", "/run", {"argv": ["id"], "user": "Root Bad"}, 400, "matching regex"),
        ("POST", "/run", None, 400, "a JSON object is required"),
        ("POST", "/down", {"now": True}, 400, "unknown field `now`"),
        ("GET", "/tasks?state=bogus", None, 400, "state must be one of"),
        ("GET", "/tasks/abc", None, 400, "task id must be a positive integer"),
        ("GET", "/events?after=x", None, 400, "after must be an integer"),
        ("GET", "/events?limit=0", None, 400, "limit must be between 1 and 1000"),
        ("GET", "/status?verbose=1", None, 400, "unknown query parameter 'verbose'"),
    ],
)
async def test_bad_requests(
    served: Served, method: str, target: str, body: dict[str, Any] | None, status: int, words: str
) -> None:
    _, client, _ = served
    call = client.get if method == "GET" else functools.partial(client.post, body=body)
    with pytest.raises(ApiError) as info:
        await in_thread(call, target)
    assert info.value.status == status
    assert words in str(info.value)
    assert "\n" not in str(info.value)


async def test_oversized_body_is_refused(served: Served) -> None:
    fake, client, _ = served
    with pytest.raises(ApiError) as info:
        await in_thread(client.post, "/tasks", {"role": "worker", "prompt": "x" * 100_000})
    assert info.value.status == 413
    assert str(info.value) == f"request body over {MAX_BODY_BYTES} bytes"
    assert not [c for c in fake.calls if c[0] == "submit_task"]


async def test_oversized_chunked_body_is_refused(served: Served) -> None:
    _, _, path = served
    chunk = b"x" * 40_000
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(2)) + b"0\r\n\r\n"
    answer = await in_thread(
        raw_exchange,
        path,
        b"POST /tasks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body,
    )
    assert answer.startswith(b"HTTP/1.1 413 ")


async def test_malformed_request_does_not_kill_the_server(served: Served) -> None:
    _, client, path = served
    answer = await in_thread(raw_exchange, path, b"GARBAGE\x00\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b'{"error":"bad request: ' in answer
    answer = await in_thread(
        raw_exchange, path, b"POST /scale HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n{not json"
    )
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"invalid request body: JSON is malformed" in answer
    answer = await in_thread(
        raw_exchange,
        path,
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert (await in_thread(client.get, "/health"))["ok"] is True


async def test_wrong_method_names_the_allowed_ones(served: Served) -> None:
    _, _, path = served
    answer = await in_thread(raw_exchange, path, b"DELETE /tasks HTTP/1.1\r\nHost: x\r\n\r\n")
    head = answer.split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 405 ")
    assert b"\r\nallow: get, post" in head


async def test_slow_client_is_cut_off(nursery: trio.Nursery, tmp_path: pathlib.Path) -> None:
    path = await nursery.start(
        functools.partial(serve_api, idle_timeout=0.2), tmp_path / "api.sock", FakeController()
    )
    answer = await in_thread(raw_exchange, path, b"GET /health HTTP/1.1\r\nHost")
    assert answer.startswith(b"HTTP/1.1 408 ")


async def test_socket_removed_when_server_stops(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "api.sock"
    async with trio.open_nursery() as nursery:
        assert await nursery.start(serve_api, path, FakeController()) == path
        assert path.exists()
        nursery.cancel_scope.cancel()
    assert not path.exists()
    with pytest.raises(SwarmNotRunning):
        await in_thread(ApiClient(path).get, "/health")


async def test_stale_socket_is_replaced(nursery: trio.Nursery, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "api.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.fspath(path))
    stale.close()
    with pytest.raises(SwarmNotRunning):
        await in_thread(ApiClient(path).get, "/health")  # refused: nobody listens
    await nursery.start(serve_api, path, FakeController())
    assert (await in_thread(ApiClient(path).get, "/health"))["ok"] is True


async def test_refuses_to_replace_a_file_that_is_not_a_socket(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "api.sock"
    path.write_text("precious")
    with pytest.raises(ApiServerError, match="exists and is not a socket"):
        await serve_api(path, FakeController())
    assert path.read_text() == "precious"


def test_not_running_message(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "api.sock"
    with pytest.raises(SwarmNotRunning) as info:
        ApiClient(path).get("/health")
    assert str(info.value) == (
        f"no fireclaw-swarm is running on {path} (start it with `fireclaw-swarm up`)"
    )
