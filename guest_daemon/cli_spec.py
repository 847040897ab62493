"""The machinery of a coding-agent CLI spec: what a spec declares, and the run it makes.

A ``CliSpec`` says everything the guest needs to run one CLI headless and to
understand it: the program and the registry package it comes from, the argv
of a run with a prompt and of a resume of a session, the environment that
keeps its state under the agent's workspace (so a named agent's session
outlives its VM), how to point it at the VM's model gateway where it can be,
which of its own limits (turns, budget) it takes on the command line, and the
decoder that reads its stream (``cli_stream.StreamParser`` does the framing
and the bounds). The specs themselves are in ``clis.py``.

``spec.invocation(prompt, workspace=..., ...)`` gives the argv and the
environment of one run; ``spec.parser()`` a parser for its stdout.

A prompt never lands where the CLI could read it as an option: it follows
``--`` or is glued to its flag (``--message=...``). A session id comes from
the CLI's stream and goes back on its command line only if it matches
``cli_stream.SESSION_ID``.

This module imports only the standard library and msgspec: it ships inside
VM images.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping, Sequence
from typing import Final, Literal

import msgspec

from .cli_stream import SESSION_ID, Decoder, StreamParser, clip

#: Where, under the workspace, each CLI keeps its state (``<STATE_ROOT>/<cli>/...``).
STATE_ROOT: Final = ".cli"
#: What a model name must look like to go into a CLI's argv or config.
MODEL_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/@+-]{0,127}$")
#: The gateway's root URL as the guest knows it: it goes into TOML and JSON unquoted.
GATEWAY_URL: Final = re.compile(r"^http://[A-Za-z0-9.\-]+(:[0-9]{1,5})?/?$")
#: The API key a CLI is given when its traffic goes through the gateway: the
#: gateway holds the real one and puts it on the upstream call itself.
GATEWAY_KEY: Final = "fireclaw-gateway"

WireApi = Literal["openai-chat", "openai-responses", "anthropic-messages"]


class SpecError(Exception):
    """A run was asked of a spec with what it cannot take (one line)."""


class Gateway(msgspec.Struct, frozen=True, kw_only=True):
    """How a CLI is pointed at an OpenAI- or Anthropic-compatible base URL.

    In ``argv`` and ``env`` values, ``{base}`` is the gateway's root URL
    (``http://HOST:PORT``), ``{v1}`` that root plus ``/v1``, and ``{model}`` the
    model it asks for."""

    wire: WireApi
    argv: tuple[str, ...] = ()
    env: Mapping[str, str] = {}
    #: Files written under the CLI's state dir before it starts: path -> content.
    files: Mapping[str, str] = {}


class CliSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One CLI as a harness; see the module docstring. Placeholders in argv
    elements: ``{prompt}``, ``{session}``, ``{model}``, ``{turns}``, ``{budget}``,
    ``{state}`` (its state dir), and the gateway's ``{base}`` and ``{v1}``."""

    name: str
    program: str
    package: str  # "npm:NAME" or "pypi:NAME": what the image installs
    run: tuple[str, ...]  # a new session with a prompt
    #: The same session with a prompt; None: it cannot resume. Without
    #: ``{session}`` it finds its session by itself (aider's history file).
    resume: tuple[str, ...] | None
    model: tuple[str, ...] = ()  # added when a model is named
    turns: tuple[str, ...] = ()  # its own turn limit, if it takes one on the command line
    budget: tuple[str, ...] = ()  # its own spending limit in USD, likewise
    #: Environment variable -> path under ``<workspace>/.cli/<name>/``.
    state: Mapping[str, str] = {}
    #: Environment it always gets: no update checks, no telemetry.
    quiet: Mapping[str, str] = {}
    key_env: str = ""  # the variable its provider's API key goes in
    gateway: Gateway | None = None  # None: it speaks an API the gateway does not
    stream: Literal["jsonl", "text"] = "jsonl"
    report_unknown: bool = True
    decode: Decoder

    def state_dir(self, workspace: str) -> str:
        return posixpath.join(workspace, STATE_ROOT, self.name)

    def state_env(self, workspace: str) -> dict[str, str]:
        """Each state variable as an absolute path under this CLI's state dir."""
        if not posixpath.isabs(workspace):
            raise SpecError(f"{self.name}: workspace {workspace!r} is not an absolute path")
        root = self.state_dir(posixpath.normpath(workspace))
        return {var: posixpath.join(root, rel) for var, rel in self.state.items()}

    def invocation(
        self,
        prompt: str,
        *,
        workspace: str,
        model: str = "",
        session: str | None = None,
        gateway: str = "",
        turns: int | None = None,
        budget_usd: float | None = None,
        api_key: str = "",
    ) -> Invocation:
        """The argv and environment of one run.

        ``session``: resume that session (an id this CLI's stream gave; any
        value for a CLI that resumes without one). ``gateway``: the VM's
        gateway root URL; ignored by a CLI that cannot use it, whose own
        ``api_key`` (from the role's secrets) is passed instead. Raises
        SpecError for a session id, a model name or a limit it cannot take."""
        takes_id = self.resume is not None and any("{session}" in arg for arg in self.resume)
        if session is not None and takes_id and not SESSION_ID.match(session):
            raise SpecError(f"{self.name}: session id {clip(session, 40)!r} is not one to resume")
        if model and not MODEL_NAME.match(model):
            raise SpecError(f"{self.name}: model name {clip(model, 40)!r} is not one to pass on")
        if gateway and not GATEWAY_URL.match(gateway):
            raise SpecError(f"{self.name}: gateway {clip(gateway, 60)!r} is not http://HOST:PORT")
        if gateway and self.gateway is not None and not model:
            raise SpecError(f"{self.name}: a run through the gateway needs a model name")
        if turns is not None and turns < 1:
            raise SpecError(f"{self.name}: turn limit {turns} is below 1")
        if budget_usd is not None and not budget_usd > 0:
            raise SpecError(f"{self.name}: budget {budget_usd} USD is not above 0")
        values = {
            "prompt": prompt,
            "session": session or "",
            "state": self.state_dir(posixpath.normpath(workspace)),
            "model": model,
            "turns": str(turns or ""),
            "budget": f"{budget_usd:.4f}" if budget_usd is not None else "",
            "base": gateway.rstrip("/"),
            "v1": gateway.rstrip("/") + "/v1",
        }
        if session is not None and self.resume is not None:
            head = list(self.resume)
        else:
            head = list(self.run)
        extra: list[str] = []
        env = {**self.quiet, **self.state_env(workspace)}
        files: dict[str, str] = {}
        via_gateway = bool(gateway) and self.gateway is not None
        if via_gateway and self.gateway is not None:
            extra += self.gateway.argv
            env.update(self.gateway.env)
            files = {
                posixpath.join(values["state"], rel): body
                for rel, body in self.gateway.files.items()
            }
            if self.key_env:
                env[self.key_env] = GATEWAY_KEY
        elif api_key and self.key_env:
            env[self.key_env] = api_key
        if model:
            extra += self.model
        if turns is not None:
            extra += self.turns
        if budget_usd is not None:
            extra += self.budget
        argv = [self.program, *_options_first(head, extra)]
        return Invocation(
            argv=[_fill(arg, values) for arg in argv],
            env={var: _fill(value, values) for var, value in env.items()},
            files={path: _fill(body, values) for path, body in files.items()},
            metered=via_gateway,
        )

    def parser(self, *, max_line: int | None = None) -> StreamParser:
        extra = {} if max_line is None else {"max_line": max_line}
        return StreamParser(
            cli=self.name,
            decode=self.decode,
            stream=self.stream,
            report_unknown=self.report_unknown,
            **extra,
        )


class Invocation(msgspec.Struct, frozen=True, kw_only=True):
    """One run of a CLI: start ``argv`` with ``env`` added, once ``files`` (absolute
    path -> content) are written. ``metered``: its model traffic goes through the
    gateway; otherwise its ``Usage`` events are all the swarm learns (the guest's claim)."""

    argv: list[str]
    env: dict[str, str]
    files: dict[str, str]
    metered: bool


_PLACEHOLDER = re.compile(r"\{(prompt|session|model|turns|budget|base|v1|state)\}")


def _fill(arg: str, values: Mapping[str, str]) -> str:
    # One pass: a prompt that itself holds "{model}" stays as written.
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], arg)


def _options_first(head: Sequence[str], extra: Sequence[str]) -> list[str]:
    """``head`` with ``extra`` options put before its ``--`` (the prompt comes after it)."""
    if "--" in head:
        cut = list(head).index("--")
        return [*head[:cut], *extra, *head[cut:]]
    return [*head, *extra]
