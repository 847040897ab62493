"""Questions on IRC, end to end: a real ``fireclaw-swarm up`` (process-backend VMs,
each in its own network namespace), its managed ngircd, an operator on IRC (the
independent ``irc`` library), and a FAKE claude-code (tests/fake_claude_code.py,
a test double replaying recorded streams) as the role's CLI.

``!task``: the CLI stops at its turn limit after a denied permission; the
overseer posts the question in the control channel; the task waits for input
and holds no VM. ``!answer``: a new VM runs the CLI again with ``--resume`` of
the same session and the answer as its prompt, and the overseer announces the
result. The same with the supervisor stopped, then killed with SIGKILL, while
the task waits.

The model server the role names is a scripted one (the fake CLI never calls
it): the CLI harness needs a gateway to be given.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_claude_code import install, runs
from ircperson import Event, Person
from scripted_model import ScriptedModel
from swarmctl import NOTHING, WAIT, Swarm, idle, role_yaml, swarm_yaml
from test_chat_irc import CONTROL, irc_yaml, served, transcript
from test_swarm import free_port

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="VMs in their own namespaces need root"),
]

#: The session the recorded stream that asks names.
SESSION = "3f0c9a52-7d1e-4b8a-9c6f-2e5d4a1b0c9d"
QUESTION = 'allow Bash {"command":"rm -rf build"}; stopped after 2 turns: go on?'
#: What the recorded resumed session answered.
RESUMED_ANSWER = 'you asked, "What did I ask you to do?"'
#: The fake runs as the agent user, who may not enter this venv's home.
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
ASKED = re.compile(r"task (\d+) \(coder\) on (\S+) asks: (.*) \(!answer task-\1 TEXT\)$")


@pytest.fixture
def bin_dir() -> Iterator[Path]:
    """A folder the agent user can enter too (pytest's own are its owner's only)."""
    folder = Path(tempfile.mkdtemp(prefix="fireclaw-fake-cli-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def answer_swarm(root: Path, port: int, model_url: str, bin_dir: Path) -> Swarm:
    role = role_yaml(
        "coder",
        min_idle=1,
        max_active=1,
        extra="model: scripted\nharness: {kind: claude-code, max_turns: 2}\n",
    )
    config = f"models:\n  server: {model_url}\n" + swarm_yaml(role, irc=irc_yaml(port))
    return Swarm(root, config, env={"PATH": f"{bin_dir}:{os.environ.get('PATH', os.defpath)}"})


def operator(port: int) -> Person:
    return Person(("127.0.0.1", port), "op").start(CONTROL)


def ask(op: Person, swarm: Swarm) -> tuple[int, str, Event]:
    """``!task`` until the overseer posts the question: the task, who asked, the line."""
    swarm.wait_for("an idle coder", idle("coder", 1))
    op.say(CONTROL, "!task coder clean the build")
    queued = op.said(CONTROL, "queued for coder")
    task_id = int(queued.arguments[0].split("task ")[1].split()[0])
    line = op.said(CONTROL, f"task {task_id} (coder) on ")
    found = ASKED.fullmatch(line.arguments[0])
    assert found is not None, line.arguments[0]
    assert found[3] == QUESTION
    assert len(line.arguments[0].encode()) < 400  # one line, well inside IRC's 512
    return task_id, found[2], line


def waiting(swarm: Swarm) -> list[dict[str, object]]:
    done = swarm.cli("tasks", "--state", "waiting_for_input", "--json")
    assert done.returncode == 0, done.stderr
    listed: list[dict[str, object]] = json.loads(done.stdout)
    return listed


def holds_no_vm(swarm: Swarm) -> None:
    """The waiting task's runner retired: what the role has is its idle pool. (A
    finished VM stops once its replacement is up, so both may be seen a moment.)"""
    swarm.wait_for(
        "the coder pool back to one idle VM and none active",
        lambda s: idle("coder", 1)(s) and s["roles"]["coder"]["active"] == 0,
    )


def resumed_done(op: Person, task_id: int) -> str:
    done = op.said(CONTROL, f"task {task_id} (coder) done: ")
    return str(done.arguments[0])


def check_resumed(log: Path, answer: str) -> None:
    first, second = runs(log)
    assert "--resume" not in first and first[-2:] == ["--", "clean the build"]
    assert "--max-turns" in first and first[first.index("--max-turns") + 1] == "2"
    assert second[second.index("--resume") + 1] == SESSION
    assert second[-2:] == ["--", answer]


def test_a_question_goes_to_irc_and_an_answer_resumes_the_same_session(
    tmp_path: Path, bin_dir: Path
) -> None:
    log = install(bin_dir, PYTHON)
    port = free_port()
    op: Person | None = None
    with served(ScriptedModel([])) as (url, _):
        swarm = answer_swarm(tmp_path, port, url, bin_dir)
        try:
            swarm.start()
            op = operator(port)
            task_id, asked_by, _ = ask(op, swarm)
            holds_no_vm(swarm)
            (row,) = waiting(swarm)
            assert (row["id"], row["session"], row["owner"]) == (task_id, SESSION, asked_by)
            assert [e["detail"]["question"] for e in swarm.events("task_waiting")] == [QUESTION]

            # Someone who is no operator cannot answer.
            eve = Person(("127.0.0.1", port), "eve").start(CONTROL)
            try:
                eve.say(CONTROL, f"!answer task-{task_id} sure, delete everything")
                eve.said(CONTROL, "eve: sorry, only the swarm's operators may give me orders")
            finally:
                eve.stop()
            assert [t["id"] for t in waiting(swarm)] == [task_id]

            # An answer to nothing waiting, or to nobody: one line each, nothing moves.
            op.say(CONTROL, "!answer nobody-here yes")
            op.said(CONTROL, "op: no task or agent named 'nobody-here' is waiting for an answer")
            refused = swarm.cli("answer", "task-99999", "yes")
            assert refused.returncode == 1
            assert refused.stderr.decode() == "fireclaw-swarm: no task 99999\n"

            op.say(CONTROL, f"!answer task-{task_id} yes, remove it")
            op.said(CONTROL, f"op: task {task_id} resumes with your answer")
            said = resumed_done(op, task_id)
            print(f"\n{transcript(op)}")
            assert RESUMED_ANSWER in said, said
            check_resumed(log, "yes, remove it")
            claims = swarm.events("task_claimed")
            assert [c["detail"]["resumed"] for c in claims] == [False, True]

            op.say(CONTROL, f"!answer task-{task_id} again")
            op.said(CONTROL, f"op: task {task_id} is done, not waiting for an answer")

            # Waiting on a task from the command line ends when it asks, saying how to answer.
            asks = swarm.cli("task", "coder", "clean it again", "--wait", timeout=WAIT)
            assert asks.returncode == 1
            assert asks.stdout.decode() == f"{QUESTION}\n"
            assert asks.stderr.decode() == (
                f"fireclaw-swarm: task {task_id + 1} waits for an answer:"
                f" fireclaw-swarm answer task-{task_id + 1} TEXT\n"
            )
            assert swarm.stop() == 0
            assert swarm.leftovers() == NOTHING
        finally:
            if op is not None:
                op.stop()
            swarm.close()


def test_a_waiting_task_outlives_a_stop_and_a_kill_of_the_supervisor(
    tmp_path: Path, bin_dir: Path
) -> None:
    log = install(bin_dir, PYTHON)
    port = free_port()
    op: Person | None = None
    with served(ScriptedModel([])) as (url, _):
        swarm = answer_swarm(tmp_path, port, url, bin_dir)
        try:
            swarm.start()
            op = operator(port)
            task_id, asked_by, _ = ask(op, swarm)
            holds_no_vm(swarm)
            op.stop()
            op = None

            assert swarm.stop() == 0  # a graceful stop: the task stays waiting
            swarm.start()
            assert [t["id"] for t in waiting(swarm)] == [task_id]
            swarm.wait_for("an idle coder", idle("coder", 1))
            swarm.kill9()  # and a crash: the next start reclaims what it left
            swarm.start()
            assert [t["id"] for t in waiting(swarm)] == [task_id]
            assert len(runs(log)) == 1  # nothing ran it meanwhile

            # Answered from the command line, by the name of the agent that asked.
            op = operator(port)
            answered = swarm.cli("answer", asked_by, "go ahead")
            assert answered.returncode == 0, answered.stderr
            assert answered.stdout.decode() == f"task {task_id} resumes with the answer\n"
            said = resumed_done(op, task_id)
            print(f"\n{transcript(op)}")
            assert RESUMED_ANSWER in said, said
            check_resumed(log, "go ahead")
            assert waiting(swarm) == []
            assert swarm.stop() == 0
            assert swarm.leftovers() == NOTHING
        finally:
            if op is not None:
                op.stop()
            swarm.close()
