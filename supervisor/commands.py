"""The overseer's commands: ``!verb args`` text in, a command or one error line out.

Sans-I/O: ``parse`` never raises for any input; it returns ``None`` for text
that is not a command, a ``Command`` for a well-formed one, or a ``Usage``
(one line saying what was wrong and how to write it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from fireclaw.config.cluster import HOST_NAME_PATTERN

PREFIX: Final = "!"
#: Longest command text looked at; IRC lines are shorter anyway.
MAX_TEXT: Final = 1024

_ROLE: Final = re.compile(r"[a-z][a-z0-9-]{0,30}")
_NAME: Final = re.compile(r"[A-Za-z\[\]\\`_^{|}][A-Za-z0-9\[\]\\`_^{|}-]{0,29}")
_MODEL: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")
_HOST: Final = re.compile(HOST_NAME_PATTERN)


@dataclass(frozen=True)
class Invoke:
    role: str
    name: str | None = None
    model: str | None = None


@dataclass(frozen=True)
class Destroy:
    name: str


@dataclass(frozen=True)
class Stop:
    """``!stop NAME``: end the agent's current turn; the agent stays."""

    name: str


@dataclass(frozen=True)
class List:
    pass


@dataclass(frozen=True)
class Status:
    pass


@dataclass(frozen=True)
class Templates:
    pass


@dataclass(frozen=True)
class Scale:
    role: str
    n: int


@dataclass(frozen=True)
class Task:
    role: str
    prompt: str


@dataclass(frozen=True)
class Answer:
    """``!answer NAME TEXT``: resume the task waiting for input that NAME names
    (``task-N``, or the agent that asked) with TEXT."""

    name: str
    text: str


@dataclass(frozen=True)
class Model:
    name: str
    model: str


@dataclass(frozen=True)
class Persona:
    name: str
    text: str


@dataclass(frozen=True)
class Reset:
    name: str


@dataclass(frozen=True)
class Reload:
    pass


@dataclass(frozen=True)
class Fleet:
    """``!fleet``: one line per host of the fleet."""


@dataclass(frozen=True)
class Drain:
    """``!drain HOST`` (``draining``) or ``!undrain HOST``."""

    host: str
    draining: bool = True


@dataclass(frozen=True)
class Help:
    topic: str | None = None


@dataclass(frozen=True)
class UsageOf:
    """``!usage [NAME]``: the ledger today, per agent, or for one agent or role."""

    name: str | None = None


Command = (
    Invoke
    | Destroy
    | Stop
    | List
    | Status
    | Templates
    | Scale
    | Task
    | Answer
    | Model
    | Persona
    | Reset
    | Reload
    | Help
    | UsageOf
    | Fleet
    | Drain
)


@dataclass(frozen=True)
class Usage:
    """A command that did not parse: ``message`` is the one line to answer with."""

    message: str


#: verb -> (usage, one-line description), in the order !help lists them.
HELP: Final[dict[str, tuple[str, str]]] = {
    "invoke": ("!invoke ROLE [NAME] [model=M]", "bring up a named agent of ROLE"),
    "destroy": ("!destroy NAME", "stop a named agent for good"),
    "stop": ("!stop NAME", "end what an agent is doing now (its turn); it stays"),
    "list": ("!list", "list the agents and VMs"),
    "status": ("!status", "one line per role: idle, active, failed"),
    "templates": ("!templates", "the roles this swarm runs"),
    "scale": ("!scale ROLE N", "keep N idle VMs of ROLE"),
    "task": ("!task ROLE PROMPT", "queue a task; its result is announced here"),
    "answer": ("!answer NAME TEXT", "answer the question a task stopped at (NAME: task-N)"),
    "model": ("!model NAME MODEL", "give an agent another model"),
    "persona": ("!persona NAME TEXT", "give an agent another persona"),
    "reset": ("!reset NAME", "clear a failed VM or role so it is tried again"),
    "reload": ("!reload", "re-read swarm.yaml"),
    "usage": ("!usage [NAME]", "model tokens used today, per agent, or by one agent or role"),
    "fleet": ("!fleet", "one line per host: state, roles with their load, tasks, heartbeat"),
    "drain": ("!drain HOST", "a host claims no tasks, finishes its own, stops its warm VMs"),
    "undrain": ("!undrain HOST", "a drained host claims tasks and keeps warm VMs again"),
    "help": ("!help [COMMAND]", "this list, or one command"),
}


def parse(text: str) -> Command | Usage | None:
    """Parse one message; None if it is not addressed to the overseer as a command."""
    text = text[:MAX_TEXT].strip()
    if not text.startswith(PREFIX) or len(text) == 1:
        return None
    verb, _, rest = text[1:].partition(" ")
    if not verb[:1].isalpha():
        return None  # "! foo", "!!", "!?": chat, not a command
    verb = verb.lower()
    rest = rest.strip()
    if verb not in HELP:
        # Echoed back to the channel: escaped, so no control character (an ANSI
        # sequence, a line break) travels from one client's text to everyone's screen.
        shown = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in verb[:32])
        return Usage(f"unknown command !{shown}; try !help")
    args = rest.split()
    try:
        return _PARSERS[verb](args, rest)
    except _Bad as exc:
        return Usage(f"{exc} (usage: {HELP[verb][0]})")


class _Bad(Exception):
    pass


_Parser = Callable[[list[str], str], Command]


def _no_args(make: type[List | Status | Templates | Reload | Fleet]) -> _Parser:
    def parse_it(args: list[str], rest: str) -> Command:
        if args:
            raise _Bad("takes no arguments")
        return make()

    return parse_it


def _role(word: str) -> str:
    if not _ROLE.fullmatch(word):
        raise _Bad(f"{_show(word)} is not a role name")
    return word


def _name(word: str) -> str:
    if not _NAME.fullmatch(word):
        raise _Bad(f"{_show(word)} is not an agent name")
    return word


def _show(word: str) -> str:
    return repr(word[:32] + ("..." if len(word) > 32 else ""))


def _invoke(args: list[str], rest: str) -> Command:
    if not args:
        raise _Bad("name a role")
    role, name, model = _role(args[0]), None, None
    for word in args[1:]:
        if word.startswith("model="):
            if model is not None:
                raise _Bad("model= given twice")
            model = word.removeprefix("model=")
            if not _MODEL.fullmatch(model):
                raise _Bad(f"{_show(model)} is not a model name")
        elif name is None:
            name = _name(word)
        else:
            raise _Bad(f"unexpected {_show(word)}")
    return Invoke(role=role, name=name, model=model)


def _one_name(make: type[Destroy | Stop | Reset]) -> _Parser:
    def parse_it(args: list[str], rest: str) -> Command:
        if len(args) != 1:
            raise _Bad("name one agent")
        return make(name=_name(args[0]))

    return parse_it


def _scale(args: list[str], rest: str) -> Command:
    if len(args) != 2:
        raise _Bad("give a role and a number")
    if not args[1].isdigit() or int(args[1]) > 1000:
        raise _Bad(f"{_show(args[1])} is not a number from 0 to 1000")
    return Scale(role=_role(args[0]), n=int(args[1]))


def _task(args: list[str], rest: str) -> Command:
    if len(args) < 2:
        raise _Bad("give a role and a prompt")
    role = _role(args[0])
    return Task(role=role, prompt=rest[len(args[0]) :].strip())


def _answer(args: list[str], rest: str) -> Command:
    if len(args) < 2:
        raise _Bad("give a task (or agent) and the answer")
    return Answer(name=_name(args[0]), text=rest[len(args[0]) :].strip())


def _model(args: list[str], rest: str) -> Command:
    if len(args) != 2:
        raise _Bad("give an agent and a model")
    if not _MODEL.fullmatch(args[1]):
        raise _Bad(f"{_show(args[1])} is not a model name")
    return Model(name=_name(args[0]), model=args[1])


def _persona(args: list[str], rest: str) -> Command:
    if len(args) < 2:
        raise _Bad("give an agent and the persona text")
    return Persona(name=_name(args[0]), text=rest[len(args[0]) :].strip())


def _usage(args: list[str], rest: str) -> Command:
    if len(args) > 1:
        raise _Bad("at most one agent or role")
    return UsageOf(name=_name(args[0]) if args else None)


def _drain(draining: bool) -> _Parser:
    def parse_it(args: list[str], rest: str) -> Command:
        if len(args) != 1:
            raise _Bad("name one host")
        if not _HOST.fullmatch(args[0]):
            raise _Bad(f"{_show(args[0])} is not a host name")
        return Drain(host=args[0], draining=draining)

    return parse_it


def _help(args: list[str], rest: str) -> Command:
    if len(args) > 1:
        raise _Bad("at most one command")
    topic = args[0].lower().removeprefix(PREFIX) if args else None
    if topic is not None and topic not in HELP:
        raise _Bad(f"no command {_show(topic)}")
    return Help(topic=topic)


_PARSERS: Final[dict[str, _Parser]] = {
    "invoke": _invoke,
    "destroy": _one_name(Destroy),
    "stop": _one_name(Stop),
    "list": _no_args(List),
    "status": _no_args(Status),
    "templates": _no_args(Templates),
    "scale": _scale,
    "task": _task,
    "answer": _answer,
    "model": _model,
    "persona": _persona,
    "reset": _one_name(Reset),
    "reload": _no_args(Reload),
    "usage": _usage,
    "fleet": _no_args(Fleet),
    "drain": _drain(True),
    "undrain": _drain(False),
    "help": _help,
}
