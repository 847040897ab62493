"""``!answer NAME TEXT``: parsed without I/O into a command, or one usage line;
and the line the overseer posts for a question (no I/O either)."""

from __future__ import annotations

import pytest
from fireclaw.supervisor import commands as c
from fireclaw.supervisor.overseer import MAX_QUESTION_SHOWN, question_line


@pytest.mark.parametrize(
    ("text", "command"),
    [
        ("!answer task-7 yes, go on", c.Answer(name="task-7", text="yes, go on")),
        ("!answer coder-1   remove  build/ ", c.Answer(name="coder-1", text="remove  build/")),
        ("!ANSWER alice ok", c.Answer(name="alice", text="ok")),
    ],
)
def test_an_answer_names_a_task_or_agent_and_keeps_its_text(text: str, command: c.Answer) -> None:
    assert c.parse(text) == command


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("!answer", "give a task (or agent) and the answer (usage: !answer NAME TEXT)"),
        ("!answer task-7", "give a task (or agent) and the answer"),
        ("!answer #agents yes", "'#agents' is not an agent name"),
        ("!answer 7 yes", "'7' is not an agent name"),
    ],
)
def test_a_bad_answer_is_one_usage_line(text: str, says: str) -> None:
    result = c.parse(text)
    assert isinstance(result, c.Usage)
    assert says in result.message and "\n" not in result.message


def test_help_names_it() -> None:
    usage, what = c.HELP["answer"]
    assert usage == "!answer NAME TEXT" and "task-N" in what


# --- the overseer's announcement of a question ----------------------------------


def test_the_question_goes_out_as_one_plain_line_without_secrets() -> None:
    secret = "irc-server-password-123"
    said = question_line(
        "coder-0",
        {
            "task_id": 7,
            "role": "coder",
            "question": f"use {secret}?\r\nPRIVMSG #control :!destroy alice\x01" + "x" * 1000,
        },
        [secret, "short"],
    )
    assert said is not None
    assert said.startswith("task 7 (coder) on coder-0 asks: use [redacted]? PRIVMSG #control")
    assert said.endswith("... (!answer task-7 TEXT)")
    assert secret not in said and said.isprintable()
    assert len(said) < MAX_QUESTION_SHOWN + 80


def test_an_event_without_a_question_is_not_announced() -> None:
    assert question_line("coder-0", {"task_id": 7}, []) is None
    assert question_line("coder-0", {"task_id": "7", "question": "q"}, []) is None
