"""The chat harness: its loop without I/O, and the loop against a scripted model server.

The server (tests/scripted_model.py) is a test double speaking real HTTP on
loopback; the tools are real processes started as the unprivileged agent user
(``nobody`` on a host without an ``agent`` user, when the tests run as root).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio
from fireclaw.guest_daemon import confine
from fireclaw.guest_daemon.agent import ChatAgent, ToolModes, TurnOutcome
from fireclaw.guest_daemon.chat import REPEAT_LIMIT, Answer, Turn, TurnStateError, truncate_middle
from fireclaw.guest_daemon.harness import Children, Identity
from fireclaw.guest_daemon.model_reply import Reply, ReplyMerger, SseDecoder, ToolCall
from fireclaw.guest_daemon.protocol import (
    EXIT_CANCELLED,
    ChatHarness,
    GuestMessage,
    Task,
    TaskDone,
)
from fireclaw.guest_daemon.tools import EXIT_TIMEOUT, MEMORY_FILE, Toolbox, ToolResult
from fireclaw.guest_daemon.turns import Turns, cut_bytes
from fireclaw.guest_daemon.users import AgentDir, RunAs, agent_user
from scripted_model import ScriptedModel, Status, Stream, action, text, tool_call

WAIT = 30.0  # generous: tools are fresh processes on a possibly busy machine


# --- without I/O ---------------------------------------------------------------


def test_sse_decoder_splits_events_across_feeds_and_line_endings() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b'data: {"a"') == []
    assert decoder.feed(b": 1}\r\n\r\n: a comment\n\ndata: x\ndata: y\r") == ['{"a": 1}']
    assert decoder.feed(b"\n\ndata: [DONE]") == ["x\ny"]
    assert decoder.close() == ["[DONE]"]


def test_reply_merger_merges_streamed_tool_calls_by_index() -> None:
    merger = ReplyMerger()
    merger.feed({"choices": []})  # a keep-alive or usage chunk: nothing to merge
    merger.feed(
        {"choices": [{"delta": {"tool_calls": [{"index": 1, "function": {"name": "read_file"}}]}}]}
    )
    merger.feed(
        {
            "choices": [
                {
                    "delta": {
                        "tool_calls": [
                            {"index": 0, "id": "a", "function": {"name": "run_shell"}},
                            {"index": 1, "function": {"arguments": '{"pa'}},
                        ]
                    }
                }
            ]
        }
    )
    merger.feed(
        {
            "choices": [
                {
                    "delta": {
                        "tool_calls": [{"index": 0, "function": {"arguments": {"command": "ls"}}}]
                    }
                }
            ]
        }
    )  # noqa: E501
    merger.feed(
        {
            "choices": [
                {"delta": {"tool_calls": [{"index": 1, "function": {"arguments": 'th": "x"}'}}]}}
            ]
        }
    )  # noqa: E501
    merger.feed({"choices": [{"delta": {}, "finish_reason": "tool_calls"}], "usage": {"n": 1}})
    reply = merger.reply()
    assert reply.finish_reason == "tool_calls"
    assert reply.usage == {"n": 1}
    assert [(c.id, c.name, c.arguments) for c in reply.tool_calls] == [
        ("a", "run_shell", {"command": "ls"}),  # arguments sent as an object
        ("", "read_file", {"path": "x"}),  # no id: the turn makes one up
    ]


def test_reply_merger_reads_a_whole_response_and_bad_arguments() -> None:
    merger = ReplyMerger()
    merger.feed(
        {
            "choices": [
                {
                    "message": {
                        "content": "",
                        "tool_calls": [
                            {"function": {"name": "a", "arguments": '"{\\"k\\": 1}"'}},
                            {"function": {"name": "b", "arguments": "{not json"}},
                        ],
                    },
                    "finish_reason": "tool_calls",
                }
            ]
        }
    )
    first, second = merger.reply().tool_calls
    assert first.arguments == {"k": 1}  # encoded twice, read anyway
    assert second.arguments is None and "not valid JSON" in second.error


def test_truncate_middle_keeps_head_and_tail_with_a_marker() -> None:
    body = "H" * 3000 + "M" * 10_000 + "T" * 3000
    shown = truncate_middle(body, 4000)
    assert shown.startswith("H" * 1000) and shown.endswith("T" * 1000)
    assert "characters cut" in shown and len(shown) <= 4100
    assert truncate_middle("short", 4000) == "short"


def test_audit_output_is_cut_in_utf8_bytes_head_and_tail() -> None:
    text = "é" * 10_000 + "END"
    cut, truncated = cut_bytes(text, 1000)
    assert truncated and len(cut.encode()) <= 1000
    assert cut.startswith("é" * 200) and cut.endswith("END") and "bytes cut" in cut
    assert cut_bytes("small", 1000) == ("small", False)


def _turn(**changes: Any) -> Turn:
    args: dict[str, Any] = dict(
        model="m", system="be brief", prompt="hi", tools=[], native=True, max_steps=3, max_tokens=64
    )
    args.update(changes)
    return Turn(**args)


def test_turn_refuses_moves_out_of_order() -> None:
    turn = _turn()
    with pytest.raises(TurnStateError):
        turn.on_reply(Reply(content="early"))
    turn.request()
    with pytest.raises(TurnStateError):
        turn.request()
    with pytest.raises(TurnStateError):
        turn.on_result(ToolCall("x", "run_shell", {}, "{}"), "out")


# --- the loop against the scripted server -------------------------------------


def _read(root: str, path: str) -> str:
    with open(os.path.join(root, path), encoding="utf-8") as file:
        return file.read()


class Rig:
    """A chat agent on a scripted model, with real tools as the agent user."""

    def __init__(self, nursery: trio.Nursery, workdir: str, user: RunAs) -> None:
        self.nursery = nursery
        self.workdir = workdir
        self.user = user
        self.children = Children()
        self.reports: list[tuple[ToolCall, ToolResult]] = []

    async def agent(self, model: ScriptedModel, **harness: Any) -> ChatAgent:
        base_url = await self.nursery.start(model.serve)
        spec = ChatHarness(base_url=base_url, model="scripted", **harness)
        toolbox = Toolbox(
            spec.tools,
            root=self.workdir,
            user=self.user,
            children=self.children,
            env={"PATH": "/usr/bin:/bin"},
            timeout=spec.tool_timeout,
        )
        return ChatAgent(
            spec,
            name="ada",
            role="worker",
            persona="You are terse.",
            toolbox=toolbox,
            modes=ToolModes(),
        )

    async def report(self, call: ToolCall, result: ToolResult) -> None:
        self.reports.append((call, result))

    async def answer(self, agent: ChatAgent, prompt: str = "go") -> TurnOutcome:
        with trio.fail_after(WAIT):
            return await agent.answer(prompt, report=self.report)


@pytest.fixture
def user() -> RunAs:
    return agent_user(os.environ)


@pytest.fixture
def workdir(user: RunAs) -> Iterator[str]:
    made = AgentDir(RunAs(user.name, user.uid, user.gid, "/nonexistent", user.switch))
    try:
        yield made.path
    finally:
        made.close()


@pytest.fixture
async def rig(workdir: str, user: RunAs) -> AsyncIterator[Rig]:
    async with trio.open_nursery() as nursery:
        yield Rig(nursery, workdir, user)
        nursery.cancel_scope.cancel()


async def test_native_tool_call_runs_as_the_agent_user(rig: Rig) -> None:
    model = ScriptedModel(
        [tool_call("run_shell", {"command": "id -u; pwd"}, call_id=None), text("all done")],
    )
    agent = await rig.agent(model, tool_mode="native")
    outcome = await rig.answer(agent, "who runs tools?")
    assert outcome == TurnOutcome(True, "all done", 2)
    first, second = model.requests
    assert [t["function"]["name"] for t in first["tools"]] == [
        "run_shell",
        "read_file",
        "write_file",
        "save_memory",
    ]
    assert "response_format" not in first
    system = first["messages"][0]
    assert system["role"] == "system" and "You are terse." in system["content"]
    assert first["max_tokens"] == 512 and first["stream"] is True
    asked, result = second["messages"][-2:]
    assert asked["tool_calls"][0]["function"] == {
        "name": "run_shell",
        "arguments": json.dumps({"command": "id -u; pwd"}),
    }
    call_id = asked["tool_calls"][0]["id"]
    assert call_id  # the server sent none: the turn made one up
    assert result["role"] == "tool" and result["tool_call_id"] == call_id
    assert result["content"] == f"{rig.user.uid}\n{rig.workdir}\n"
    assert os.geteuid() != 0 or rig.user.uid != 0  # as root, tools run as someone else
    [(call, ran)] = rig.reports
    assert call.name == "run_shell" and ran.code == 0


async def test_auto_mode_asks_the_server_for_tool_support(rig: Rig) -> None:
    native = ScriptedModel([text("yes")], supports_tools=True)
    await rig.answer(await rig.agent(native))
    assert "tools" in native.requests[0] and "response_format" not in native.requests[0]
    plain = ScriptedModel([action({"final": "yes"})])  # /props without template caps
    outcome = await rig.answer(await rig.agent(plain))
    assert outcome.text == "yes"
    assert plain.requests[0]["response_format"]["type"] == "json_schema"


async def test_json_mode_writes_a_file_as_the_agent_user(rig: Rig) -> None:
    model = ScriptedModel(
        [
            action({"tool": "write_file", "arguments": {"path": "notes/a.txt", "content": "hi"}}),
            action({"final": "wrote it"}),
        ]
    )
    agent = await rig.agent(model, tool_mode="json")
    outcome = await rig.answer(agent)
    assert outcome == TurnOutcome(True, "wrote it", 2)
    assert _read(rig.workdir, "notes/a.txt") == "hi"
    assert os.stat(os.path.join(rig.workdir, "notes/a.txt")).st_uid == rig.user.uid
    schema = model.requests[0]["response_format"]["json_schema"]["schema"]
    choices = [c["properties"] for c in schema["oneOf"]]
    offered = [c["tool"]["const"] for c in choices if "tool" in c]
    assert offered == ["run_shell", "read_file", "write_file", "save_memory"]
    assert {"required": ["final"]}.items() <= schema["oneOf"][-1].items()
    assert "tools" not in model.requests[0]
    assert model.requests[1]["messages"][-1]["content"].startswith("Result of write_file:")


async def test_malformed_and_unknown_calls_are_told_to_the_model(rig: Rig) -> None:
    model = ScriptedModel(
        [
            tool_call("run_shell", "{not json"),
            tool_call("format_disk", {}),
            text("sorry"),
        ]
    )
    agent = await rig.agent(model, tool_mode="native")
    outcome = await rig.answer(agent)
    assert outcome == TurnOutcome(True, "sorry", 3)
    assert rig.reports == []  # nothing ran
    malformed = model.requests[1]["messages"][-1]
    assert malformed["role"] == "tool" and "not valid JSON" in malformed["content"]
    unknown = model.requests[2]["messages"][-1]["content"]
    assert "unknown tool 'format_disk'" in unknown and "run_shell" in unknown


async def test_json_mode_malformed_action_is_a_failed_step(rig: Rig) -> None:
    model = ScriptedModel([text("I think the answer is 4"), action({"final": "4"})])
    outcome = await rig.answer(await rig.agent(model, tool_mode="json"))
    assert outcome == TurnOutcome(True, "4", 2)
    assert "not a valid action" in model.requests[1]["messages"][-1]["content"]


def test_json_mode_reads_an_action_in_a_code_fence() -> None:
    turn = _turn(native=False)
    turn.request()
    assert turn.on_reply(Reply(content='```json\n{"final": "4"}\n```')) == Answer("4")


async def test_step_cap_ends_the_turn(rig: Rig) -> None:
    model = ScriptedModel([tool_call("run_shell", {"command": f"echo {n}"}) for n in range(5)])
    outcome = await rig.answer(await rig.agent(model, tool_mode="native", max_steps=3))
    assert outcome == TurnOutcome(False, "no final answer within 3 model calls", 3)
    assert len(model.requests) == 3
    assert len(rig.reports) == 3


async def test_repeated_identical_calls_end_the_turn(rig: Rig) -> None:
    same = {"command": "echo again"}
    model = ScriptedModel([tool_call("run_shell", same) for _ in range(REPEAT_LIMIT + 2)])
    outcome = await rig.answer(await rig.agent(model, tool_mode="native", max_steps=10))
    assert not outcome.ok
    assert outcome.text == f"the model called run_shell the same way {REPEAT_LIMIT} times"
    assert len(rig.reports) == REPEAT_LIMIT - 1
    assert len(model.requests) == REPEAT_LIMIT


async def test_length_cut_reply_is_a_failed_step(rig: Rig) -> None:
    model = ScriptedModel([text("The answer is a long sto", finish="length"), text("42")])
    outcome = await rig.answer(await rig.agent(model, tool_mode="native", max_tokens=32))
    assert outcome == TurnOutcome(True, "42", 2)
    note = model.requests[1]["messages"][-1]
    assert note["role"] == "user" and "cut off at 32 tokens" in note["content"]
    cut = "The answer is a long sto"
    assert all(m.get("content") != cut for m in model.requests[1]["messages"])


async def test_tool_output_is_truncated_for_the_model_not_the_audit(rig: Rig) -> None:
    command = "printf 'A%.0s' $(seq 3000); printf 'B%.0s' $(seq 20000); printf 'Z%.0s' $(seq 3000)"
    model = ScriptedModel([tool_call("run_shell", {"command": command}), text("ok")])
    await rig.answer(await rig.agent(model, tool_mode="native"))
    shown = model.requests[1]["messages"][-1]["content"]
    assert shown.startswith("A" * 1000) and shown.endswith("Z" * 1000)
    assert "characters cut" in shown and len(shown) < 4100
    [(_, ran)] = rig.reports
    assert ran.output == "A" * 3000 + "B" * 20000 + "Z" * 3000


async def test_model_error_status_ends_the_turn_with_its_message(rig: Rig) -> None:
    model = ScriptedModel([Status(429, {"error": {"message": "token budget exhausted"}})])
    outcome = await rig.answer(await rig.agent(model, tool_mode="native"))
    assert outcome == TurnOutcome(False, "model server answered 429: token budget exhausted", 1)


async def test_a_stream_that_is_not_json_ends_the_turn_in_one_line(rig: Rig) -> None:
    model = ScriptedModel([Stream(["<html>bad gateway</html>"])])
    outcome = await rig.answer(await rig.agent(model, tool_mode="native"))
    assert outcome == TurnOutcome(
        False, "the model server sent something that is not JSON: '<html>bad gateway</html>'", 1
    )


async def test_tool_timeout_kills_the_group_with_exit_124(rig: Rig) -> None:
    model = ScriptedModel(
        [tool_call("run_shell", {"command": "sleep 600 & sleep 600; echo never"}), text("ok")]
    )
    agent = await rig.agent(model, tool_mode="native", tool_timeout=0.5)
    await rig.answer(agent)
    [(_, ran)] = rig.reports
    assert ran.code == EXIT_TIMEOUT and "killed after 0.5s" in ran.output
    assert len(rig.children) == 0


async def test_cancel_closes_the_stream(rig: Rig) -> None:
    model = ScriptedModel([Stream([{"choices": [{"delta": {"content": "thinking"}}]}], hang=True)])
    agent = await rig.agent(model, tool_mode="native")
    with trio.CancelScope() as turn:
        rig.nursery.start_soon(_cancel_when, model.hanging, turn)
        await rig.answer(agent)
    assert turn.cancelled_caught
    with trio.fail_after(WAIT):
        await model.stream_closed.wait()


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def test_cancel_kills_the_tool_process_group(rig: Rig) -> None:
    fifo = Path(rig.workdir, "pid")
    os.mkfifo(fifo)
    os.chmod(fifo, 0o666)
    # The shell starts a grandchild in its group and says its pid through the fifo.
    command = "sleep 600 & echo $! > pid; wait"
    model = ScriptedModel([tool_call("run_shell", {"command": command}), text("never")])
    agent = await rig.agent(model, tool_mode="native")
    pids: list[int] = []

    async def read_pid_then_cancel(scope: trio.CancelScope) -> None:
        data = await trio.to_thread.run_sync(fifo.read_text)
        pids.append(int(data))
        scope.cancel()

    with trio.CancelScope() as turn:
        rig.nursery.start_soon(read_pid_then_cancel, turn)
        await rig.answer(agent)
    assert turn.cancelled_caught
    assert rig.reports == []  # the tool never reported: it was killed
    [pid] = pids
    assert await trio.to_thread.run_sync(_dies, pid)
    assert len(rig.children) == 0


def _dies(pid: int) -> bool:
    """Whether ``pid`` is gone (or a zombie) within WAIT seconds."""
    try:
        proc = psutil.Process(pid)
        proc.wait(timeout=WAIT)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return proc.status() == psutil.STATUS_ZOMBIE
    return True


async def test_save_memory_reaches_the_next_system_prompt(rig: Rig) -> None:
    model = ScriptedModel(
        [
            tool_call("save_memory", {"text": "the build\nneeds make"}),
            text("noted"),
            text("yes"),
        ]
    )
    agent = await rig.agent(model, tool_mode="native")
    await rig.answer(agent)
    assert _read(rig.workdir, MEMORY_FILE) == "- the build needs make\n"
    await rig.answer(agent)
    assert "- the build needs make" in model.requests[2]["messages"][0]["content"]


# --- the file tools stay in the workspace --------------------------------------


@pytest.mark.parametrize(
    "path",
    ["../escape.txt", "/etc/passwd", "link-out/passwd", "passwd-link", "sub/../../x", "/"],
)
async def test_file_tools_refuse_paths_outside_the_workspace(rig: Rig, path: str) -> None:
    os.symlink("/etc", os.path.join(rig.workdir, "link-out"))
    os.symlink("/etc/passwd", os.path.join(rig.workdir, "passwd-link"))
    model = ScriptedModel(
        [
            tool_call("read_file", {"path": path}),
            tool_call("write_file", {"path": path, "content": "owned"}, call_id="c2"),
            text("refused"),
        ]
    )
    await rig.answer(await rig.agent(model, tool_mode="native"))
    (_, read), (_, write) = rig.reports
    assert read.code == confine.EXIT_REFUSED and "root:" not in read.output
    assert write.code == confine.EXIT_REFUSED
    assert _read("/etc", "passwd").startswith("root:")
    assert "escape.txt" not in os.listdir(os.path.dirname(rig.workdir))


def test_confine_refuses_a_symlink_swapped_in_on_the_way(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_text("inside")
    assert confine.read_in(str(tmp_path), "real/f", 100) == b"inside"
    assert confine.read_in(str(tmp_path), str(tmp_path / "real" / "f"), 100) == b"inside"
    (tmp_path / "real").rename(tmp_path / "moved")
    (tmp_path / "real").symlink_to(tmp_path / "moved")
    with pytest.raises(confine.Refused, match="symlink"):
        confine.read_in(str(tmp_path), "real/f", 100)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(confine.Refused):
        confine.open_in(str(tmp_path), "fifo", os.O_RDONLY | os.O_NONBLOCK)
    assert stat.S_ISFIFO(fifo.stat().st_mode)


# --- time -----------------------------------------------------------------------


async def test_turn_deadline_under_a_fake_clock(
    autojump_clock: trio.testing.MockClock, workdir: str, user: RunAs
) -> None:
    calls: list[float] = []

    async def slow_model(base_url: str, body: dict[str, Any]) -> Reply:
        calls.append(trio.current_time())
        await trio.sleep(200)  # each call takes 200 s: the second overruns the turn
        return Reply(content="", tool_calls=[ToolCall("", "save_memory", {"text": "x"}, "")])

    async def no_probe(base_url: str) -> bool:
        return True

    harness = ChatHarness(base_url="http://127.0.0.1:9/v1", model="m", tools=[], timeout=300)
    toolbox = Toolbox([], root=workdir, user=user, children=Children(), env={}, timeout=5)
    agent = ChatAgent(
        harness,
        name="ada",
        role="r",
        persona="",
        toolbox=toolbox,
        modes=ToolModes(no_probe),
        model=slow_model,
    )

    async def report(call: ToolCall, result: ToolResult) -> None:
        raise AssertionError("no tool is offered")

    start = trio.current_time()
    outcome = await agent.answer("go", report=report)
    assert outcome == TurnOutcome(False, "no final answer within 300s", 0)
    assert trio.current_time() - start == 300
    assert [t - start for t in calls] == [0, 200]


# --- turns: a new identity at the next turn, never mid-turn ----------------------


def _chat_identity(model: str, persona: str) -> Identity:
    harness = ChatHarness(base_url="http://127.0.0.1:9/v1", model=model, tools=[])
    return Identity(
        name="ada", role="worker", persona=persona, model=model, argv=(), timeout=300, chat=harness
    )


async def test_a_retune_takes_effect_at_the_next_turn_not_mid_turn(user: RunAs) -> None:
    sent: list[GuestMessage] = []
    asked, release = trio.Event(), trio.Event()
    bodies: list[dict[str, Any]] = []

    async def model(base_url: str, body: dict[str, Any]) -> Reply:
        bodies.append(body)
        if len(bodies) == 1:
            asked.set()
            await release.wait()  # the first turn is in flight while the retune lands
            return Reply(content="", finish_reason="length")  # a failed step: asks again
        return Reply(content=f"answer {len(bodies)}", finish_reason="stop")

    async def send(msg: GuestMessage) -> None:
        sent.append(msg)

    async def no_probe(base_url: str) -> bool:
        return True

    turns = Turns(
        user=user, children=Children(), env={}, send=send, model=model, modes=ToolModes(no_probe)
    )
    try:
        turns.retune(_chat_identity("m1", "old persona"))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(turns.task, Task(task_id=1, prompt="first"))
            with trio.fail_after(WAIT):
                await asked.wait()
            turns.retune(_chat_identity("m2", "new persona"))
            release.set()
        await turns.task(Task(task_id=2, prompt="second"))
    finally:
        turns.close()
    assert [b["model"] for b in bodies] == ["m1", "m1", "m2"]
    assert "old persona" in bodies[1]["messages"][0]["content"]
    assert "new persona" in bodies[2]["messages"][0]["content"]
    assert sent == [
        TaskDone(task_id=1, code=0, output="answer 2"),
        TaskDone(task_id=2, code=0, output="answer 3"),
    ]


async def test_cancel_reports_the_task_cancelled_and_spares_the_next(user: RunAs) -> None:
    sent: list[GuestMessage] = []
    started = trio.Event()

    async def model(base_url: str, body: dict[str, Any]) -> Reply:
        if body["messages"][-1]["content"] == "stuck":
            started.set()
            await trio.sleep_forever()
        return Reply(content="fine", finish_reason="stop")

    async def send(msg: GuestMessage) -> None:
        sent.append(msg)

    async def no_probe(base_url: str) -> bool:
        return True

    turns = Turns(
        user=user, children=Children(), env={}, send=send, model=model, modes=ToolModes(no_probe)
    )
    try:
        turns.retune(_chat_identity("m", ""))
        assert turns.cancel("nothing runs") == 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(turns.task, Task(task_id=7, prompt="stuck"))
            with trio.fail_after(WAIT):
                await started.wait()
            assert turns.cancel("operator said stop") == 1
        await turns.task(Task(task_id=8, prompt="go on"))
    finally:
        turns.close()
    assert sent == [
        TaskDone(task_id=7, code=EXIT_CANCELLED, output="cancelled: operator said stop"),
        TaskDone(task_id=8, code=0, output="fine"),
    ]


# --- podman_run ------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("podman") is not None, reason="podman is installed here")
def test_podman_run_is_absent_without_podman(workdir: str, user: RunAs) -> None:
    toolbox = Toolbox(
        ["run_shell", "podman_run"], root=workdir, user=user, children=Children(), env={}, timeout=5
    )
    assert [spec.name for spec in toolbox.specs] == ["run_shell"]
    assert toolbox.absent == ["podman_run: podman is not installed in this guest"]


@pytest.fixture
def fake_podman(workdir: str) -> str:
    """A stand-in for podman (a test double): prints who ran it and with what."""
    path = os.path.join(workdir, "podman")
    with open(path, "w", encoding="utf-8") as file:
        file.write('#!/bin/sh\necho "uid=$(id -u)"; printf "%s\\n" "$@"\n')
    os.chmod(path, 0o755)
    return path


async def test_podman_run_runs_a_networkless_container_as_the_agent(
    workdir: str, user: RunAs, fake_podman: str
) -> None:
    toolbox = Toolbox(
        ["podman_run"],
        root=workdir,
        user=user,
        children=Children(),
        env={"PATH": "/usr/bin:/bin"},
        timeout=WAIT,
        podman=fake_podman,
    )
    call = ToolCall("c", "podman_run", {"image": "local/alpine", "command": "ls /"}, "")
    result = await toolbox.run(call)
    assert result.code == 0, result.output
    assert result.output.splitlines() == [
        f"uid={user.uid}",
        "run", "--rm", "--network=none", "--pull=never", "local/alpine", "sh", "-c", "ls /",
    ]  # fmt: skip
    bad = await toolbox.run(ToolCall("d", "podman_run", {"image": "-v /:/h", "command": "x"}, ""))
    assert bad.code == 2 and "invalid arguments" in bad.output


# --- the answer written to a draft as it streams ---------------------------------------


class Written:
    """A ``Draft`` that keeps what a turn wrote, one entry per reply (a discard
    closes an entry)."""

    def __init__(self) -> None:
        self.replies: list[str] = [""]

    def write(self, text: str) -> None:
        self.replies[-1] += text

    def discard(self) -> None:
        self.replies.append("")


async def draft_turn(rig: Rig, model: ScriptedModel, mode: str) -> tuple[TurnOutcome, Written]:
    agent = await rig.agent(model, tool_mode=mode, tools=["run_shell"])
    written = Written()
    with trio.fail_after(WAIT):
        outcome = await agent.answer("go", report=rig.report, draft=written)
    return outcome, written


async def test_json_mode_writes_the_final_string_and_nothing_of_a_tool_call(rig: Rig) -> None:
    final = 'It is "42".\nYes — sure 😀'
    model = ScriptedModel(
        [
            action({"tool": "run_shell", "arguments": {"command": "echo '{\"final\": 1}'"}}),
            text('{"final": "cut short', finish="length"),
            action({"final": final}),
        ]
    )
    outcome, written = await draft_turn(rig, model, "json")
    assert outcome == TurnOutcome(True, final, 3)
    # The tool call wrote nothing; the reply cut off wrote its start, then was
    # discarded; the final answer was written whole.
    assert written.replies == ["", "cut short", final]
    assert [call.name for call, _ in rig.reports] == ["run_shell"]


async def test_native_mode_writes_the_content_until_a_tool_call(rig: Rig) -> None:
    call = {
        "index": 0,
        "id": "c1",
        "function": {"name": "run_shell", "arguments": '{"command": "true"}'},
    }
    preface = Stream(
        [
            {"choices": [{"index": 0, "delta": {"content": "Let me look. "}}]},
            {"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        ]
    )
    model = ScriptedModel([preface, text("Done.\nBye.")])
    outcome, written = await draft_turn(rig, model, "native")
    assert outcome == TurnOutcome(True, "Done.\nBye.", 2)
    assert written.replies == ["Let me look. ", "Done.\nBye."]


def test_a_process_guest_names_its_agent_folder_for_its_vm(
    user: RunAs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """So the host can remove it with the VM (``ProcessVm.release``); a value that is
    not a VM id is not put in a path."""
    homeless = RunAs(user.name, user.uid, user.gid, "/nonexistent", user.switch)
    monkeypatch.setenv("FIRECLAW_VM_ID", "0a1b2c-worker-3-d4e5f6")
    made = AgentDir(homeless)
    try:
        assert Path(made.path).name.startswith(f"fireclaw-0a1b2c-worker-3-d4e5f6-{user.name}-")
    finally:
        made.close()
    monkeypatch.setenv("FIRECLAW_VM_ID", "../../etc")
    made = AgentDir(homeless)
    try:
        assert Path(made.path).name.startswith(f"fireclaw-{user.name}-")
    finally:
        made.close()
