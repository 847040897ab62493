"""The overseer's command parser: every input gives a command, a usage line, or None."""

from __future__ import annotations

import pytest
from fireclaw.supervisor import commands as c
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("!invoke coder", c.Invoke(role="coder")),
        ("!invoke coder alice model=qwen2.5:7b", c.Invoke("coder", "alice", "qwen2.5:7b")),
        ("!INVOKE coder model=m alice", c.Invoke("coder", "alice", "m")),
        ("!destroy alice", c.Destroy("alice")),
        ("!stop alice", c.Stop("alice")),
        ("!STOP worker-3", c.Stop("worker-3")),
        ("!list", c.List()),
        ("  !status  ", c.Status()),
        ("!templates", c.Templates()),
        ("!scale worker 3", c.Scale("worker", 3)),
        ("!task worker write   a haiku", c.Task("worker", "write   a haiku")),
        ("!model alice llama3", c.Model("alice", "llama3")),
        ("!persona alice You are  terse.", c.Persona("alice", "You are  terse.")),
        ("!reset worker-0", c.Reset("worker-0")),
        ("!reload", c.Reload()),
        ("!help", c.Help()),
        ("!help !scale", c.Help("scale")),
    ],
)
def test_commands(text: str, expected: c.Command) -> None:
    assert c.parse(text) == expected


@pytest.mark.parametrize("text", ["hello", "", "!", "alice: !scale worker 3", " ! scale"])
def test_not_commands(text: str) -> None:
    assert c.parse(text) is None


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("!frobnicate", "unknown command !frobnicate; try !help"),
        ("!scale worker", "give a role and a number (usage: !scale ROLE N)"),
        ("!scale worker -1", "'-1' is not a number from 0 to 1000 (usage: !scale ROLE N)"),
        ("!scale Worker 2", "'Worker' is not a role name (usage: !scale ROLE N)"),
        ("!invoke", "name a role"),
        ("!invoke coder a b", "unexpected 'b'"),
        ("!invoke coder model=x model=y", "model= given twice"),
        ("!destroy", "name one agent"),
        ("!stop", "name one agent (usage: !stop NAME)"),
        ("!stop alice bob", "name one agent"),
        ("!stop #agents", "'#agents' is not an agent name"),
        ("!task worker", "give a role and a prompt"),
        ("!status now", "takes no arguments"),
        ("!help nothing", "no command 'nothing'"),
        ("!model alice bad\x01model", "is not a model name"),
    ],
)
def test_usage_lines(text: str, says: str) -> None:
    result = c.parse(text)
    assert isinstance(result, c.Usage)
    assert says in result.message
    assert "\n" not in result.message and "\r" not in result.message


def test_every_command_has_help() -> None:
    assert set(c.HELP) == {
        "answer",
        "invoke",
        "destroy",
        "stop",
        "list",
        "status",
        "templates",
        "scale",
        "task",
        "model",
        "persona",
        "reset",
        "reload",
        "usage",
        "fleet",
        "drain",
        "undrain",
        "help",
    }


HOSTILE = st.lists(
    st.sampled_from(
        list("!aZ09 -_=:.\t\r\n\x00\x01\u00e9\u202e{}[]|^`\\/@") + ["model=", "!scale", "!invoke"]
    ),
    max_size=60,
).map("".join)


@settings(max_examples=500, deadline=None)
@given(st.one_of(HOSTILE, st.text(max_size=300), HOSTILE.map(lambda s: "!" + s)))
def test_any_input_parses_without_raising(text: str) -> None:
    result = c.parse(text)
    assert result is None or isinstance(result, c.Usage | c.Command)
    if isinstance(result, c.Usage):
        assert len(result.message) < 300
    if isinstance(result, c.Invoke | c.Destroy | c.Stop | c.Model | c.Persona | c.Reset):
        name = getattr(result, "name", None)
        assert name is None or not any(ch in name for ch in "\r\n\x00 ")


def test_usage_names_at_most_one_agent_or_role() -> None:
    assert c.parse("!usage") == c.UsageOf(name=None)
    assert c.parse("!usage alice") == c.UsageOf(name="alice")
    assert isinstance(c.parse("!usage alice bob"), c.Usage)
    assert isinstance(c.parse("!usage 9lives"), c.Usage)
