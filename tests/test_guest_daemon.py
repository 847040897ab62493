"""The guest daemon: pure helpers directly, the daemon as a real subprocess.

The integration tests play the host: a real trio-websocket server on
127.0.0.1, and the real ``python -m fireclaw.guest_daemon`` dialling it.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import BinaryIO, TypeVar

import psutil
import pytest
import trio
from fireclaw.guest_daemon.exits import EX_CONFIG
from fireclaw.guest_daemon.harness import (
    Identity,
    OutputCap,
    harness_argv,
    one_line,
    spawn_failure,
    task_env,
    task_output,
)
from fireclaw.guest_daemon.protocol import (
    EXIT_CANCELLED,
    MAX_OUTPUT_CHUNK,
    MAX_RESULT_BYTES,
    PROTOCOL_VERSION,
    Cancel,
    ChatHarness,
    Exited,
    Goodbye,
    GuestMessage,
    Harness,
    Heartbeat,
    Hello,
    HostMessage,
    IrcPresence,
    Output,
    Promote,
    Promoted,
    Run,
    Stop,
    Task,
    TaskDone,
    ToolRan,
    Welcome,
    decode_guest,
    encode,
)
from fireclaw.guest_daemon.settings import ConfigError, load_config, parse_cmdline
from fireclaw.guest_daemon.users import agent_user, python_for
from ircd import NGIRCD, ircd_server
from ircperson import person
from scripted_model import ScriptedModel, Stream, tool_call
from scripted_model import text as model_text
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

TOKEN = "t0ken-0123456789abcdef"
VM_ID = "vm-test-1"
WAIT = 15.0  # generous: the daemon is a fresh interpreter on a possibly busy machine

M = TypeVar("M", bound=GuestMessage)
#: What agent work runs under: the unprivileged agent user, who may not be able
#: to run this test's own interpreter (a pyenv under a private /root).
AGENT_PYTHON = python_for(agent_user(os.environ))


# --- pure helpers --------------------------------------------------------------


def _identity(**changes: object) -> Identity:
    fields: dict[str, object] = dict(
        name="ada", role="coder", persona="terse", model="m1", argv=("h", "{prompt}"), timeout=5.0
    )
    fields.update(changes)
    return Identity(**fields)  # type: ignore[arg-type]


def test_harness_argv_replaces_only_exact_placeholder() -> None:
    argv = ["tool", "{prompt}", "--x={prompt}", "{prompt}"]
    assert harness_argv(argv, "do it") == ["tool", "do it", "--x={prompt}", "do it"]


def test_identity_from_promote() -> None:
    msg = Promote(
        name="ada", role="coder", persona="p", model="m", harness=Harness(argv=["a"], timeout=3)
    )
    assert Identity.from_promote(msg) == Identity(
        name="ada", role="coder", persona="p", model="m", argv=("a",), timeout=3.0
    )


def test_task_env_adds_identity_and_hides_token() -> None:
    base = {"PATH": "/bin", "FIRECLAW_TOKEN": TOKEN, "FIRECLAW_VM_ID": VM_ID}
    env = task_env(base, _identity(), 7, "hello")
    assert env["PATH"] == "/bin"
    assert "FIRECLAW_TOKEN" not in env
    assert env["FIRECLAW_PROMPT"] == "hello"
    assert env["FIRECLAW_AGENT"] == "ada"
    assert env["FIRECLAW_ROLE"] == "coder"
    assert env["FIRECLAW_PERSONA"] == "terse"
    assert env["FIRECLAW_MODEL"] == "m1"
    assert env["FIRECLAW_TASK_ID"] == "7"
    assert base["FIRECLAW_TOKEN"] == TOKEN  # the caller's mapping is left alone


def test_output_cap_keeps_prefix_and_counts_the_rest() -> None:
    cap = OutputCap(limit=10)
    cap.feed(b"12345")
    assert not cap.truncated
    cap.feed(b"67890abc")
    cap.feed(b"def")
    assert cap.kept == b"1234567890"
    assert cap.dropped == 6
    assert cap.truncated


def test_task_output_appends_note_on_its_own_line() -> None:
    assert task_output(b"partial", truncated=False, note="timed out after 2s") == (
        "partial\ntimed out after 2s",
        False,
    )
    assert task_output(b"line\n", truncated=False, note="n") == ("line\nn", False)
    assert task_output(b"", truncated=True) == ("", True)


def test_task_output_stays_within_limit_in_utf8_bytes() -> None:
    # Invalid bytes become U+FFFD (3 bytes each): the text must still fit.
    text, truncated = task_output(b"\xff" * 100, truncated=False, limit=100)
    assert len(text.encode()) <= 100
    assert truncated
    # A cut never leaves half a character behind.
    text, truncated = task_output("é".encode() * 60, truncated=False, note="[x]", limit=100)
    assert text.endswith("\n[x]")
    assert len(text.encode()) <= 100
    assert set(text[:-4]) == {"é"}
    assert truncated


def test_spawn_failure_codes() -> None:
    missing = FileNotFoundError(errno.ENOENT, "No such file or directory", "nope")
    assert spawn_failure(missing) == (127, "No such file or directory: nope")
    denied = PermissionError(errno.EACCES, "Permission denied", "/etc/passwd")
    assert spawn_failure(denied) == (126, "Permission denied: /etc/passwd")
    assert spawn_failure(ValueError("embedded null byte")) == (126, "embedded null byte")


def test_one_line() -> None:
    assert one_line("a\nb\r\n  c") == "a b c"
    assert len(one_line("x" * 5000)) == 1024


def test_parse_cmdline() -> None:
    text = 'console=ttyS0 quiet fireclaw.url=ws://10.0.0.1:8080/ fireclaw.vm_id="vm 1" x=\n'
    assert parse_cmdline(text) == {
        "console": "ttyS0",
        "fireclaw.url": "ws://10.0.0.1:8080/",
        "fireclaw.vm_id": "vm 1",
        "x": "",
    }


ENV = {
    "FIRECLAW_CONTROL_URL": "ws://127.0.0.1:1/",
    "FIRECLAW_VM_ID": "from-env",
    "FIRECLAW_TOKEN": TOKEN,
}


def test_config_from_env() -> None:
    config = load_config([], ENV)
    assert (config.url, config.vm_id, config.token) == ("ws://127.0.0.1:1/", "from-env", TOKEN)
    assert config.connect_timeout == 30.0
    assert not config.set_clock
    assert load_config([], {**ENV, "FIRECLAW_SET_CLOCK": "1"}).set_clock


def test_config_precedence_flags_over_cmdline_over_env(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("ro fireclaw.vm_id=from-cmdline fireclaw.url=ws://10.0.0.1:9/\n")
    config = load_config(["--cmdline", str(cmdline), "--url", "wss://h:1/x"], ENV)
    assert config.url == "wss://h:1/x"
    assert config.vm_id == "from-cmdline"
    assert config.token == TOKEN
    config = load_config(["--vm-id", "from-flag", "--connect-timeout", "2.5"], ENV)
    assert config.vm_id == "from-flag"
    assert config.connect_timeout == 2.5


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ([], {}, "missing url"),
        ([], {**ENV, "FIRECLAW_VM_ID": ""}, "missing vm_id"),
        (["--url", "http://h/"], ENV, "invalid url"),
        (["--url", "ws://h:99999/"], ENV, "invalid url"),
        (["--vm-id", "no spaces"], ENV, "invalid vm_id"),
        (["--connect-timeout", "-1"], ENV, "invalid --connect-timeout"),
        (["--bogus"], ENV, "unrecognized arguments"),
        (["--cmdline", "/nonexistent/cmdline"], ENV, "--cmdline /nonexistent/cmdline"),
    ],
)
def test_config_errors_are_one_line(argv: list[str], env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(argv, env)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root switches to the agent user")
def test_config_names_an_agent_user_that_does_not_exist() -> None:
    with pytest.raises(ConfigError) as info:
        load_config([], {**ENV, "FIRECLAW_AGENT_USER": "no-such-user-x"})
    assert str(info.value) == (
        "agent user: no user 'no-such-user-x' in this guest"
        " (set FIRECLAW_AGENT_USER to one that exists)"
    )
    config = load_config([], {**ENV, "FIRECLAW_AGENT_USER": "root"})
    assert config.agent_user is not None
    assert (config.agent_user.uid, config.agent_user.switch) == (0, False)


def test_config_error_never_shows_the_token() -> None:
    bad = "short!secret"
    with pytest.raises(ConfigError) as info:
        load_config(["--token", bad], ENV)
    assert "invalid token" in str(info.value)
    assert bad not in str(info.value)


# --- the daemon as a subprocess, against a real WebSocket host -----------------------


class Conn:
    """The host's side of one guest connection."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws

    async def send(self, msg: HostMessage) -> None:
        await self.ws.send_message(encode(msg))

    async def recv(self, *, heartbeats: bool = False) -> GuestMessage:
        """The next message from the guest (heartbeats skipped unless asked for)."""
        with trio.fail_after(WAIT):
            while True:
                msg = decode_guest(await self.ws.get_message())
                if heartbeats or not isinstance(msg, Heartbeat):
                    return msg

    async def expect(self, kind: type[M]) -> M:
        msg = await self.recv()
        assert isinstance(msg, kind), msg
        return msg

    async def welcome(self, interval: float = 60.0) -> Hello:
        hello = await self.expect(Hello)
        await self.send(Welcome(entropy=os.urandom(64), unix_time=0.0, heartbeat_interval=interval))
        return hello

    async def run(self, req: int, argv: list[str]) -> tuple[dict[str, list[bytes]], Exited]:
        """Send a Run and collect its output chunks by stream until its Exited."""
        await self.send(Run(req=req, argv=argv))
        chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        while True:
            msg = await self.recv()
            if isinstance(msg, Output) and msg.req == req:
                chunks[msg.stream].append(msg.data)
            elif isinstance(msg, Exited) and msg.req == req:
                return chunks, msg
            else:
                raise AssertionError(f"unexpected {msg!r}")


def _env_without_fireclaw() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FIRECLAW_")}


class Host:
    """A control listener plus the guest daemons launched against it."""

    def __init__(self, port: int, conns: trio.MemoryReceiveChannel[Conn], tmp: Path) -> None:
        self.url = f"ws://127.0.0.1:{port}/"
        self._conns = conns
        self._tmp = tmp
        self.procs: list[trio.Process] = []

    def env(self, **changes: str) -> dict[str, str]:
        env = _env_without_fireclaw()
        env.update(FIRECLAW_CONTROL_URL=self.url, FIRECLAW_VM_ID=VM_ID, FIRECLAW_TOKEN=TOKEN)
        env.update(changes)
        return env

    def _open_stderr(self) -> BinaryIO:
        return open(self.stderr_path, "ab")

    async def launch(self, *args: str, env: dict[str, str] | None = None) -> trio.Process:
        with self._open_stderr() as stderr:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "fireclaw.guest_daemon", *args],
                env=self.env() if env is None else env,
                cwd=self._tmp,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        self.procs.append(proc)
        return proc

    @property
    def stderr_path(self) -> Path:
        return self._tmp / "daemon.stderr"

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    async def accept(self) -> Conn:
        with trio.fail_after(WAIT):
            return await self._conns.receive()

    async def start(self) -> tuple[trio.Process, Conn]:
        proc = await self.launch()
        return proc, await self.accept()


async def exit_code(proc: trio.Process) -> int:
    with trio.fail_after(WAIT):
        return await proc.wait()


def kill_tree(pid: int) -> None:
    try:
        parent = psutil.Process(pid)
        family = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for proc in family:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (a zombie waiting for init counts as gone)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
async def host(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Host]:
    send, receive = trio.open_memory_channel[Conn](4)

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await send.send(Conn(ws))
        await trio.sleep_forever()  # the test owns the connection from here

    server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
    host = Host(server.port, receive, tmp_path)
    try:
        yield host
    finally:
        for proc in host.procs:
            if proc.returncode is None:
                kill_tree(proc.pid)
                await proc.wait()


async def test_hello_then_heartbeats(host: Host) -> None:
    proc, conn = await host.start()
    hello = await conn.expect(Hello)
    assert (hello.vm_id, hello.token) == (VM_ID, TOKEN)
    assert hello.version == PROTOCOL_VERSION
    assert hello.pid == proc.pid
    await conn.send(Welcome(entropy=os.urandom(32), unix_time=1.0, heartbeat_interval=0.05))
    seqs = []
    for _ in range(3):
        beat = await conn.recv(heartbeats=True)
        assert isinstance(beat, Heartbeat)
        seqs.append(beat.seq)
    assert seqs == [0, 1, 2]


async def test_flags_override_env(host: Host) -> None:
    await host.launch("--vm-id", "from-flag")
    conn = await host.accept()
    assert (await conn.expect(Hello)).vm_id == "from-flag"


async def test_run_echo(host: Host) -> None:
    _, conn = await host.start()
    await conn.welcome()
    chunks, exited = await conn.run(1, ["echo", "hi"])
    assert b"".join(chunks["stdout"]) == b"hi\n"
    assert chunks["stderr"] == []
    assert exited == Exited(req=1, code=0)


async def test_run_exit_code_and_stderr(host: Host) -> None:
    _, conn = await host.start()
    await conn.welcome()
    chunks, exited = await conn.run(2, ["sh", "-c", "echo oops >&2; exit 3"])
    assert b"".join(chunks["stderr"]) == b"oops\n"
    assert exited.code == 3


async def test_run_missing_binary(host: Host) -> None:
    _, conn = await host.start()
    await conn.welcome()
    chunks, exited = await conn.run(3, ["fireclaw-no-such-binary"])
    assert chunks == {"stdout": [], "stderr": []}
    assert exited.code == 127
    assert "fireclaw-no-such-binary" in exited.error


async def test_run_large_output_is_chunked_and_complete(host: Host) -> None:
    _, conn = await host.start()
    await conn.welcome()
    script = "import sys; sys.stdout.buffer.write(bytes(range(256)) * 800)"
    chunks, exited = await conn.run(4, [AGENT_PYTHON, "-c", script])
    assert exited.code == 0
    assert all(len(chunk) <= MAX_OUTPUT_CHUNK for chunk in chunks["stdout"])
    assert len(chunks["stdout"]) > 1
    assert b"".join(chunks["stdout"]) == bytes(range(256)) * 800


async def test_runs_are_concurrent(host: Host, tmp_path: Path) -> None:
    _, conn = await host.start()
    await conn.welcome()
    flag = tmp_path / "flag"
    waiter = f"while [ ! -e {flag} ]; do sleep 0.01; done; echo released"
    # As root (``run --user root``): the flag is in root's private temp directory.
    await conn.send(Run(req=10, argv=["sh", "-c", waiter], user="root"))
    await conn.send(Run(req=11, argv=["touch", str(flag)], user="root"))
    # Run 10 can only end after run 11 made the flag: a daemon that ran one at a
    # time would never get to 11 and nothing below would arrive. Which of 10's end
    # and 11's exit is reported first is up to the scheduler.
    seen = [await conn.recv() for _ in range(3)]
    released = Output(req=10, stream="stdout", data=b"released\n")
    assert sorted(map(repr, seen)) == sorted(
        map(repr, [released, Exited(req=10, code=0), Exited(req=11, code=0)])
    )
    assert seen.index(released) < seen.index(Exited(req=10, code=0))


async def test_task_before_promotion_is_refused(host: Host) -> None:
    _, conn = await host.start()
    await conn.welcome()
    await conn.send(Task(task_id=1, prompt="hi"))
    done = await conn.expect(TaskDone)
    assert done.code == 125
    assert "not promoted" in done.output


HARNESS_SCRIPT = (
    'printf "%s|%s|%s|%s|%s|%s|%s|%s\\n" "$1" "$FIRECLAW_PROMPT" "$FIRECLAW_AGENT"'
    ' "$FIRECLAW_ROLE" "$FIRECLAW_PERSONA" "$FIRECLAW_MODEL" "$FIRECLAW_TASK_ID"'
    ' "${FIRECLAW_TOKEN-hidden}"; echo on-stderr >&2'
)


async def test_promote_then_task_and_hot_reload(host: Host) -> None:
    _, conn = await host.start()
    await conn.welcome()
    harness = Harness(argv=["sh", "-c", HARNESS_SCRIPT, "sh", "{prompt}"], timeout=30)
    await conn.send(Promote(name="ada", role="coder", persona="terse", model="m1", harness=harness))
    assert await conn.expect(Promoted) == Promoted(name="ada")
    await conn.send(Task(task_id=5, prompt="fix the bug"))
    done = await conn.expect(TaskDone)
    assert done == TaskDone(
        task_id=5,
        code=0,
        output="fix the bug|fix the bug|ada|coder|terse|m1|5|hidden\non-stderr\n",
    )

    await conn.send(Promote(name="ada", role="coder", model="m2", harness=harness))
    assert await conn.expect(Promoted) == Promoted(name="ada")
    await conn.send(Task(task_id=6, prompt="again"))
    done = await conn.expect(TaskDone)
    assert done.output.startswith("again|again|ada|coder||m2|6|")


async def test_chat_harness_answers_a_task_with_the_models_final_answer(host: Host) -> None:
    model = ScriptedModel(
        [tool_call("run_shell", {"command": "id -u"}), model_text("the uid is in the audit")]
    )
    async with trio.open_nursery() as nursery:
        base_url = await nursery.start(model.serve)
        _, conn = await host.start()
        await conn.welcome()
        harness = ChatHarness(base_url=base_url, model="scripted", tool_mode="native")
        await conn.send(Promote(name="ada", role="worker", persona="terse", harness=harness))
        assert await conn.expect(Promoted) == Promoted(name="ada")
        await conn.send(Task(task_id=3, prompt="who are you?"))
        ran = await conn.expect(ToolRan)
        assert (ran.task_id, ran.tool, ran.code) == (3, "run_shell", 0)
        assert ran.arguments == '{"command": "id -u"}'
        assert ran.output == f"{agent_user(os.environ).uid}\n"
        done = await conn.expect(TaskDone)
        assert done == TaskDone(task_id=3, code=0, output="the uid is in the audit")
        assert model.requests[0]["messages"][-1] == {"role": "user", "content": "who are you?"}
        assert "terse" in model.requests[0]["messages"][0]["content"]
        nursery.cancel_scope.cancel()


async def test_cancel_ends_a_chat_turn_and_closes_its_stream(host: Host) -> None:
    model = ScriptedModel([Stream([{"choices": [{"delta": {"content": "hm"}}]}], hang=True)])
    async with trio.open_nursery() as nursery:
        base_url = await nursery.start(model.serve)
        _, conn = await host.start()
        await conn.welcome()
        harness = ChatHarness(base_url=base_url, model="scripted", tool_mode="json")
        await conn.send(Promote(name="ada", role="worker", harness=harness))
        await conn.expect(Promoted)
        await conn.send(Task(task_id=4, prompt="think forever"))
        with trio.fail_after(WAIT):
            await model.hanging.wait()
        await conn.send(Cancel(reason="operator said stop"))
        done = await conn.expect(TaskDone)
        assert done == TaskDone(
            task_id=4, code=EXIT_CANCELLED, output="cancelled: operator said stop"
        )
        with trio.fail_after(WAIT):
            await model.stream_closed.wait()
        nursery.cancel_scope.cancel()


@pytest.mark.skipif(NGIRCD is None, reason="ngircd is not installed")
async def test_chat_agent_answers_a_mention_on_irc_with_the_model(host: Host) -> None:
    model = ScriptedModel(
        [
            tool_call("run_shell", {"command": "echo 4"}),
            model_text("2+2 is 4, I checked"),
            model_text("you asked about 2+2"),
        ]
    )
    async with trio.open_nursery() as nursery, ircd_server() as ircd:
        base_url = await nursery.start(model.serve)
        async with person(ircd.address, "carol", "#agents") as carol:
            _, conn = await host.start()
            await conn.welcome()
            irc = IrcPresence(
                host=ircd.host, port=ircd.port, nick="alice", channels=["#agents"], cooldown=0
            )
            harness = ChatHarness(base_url=base_url, model="scripted", tool_mode="native")
            await conn.send(Promote(name="alice", role="worker", harness=harness, irc=irc))
            await conn.expect(Promoted)
            assert (await carol.next_from("alice")).type == "join"
            carol.do("privmsg", "#agents", "alice: what is 2+2?")
            notice = await carol.aexpect(
                "a tool notice", lambda e: e.type == "pubnotice" and e.source.nick == "alice"
            )
            assert notice.arguments[0] == '[run_shell] {"command": "echo 4"} -> exit 0'
            reply = await carol.next_from("alice")
            assert (reply.type, reply.target) == ("pubmsg", "#agents")
            assert reply.arguments[0] == "carol: 2+2 is 4, I checked"
            ran = await conn.expect(ToolRan)
            assert (ran.task_id, ran.tool, ran.output) == (0, "run_shell", "4\n")

            carol.do("privmsg", "#agents", "alice, what did I ask?")
            reply = await carol.next_from("alice")
            assert reply.arguments[0] == "carol: you asked about 2+2"
            # The conversation so far came with the second question.
            history = model.requests[2]["messages"][1:]
            assert history == [
                {"role": "user", "content": "carol: what is 2+2?"},
                {"role": "assistant", "content": "2+2 is 4, I checked"},
                {"role": "user", "content": "carol: what did I ask?"},
            ]
            await conn.send(Stop(reason="test over"))
            await conn.expect(Goodbye)
        nursery.cancel_scope.cancel()


async def test_run_as_a_user_that_does_not_exist(host: Host) -> None:
    _, conn = await host.start()
    await conn.welcome()
    await conn.send(Run(req=1, argv=["id", "-u"], user="no-such-user-x"))
    assert await conn.expect(Exited) == Exited(
        req=1, code=126, error="no user 'no-such-user-x' in this guest"
    )
    chunks, exited = await conn.run(2, ["id", "-u"])
    assert exited.code == 0
    assert chunks["stdout"] == [f"{agent_user(os.environ).uid}\n".encode()]


async def test_task_output_is_capped(host: Host) -> None:
    _, conn = await host.start()
    await conn.welcome()
    script = "import sys; sys.stdout.write('y' * 100_000)"
    harness = Harness(argv=[AGENT_PYTHON, "-c", script])
    await conn.send(Promote(name="bob", role="worker", harness=harness))
    await conn.expect(Promoted)
    await conn.send(Task(task_id=9, prompt="p"))
    done = await conn.expect(TaskDone)
    assert done.code == 0
    assert done.truncated
    assert done.output == "y" * MAX_RESULT_BYTES


async def test_task_timeout_kills_the_harness(host: Host) -> None:
    _, conn = await host.start()
    await conn.welcome()
    # Long enough for sh to start and say its pid on a loaded machine, short
    # enough that the test does not wait long for it.
    timeout = 5.0
    harness = Harness(argv=["sh", "-c", "echo $$; exec sleep 300"], timeout=timeout)
    await conn.send(Promote(name="slow", role="worker", harness=harness))
    await conn.expect(Promoted)
    await conn.send(Task(task_id=2, prompt="p"))
    done = await conn.expect(TaskDone)
    assert done.code == -9
    assert f"timed out after {timeout:g}s" in done.output
    assert done.output.split()[0].isdigit(), f"sh did not start within {timeout}s: {done.output!r}"
    assert gone(int(done.output.split()[0]))


async def test_stop_kills_process_groups_and_exits_0(host: Host) -> None:
    proc, conn = await host.start()
    await conn.welcome()
    # The shell and its grandchild both ignore SIGTERM: only the SIGKILL gets them.
    script = 'trap "" TERM; sleep 300 & echo $$ $!; wait'
    await conn.send(Run(req=7, argv=["sh", "-c", script]))
    started = await conn.expect(Output)
    pids = [int(pid) for pid in started.data.split()]
    assert len(pids) == 2 and not any(gone(pid) for pid in pids)

    await conn.send(Stop(reason="test over"))
    assert await conn.expect(Exited) == Exited(req=7, code=-9)
    assert await conn.expect(Goodbye) == Goodbye(reason="test over")
    assert await exit_code(proc) == 0
    assert all(gone(pid) for pid in pids)
    with pytest.raises(ConnectionClosed) as info:
        await conn.recv()
    assert info.value.reason is not None and info.value.reason.code == 1000


async def test_sigterm_stops_like_stop(host: Host) -> None:
    proc, conn = await host.start()
    await conn.welcome()
    await conn.send(Run(req=1, argv=["sh", "-c", "echo $$; exec sleep 300"]))
    pid = int((await conn.expect(Output)).data)
    proc.terminate()
    assert await conn.expect(Exited) == Exited(req=1, code=-15)
    assert await conn.expect(Goodbye) == Goodbye(reason="signal SIGTERM")
    assert await exit_code(proc) == 0
    assert gone(pid)


async def test_host_closing_the_connection_exits_1(host: Host) -> None:
    proc, conn = await host.start()
    await conn.welcome()
    await conn.send(Run(req=1, argv=["sh", "-c", "echo $$; exec sleep 300"]))
    pid = int((await conn.expect(Output)).data)
    await conn.ws.aclose()
    assert await exit_code(proc) == 1
    assert gone(pid)
    assert "connection closed by the host" in host.stderr()


async def test_in_a_vm_a_lost_connection_is_dialled_again(host: Host, tmp_path: Path) -> None:
    """Configured from a kernel command line (inside a VM), the daemon does not exit
    when the host goes away: a VM restored from a snapshot wakes up with a dead
    connection and must reach its new host at the same URL."""
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(
        f"console=ttyS0 ro fireclaw.url={host.url} fireclaw.vm_id={VM_ID} fireclaw.token={TOKEN}\n"
    )
    proc = await host.launch("--cmdline", str(cmdline), env=_env_without_fireclaw())
    first = await host.accept()
    hello = await first.welcome()
    assert (hello.vm_id, hello.token, hello.pid) == (VM_ID, TOKEN, proc.pid)
    _, exited = await first.run(1, ["true"])
    assert exited.code == 0
    await first.ws.aclose()

    second = await host.accept()
    again = await second.welcome()
    assert (again.vm_id, again.token, again.pid) == (VM_ID, TOKEN, proc.pid)
    chunks, exited = await second.run(2, ["echo", "still here"])
    assert (b"".join(chunks["stdout"]), exited.code) == (b"still here\n", 0)
    await second.send(Stop(reason="done"))
    assert await second.expect(Goodbye) == Goodbye(reason="done")
    assert await exit_code(proc) == 0
    assert "lost; dialling again" in host.stderr()


async def test_undecodable_frame_exits_1_with_one_line(host: Host) -> None:
    proc, conn = await host.start()
    await conn.welcome()
    await conn.ws.send_message(b"\xc1")  # a byte msgpack never uses
    assert await exit_code(proc) == 1
    errors = [line for line in host.stderr().splitlines() if " ERROR " in line]
    assert len(errors) == 1
    assert "bad frame from the host" in errors[0]


async def test_unreachable_host_exits_1_after_the_deadline(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = _env_without_fireclaw()
    argv = [sys.executable, "-m", "fireclaw.guest_daemon", "--connect-timeout", "0.5"]
    argv += ["--url", f"ws://127.0.0.1:{port}/", "--vm-id", VM_ID, "--token", TOKEN]
    with trio.fail_after(WAIT):
        result = await trio.run_process(
            argv, env=env, cwd=tmp_path, capture_stdout=True, capture_stderr=True, check=False
        )
    assert result.returncode == 1
    assert b"cannot reach the host" in result.stderr


async def test_a_host_that_never_answers_the_upgrade_does_not_hold_the_guest(
    tmp_path: Path,
) -> None:
    """TCP accepted, the WebSocket upgrade never answered: the guest still gives up
    at its own connect deadline instead of waiting for the host to hang up."""
    held: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:
        held.append(stream)  # never read, never answered, never closed
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, hold, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        argv = [sys.executable, "-m", "fireclaw.guest_daemon", "--connect-timeout", "1"]
        argv += ["--url", f"ws://127.0.0.1:{port}/", "--vm-id", VM_ID, "--token", TOKEN]
        with trio.fail_after(WAIT):
            result = await trio.run_process(
                argv,
                env=_env_without_fireclaw(),
                cwd=tmp_path,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        assert result.returncode == 1
        assert b"no WebSocket upgrade within" in result.stderr
        assert held  # it did get as far as a TCP connection
        nursery.cancel_scope.cancel()


async def test_missing_config_exits_78_with_one_line(tmp_path: Path) -> None:
    with trio.fail_after(WAIT):
        result = await trio.run_process(
            [sys.executable, "-m", "fireclaw.guest_daemon"],
            env=_env_without_fireclaw(),
            cwd=tmp_path,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == EX_CONFIG
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1
    assert "missing url" in lines[0]
