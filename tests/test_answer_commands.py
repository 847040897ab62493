"""``!answer NAME TEXT``: parsed without I/O into a command, or one usage line."""

from __future__ import annotations

import pytest
from fireclaw.supervisor import commands as c


@pytest.mark.parametrize(
    ("text", "command"),
    [
        ("!answer task-7 yes, go on", c.Answer(name="task-7", text="yes, go on")),
        ("!answer coder-1   remove  build/ ", c.Answer(name="coder-1", text="remove  build/")),
        ("!ANSWER alice ok", c.Answer(name="alice", text="ok")),
    ],
)
def test_an_answer_names_a_task_or_agent_and_keeps_its_text(
    text: str, command: c.Answer
) -> None:
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
