"""The tools a chat harness hands its model, each run as the unprivileged agent user.

=============  ==============================================================
run_shell      ``sh -c COMMAND`` in the agent's directory, in a process group
               of its own; past the tool timeout the group is killed: exit 124
read_file      a file under the agent's directory (``confine``: no ``..``, no
               symlinks), at most ``MAX_READ`` bytes
write_file     the same, written whole (parent directories made)
save_memory    one line appended to ``MEMORY.md``, which the next turn's
               system prompt shows (its last ``MEMORY_LINES`` lines, at most
               ``MEMORY_BYTES``)
podman_run     ``podman run --rm --network=none --pull=never IMAGE sh -c COMMAND``:
               only where the image has podman; otherwise the tool is absent
               and ``Toolbox.absent`` says why
=============  ==============================================================

Every tool is a child process started as the agent user (the file tools run
``confine.py`` so that the kernel checks that user's permissions as well as
the path rules), tracked by the daemon's ``Children`` so that a cancel or a
stop kills it. A tool never raises for what its child or its arguments do:
bad arguments, a refused path or a timeout are a ``ToolResult`` the model
reads.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final

import msgspec
import trio
from msgspec import Meta

from . import confine
from .chat import ToolSpec
from .harness import (
    REAP_TIMEOUT,
    Children,
    OutputCap,
    signal_group,
    spawn,
    spawn_failure,
)
from .model_reply import ToolCall
from .protocol import MAX_OUTPUT_CHUNK
from .users import RunAs, python_for

MEMORY_FILE: Final = "MEMORY.md"
#: What of MEMORY.md the system prompt shows: its last lines, at most this much.
MEMORY_BYTES: Final = 25 * 1024
MEMORY_LINES: Final = 200
#: MEMORY.md stops growing here (save_memory then says so).
MEMORY_FILE_LIMIT: Final = 1 << 20
#: Largest file read_file returns.
MAX_READ: Final = 256 * 1024
#: Output of one tool kept for the audit trail (the model is shown less).
MAX_CAPTURE: Final = 256 * 1024
#: Exit code of a tool killed at its timeout, like timeout(1).
EXIT_TIMEOUT: Final = 124
#: Exit code of a tool given arguments that do not fit its schema.
EXIT_BAD_ARGUMENTS: Final = 2

_Text = Annotated[str, Meta(max_length=64 * 1024)]
_Path = Annotated[str, Meta(min_length=1, max_length=4096)]


class _Args(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class RunShellArgs(_Args, frozen=True, kw_only=True, forbid_unknown_fields=True):
    command: Annotated[str, Meta(min_length=1, max_length=8192)]


class ReadFileArgs(_Args, frozen=True, kw_only=True, forbid_unknown_fields=True):
    path: _Path


class WriteFileArgs(_Args, frozen=True, kw_only=True, forbid_unknown_fields=True):
    path: _Path
    content: Annotated[str, Meta(max_length=MAX_READ)]


class SaveMemoryArgs(_Args, frozen=True, kw_only=True, forbid_unknown_fields=True):
    text: Annotated[str, Meta(min_length=1, max_length=2000)]


class PodmanRunArgs(_Args, frozen=True, kw_only=True, forbid_unknown_fields=True):
    image: Annotated[str, Meta(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9][\w./:@-]*$")]
    command: Annotated[str, Meta(min_length=1, max_length=8192)]


def _schema(properties: Mapping[str, str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            name: {"type": "string", "description": what} for name, what in properties.items()
        },
        "required": list(properties),
        "additionalProperties": False,
    }


SPECS: Final[dict[str, tuple[ToolSpec, type[_Args]]]] = {
    "run_shell": (
        ToolSpec(
            "run_shell",
            "Run a shell command in your working directory; returns its output and exit code.",
            _schema({"command": "the sh command line"}),
        ),
        RunShellArgs,
    ),
    "read_file": (
        ToolSpec(
            "read_file",
            "Read a file in your working directory.",
            _schema({"path": "path relative to your working directory"}),
        ),
        ReadFileArgs,
    ),
    "write_file": (
        ToolSpec(
            "write_file",
            "Write a file in your working directory, replacing it.",
            _schema({"path": "path relative to your working directory", "content": "the text"}),
        ),
        WriteFileArgs,
    ),
    "save_memory": (
        ToolSpec(
            "save_memory",
            "Remember one fact for later conversations.",
            _schema({"text": "the fact, one line"}),
        ),
        SaveMemoryArgs,
    ),
    "podman_run": (
        ToolSpec(
            "podman_run",
            "Run a command in a container from a local image, without network.",
            _schema({"image": "a local image name", "command": "the sh command line"}),
        ),
        PodmanRunArgs,
    ),
}


@dataclass(frozen=True)
class ToolResult:
    """What a tool did: ``output`` is all of it up to ``MAX_CAPTURE`` (``truncated``
    says when more was dropped)."""

    code: int
    output: str
    duration: float
    truncated: bool = False

    def for_model(self) -> str:
        return self.output if self.code == 0 else f"{self.output}\n(exit code {self.code})"


def read_memory(root: str) -> str:
    """The tail of ``root``/MEMORY.md the system prompt shows; empty when there is none.

    Read by the daemon itself, so through ``confine``: a symlink planted in
    its place is refused, not followed."""
    try:
        data = confine.read_in(root, MEMORY_FILE, MEMORY_FILE_LIMIT)
    except confine.Refused:
        return ""
    lines = data.decode("utf-8", errors="replace").splitlines()[-MEMORY_LINES:]
    text = "\n".join(lines)
    while len(text.encode()) > MEMORY_BYTES:
        text = text.split("\n", 1)[1] if "\n" in text else ""
    return text


class Toolbox:
    """The tools named in the harness that exist here, run as ``user`` in ``root``."""

    def __init__(
        self,
        names: Sequence[str],
        *,
        root: str,
        user: RunAs,
        children: Children,
        env: Mapping[str, str],
        timeout: float,
        podman: str | None = None,
    ) -> None:
        self.root = root
        self.user = user
        self.timeout = timeout
        self._children = children
        self._env = dict(env)
        self._podman = podman if podman is not None else shutil.which("podman")
        self.absent: list[str] = []
        self.specs: list[ToolSpec] = []
        for name in names:
            if name == "podman_run" and self._podman is None:
                self.absent.append("podman_run: podman is not installed in this guest")
                continue
            self.specs.append(SPECS[name][0])

    async def run(self, call: ToolCall) -> ToolResult:
        """Run ``call`` (a tool in ``specs``, arguments checked here)."""
        started = trio.current_time()
        _, args_type = SPECS[call.name]
        try:
            args = msgspec.convert(call.arguments, args_type)
        except msgspec.ValidationError as exc:
            return ToolResult(EXIT_BAD_ARGUMENTS, f"invalid arguments: {exc}", 0.0)
        me = [python_for(self.user), "-I", confine.__file__]
        match args:
            case RunShellArgs():
                argv, data = ["sh", "-c", args.command], b""
            case ReadFileArgs():
                argv, data = [*me, "read", self.root, args.path, str(MAX_READ)], b""
            case WriteFileArgs():
                argv, data = [*me, "write", self.root, args.path], args.content.encode()
            case SaveMemoryArgs():
                line = "- " + " ".join(args.text.split()) + "\n"
                argv = [*me, "append", self.root, MEMORY_FILE, str(MEMORY_FILE_LIMIT)]
                data = line.encode()
            case PodmanRunArgs():
                assert self._podman is not None
                argv = [self._podman, "run", "--rm", "--network=none", "--pull=never"]
                argv += [args.image, "sh", "-c", args.command]
                data = b""
            case _:  # pragma: no cover - SPECS maps every name to one of the above
                raise AssertionError(call.name)
        code, output, truncated = await self._child(argv, data)
        return ToolResult(code, output, trio.current_time() - started, truncated)

    async def _child(self, argv: list[str], data: bytes) -> tuple[int, str, bool]:
        try:
            proc = await spawn(
                argv,
                env=self._env,
                cwd=self.root,
                merge_stderr=True,
                user=self.user,
                stdin=bool(data),
            )
        except (OSError, ValueError) as exc:
            code, error = spawn_failure(exc)
            return code, error, False
        cap = OutputCap(MAX_CAPTURE)

        async def feed() -> None:
            if proc.stdin is not None:
                try:
                    await proc.stdin.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # it stopped reading: what it does about it is its output
                await proc.stdin.aclose()

        async def drain() -> None:
            assert proc.stdout is not None
            while chunk := await proc.stdout.receive_some(MAX_OUTPUT_CHUNK):
                cap.feed(chunk)

        note = ""
        async with self._children.track(proc):
            with trio.move_on_after(self.timeout) as deadline:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(feed)
                    nursery.start_soon(drain)
                code = await proc.wait()
            if deadline.cancelled_caught:
                signal_group(proc.pid, signal.SIGKILL)
                code, note = EXIT_TIMEOUT, f"\n(killed after {self.timeout:g}s)"
                with trio.move_on_after(REAP_TIMEOUT):
                    await drain()
        text = cap.kept.decode("utf-8", errors="replace") + note
        return code, text, cap.truncated
