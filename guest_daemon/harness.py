"""Running commands and agent tasks inside the guest.

The pure parts come first: argv and environment building, the cap on a task's
captured output, the text of a ``TaskDone`` and the exit code of a failed
spawn. They are plain functions, tested without processes.

The trio parts follow: ``run_command`` serves a ``Run``, ``run_task`` serves a
``Task``, and ``Children`` knows every process still running so that a stop
can end them all. Each child starts in a session of its own, so it leads its
own process group and a stop or a timeout reaches its grandchildren too.

Reports go out through a ``Send`` callable (the daemon's single writer). These
functions do not raise for anything a child does: a spawn failure or a
timeout is a report, not an exception.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final, Literal

import trio

from .protocol import (
    MAX_OUTPUT_CHUNK,
    MAX_RESULT_BYTES,
    ChatHarness,
    CliHarness,
    Exited,
    GuestMessage,
    Harness,
    Output,
    Promote,
    Run,
    Task,
    TaskDone,
)
from .users import RunAs, UnknownUser, lookup

log = logging.getLogger("fireclaw.guest_daemon")

Send = Callable[[GuestMessage], Awaitable[None]]
OutputStream = Literal["stdout", "stderr"]

#: Replaced by the task's prompt when an argv element is exactly this.
PROMPT_PLACEHOLDER: Final = "{prompt}"
#: Never handed to agent code: the control token is the VM's identity.
HIDDEN_ENV: Final = ("FIRECLAW_TOKEN",)
#: Exit code of a task that arrives before the guest was promoted.
EXIT_NOT_PROMOTED: Final = 125
#: Longest ``error`` text an ``Exited`` carries (the protocol's ShortText).
MAX_ERROR_TEXT: Final = 1024
#: How long to wait for a killed process to be reaped before giving up on it.
REAP_TIMEOUT: Final = 2.0
#: How often a stop checks whether a process group has emptied.
GROUP_POLL: Final = 0.05


# --- pure helpers ------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """What a ``Promote`` made of this guest; a later ``Promote`` replaces it."""

    name: str
    role: str
    persona: str
    model: str
    argv: tuple[str, ...]  # empty for a chat or CLI harness
    timeout: float
    workspace: str | None = None  # where its workspace disk is mounted: the harness runs there
    chat: ChatHarness | None = None
    cli: CliHarness | None = None

    @classmethod
    def from_promote(cls, msg: Promote, *, workspace: str | None = None) -> Identity:
        harness = msg.harness
        return cls(
            name=msg.name,
            role=msg.role,
            persona=msg.persona,
            model=msg.model,
            argv=tuple(harness.argv) if isinstance(harness, Harness) else (),
            timeout=harness.timeout,
            workspace=workspace,
            chat=harness if isinstance(harness, ChatHarness) else None,
            cli=harness if isinstance(harness, CliHarness) else None,
        )


def harness_argv(argv: Sequence[str], prompt: str) -> list[str]:
    """``argv`` with every element that is exactly ``{prompt}`` replaced by ``prompt``."""
    return [prompt if arg == PROMPT_PLACEHOLDER else arg for arg in argv]


def child_env(base: Mapping[str, str], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child: ``base`` without the secrets, plus ``extra``."""
    env = {key: value for key, value in base.items() if key not in HIDDEN_ENV}
    env.update(extra or {})
    return env


def task_env(base: Mapping[str, str], who: Identity, task_id: int, prompt: str) -> dict[str, str]:
    """The environment of a harness run: who the agent is and what it was asked."""
    return child_env(
        base,
        {
            "FIRECLAW_PROMPT": prompt,
            "FIRECLAW_AGENT": who.name,
            "FIRECLAW_ROLE": who.role,
            "FIRECLAW_PERSONA": who.persona,
            "FIRECLAW_MODEL": who.model,
            "FIRECLAW_TASK_ID": str(task_id),
            **({"FIRECLAW_WORKSPACE": who.workspace} if who.workspace else {}),
        },
    )


class OutputCap:
    """Keeps the first ``limit`` bytes fed to it and counts the rest.

    The caller keeps feeding past the cap so that the child never blocks on a
    full pipe; what does not fit is dropped.
    """

    def __init__(self, limit: int = MAX_RESULT_BYTES) -> None:
        self.limit = limit
        self._kept = bytearray()
        self.dropped = 0

    def feed(self, data: bytes | bytearray) -> None:
        room = self.limit - len(self._kept)
        self._kept += data[:room]
        self.dropped += max(0, len(data) - room)

    @property
    def kept(self) -> bytes:
        return bytes(self._kept)

    @property
    def truncated(self) -> bool:
        return self.dropped > 0


def task_output(
    captured: bytes, *, truncated: bool, note: str = "", limit: int = MAX_RESULT_BYTES
) -> tuple[str, bool]:
    """The ``(output, truncated)`` of a ``TaskDone``.

    ``captured`` is decoded as UTF-8 (bad bytes replaced) and ``note`` is
    appended on a line of its own. The result is at most ``limit`` bytes once
    encoded, so that the frame stays under the protocol's size cap whatever
    the child wrote; the captured text is cut to make room and then
    ``truncated`` is true.
    """
    text = captured.decode("utf-8", errors="replace")
    tail = "" if not note else (note if not text or text.endswith("\n") else "\n" + note)
    budget = max(0, limit - len(tail.encode()))
    body = text.encode()
    if len(body) > budget:
        text = body[:budget].decode("utf-8", errors="ignore")
        truncated = True
    return text + tail, truncated


def one_line(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    """``text`` on one line, at most ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def spawn_failure(exc: OSError | ValueError) -> tuple[int, str]:
    """``(exit code, one-line error)`` for a child that could not be started.

    127 when the program (or its working directory) does not exist, 126 when
    it exists but cannot be run, like a POSIX shell.
    """
    if isinstance(exc, OSError) and exc.strerror:
        code = 127 if exc.errno in (errno.ENOENT, errno.ENOTDIR) else 126
        what = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
        return code, one_line(what)
    return 126, one_line(str(exc) or type(exc).__name__)


# --- processes ---------------------------------------------------------------


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to a process group that may already be gone."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class Children:
    """Every child process still running, each the leader of its own group."""

    def __init__(self) -> None:
        self._procs: set[trio.Process] = set()

    def __len__(self) -> int:
        return len(self._procs)

    @asynccontextmanager
    async def track(self, proc: trio.Process) -> AsyncIterator[trio.Process]:
        """Hold ``proc`` while the body runs; on the way out, however the body
        ends, make sure it is dead and reaped and its pipes are closed."""
        self._procs.add(proc)
        try:
            yield proc
        finally:
            self._procs.discard(proc)
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    signal_group(proc.pid, signal.SIGKILL)
                with trio.move_on_after(REAP_TIMEOUT):
                    await proc.wait()
                for stream in (proc.stdin, proc.stdout, proc.stderr):
                    if stream is not None:
                        await stream.aclose()

    async def terminate(self, grace: float) -> None:
        """SIGTERM every child's group, give them ``grace`` seconds to leave,
        then SIGKILL whatever is left of those groups."""
        procs = list(self._procs)
        if not procs:
            return
        groups = {proc.pid for proc in procs}
        log.info("terminating %d child process group(s)", len(groups))
        for pgid in groups:
            signal_group(pgid, signal.SIGTERM)
        with trio.move_on_after(grace):
            async with trio.open_nursery() as nursery:
                for proc in procs:
                    nursery.start_soon(proc.wait)
            # Grandchildren may outlive their leader; nothing signals that a
            # process group has emptied, so poll for it.
            while True:
                if not any(group_alive(pgid) for pgid in groups):
                    break
                await trio.sleep(GROUP_POLL)
        for pgid in groups:
            signal_group(pgid, signal.SIGKILL)


async def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str | None = None,
    merge_stderr: bool,
    user: RunAs | None = None,
    stdin: bool = False,
    overrides: Mapping[str, str] | None = None,
) -> trio.Process:
    """Start ``argv`` (no shell) as the leader of a new session, as ``user`` when
    given (its HOME, USER and LOGNAME set, then ``overrides``: a CLI's own HOME),
    with a stdin pipe when ``stdin``.

    Raises OSError or ValueError when it cannot be started.
    """
    options = {} if user is None else user.spawn_options()
    argv = list(argv)
    if argv and "/" not in argv[0]:
        # Looked up here, as a shell would: the exec as another user would report the
        # first PATH entry that user may not search, not that the program is missing.
        found = shutil.which(argv[0], path=env.get("PATH", os.defpath))
        if found is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), argv[0])
        argv[0] = found
    return await trio.lowlevel.open_process(
        argv,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        cwd=cwd or None,
        env={**env, **(user.env() if user is not None else {}), **(overrides or {})},
        start_new_session=True,
        **options,
    )


async def run_command(
    msg: Run,
    send: Send,
    children: Children,
    env: Mapping[str, str],
    *,
    user: RunAs | None = None,
    cwd: str | None = None,
) -> None:
    """Serve a ``Run``: stream ``Output`` chunks, then one ``Exited``.

    It runs as ``msg.user`` when named, else as ``user``; in ``msg.cwd``, else ``cwd``."""
    try:
        if msg.user:
            user = lookup(msg.user)
        proc = await spawn(msg.argv, env=env, cwd=msg.cwd or cwd, merge_stderr=False, user=user)
    except UnknownUser as exc:
        await send(Exited(req=msg.req, code=126, error=str(exc)))
        return
    except (OSError, ValueError) as exc:
        code, error = spawn_failure(exc)
        log.info("run %d: cannot start %s: %s", msg.req, msg.argv[0], error)
        await send(Exited(req=msg.req, code=code, error=error))
        return
    log.info("run %d: started %s (pid %d)", msg.req, msg.argv[0], proc.pid)

    async def pump(stream: trio.abc.ReceiveStream | None, name: OutputStream) -> None:
        assert stream is not None
        while chunk := await stream.receive_some(MAX_OUTPUT_CHUNK):
            await send(Output(req=msg.req, stream=name, data=bytes(chunk)))

    async with children.track(proc):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, proc.stdout, "stdout")
            nursery.start_soon(pump, proc.stderr, "stderr")
        code = await proc.wait()
    log.info("run %d: exited %d", msg.req, code)
    await send(Exited(req=msg.req, code=code))


async def run_task(
    msg: Task,
    who: Identity | None,
    send: Send,
    children: Children,
    base_env: Mapping[str, str],
    *,
    user: RunAs | None = None,
    workdir: str | None = None,
) -> None:
    """Serve a ``Task``: run the harness, reply with one ``TaskDone``."""
    if who is None:
        await send(
            TaskDone(
                task_id=msg.task_id,
                code=EXIT_NOT_PROMOTED,
                output="not promoted: this guest has no agent identity yet",
            )
        )
        return
    code, output, truncated = await run_harness(
        who, msg.prompt, children, base_env, task_id=msg.task_id, user=user, workdir=workdir
    )
    await send(TaskDone(task_id=msg.task_id, code=code, output=output, truncated=truncated))


async def run_harness(
    who: Identity,
    prompt: str,
    children: Children,
    base_env: Mapping[str, str],
    *,
    task_id: int = 0,
    user: RunAs | None = None,
    workdir: str | None = None,
) -> tuple[int, str, bool]:
    """Run the agent's harness on ``prompt``: (exit code, output, whether it was cut).

    Serves tasks and the questions an agent is asked on IRC alike. It runs as
    ``user`` (None: as the daemon) in the workspace, else in ``workdir``."""
    label = f"task {task_id}" if task_id else "question"
    argv = harness_argv(who.argv, prompt)
    env = task_env(base_env, who, task_id, prompt)
    try:
        proc = await spawn(
            argv, env=env, cwd=who.workspace or workdir, merge_stderr=True, user=user
        )
    except (OSError, ValueError) as exc:
        code, error = spawn_failure(exc)
        log.info("%s: cannot start harness %s: %s", label, argv[0], error)
        return code, error, False
    log.info("%s: %s started harness %s (pid %d)", label, who.name, argv[0], proc.pid)

    cap = OutputCap()
    note = ""

    async def drain() -> None:
        assert proc.stdout is not None
        while chunk := await proc.stdout.receive_some(MAX_OUTPUT_CHUNK):
            cap.feed(chunk)

    async with children.track(proc):
        with trio.move_on_after(who.timeout) as deadline:
            await drain()
            code = await proc.wait()
        if deadline.cancelled_caught:
            signal_group(proc.pid, signal.SIGKILL)
            note = f"timed out after {who.timeout:g}s"
            code = -signal.SIGKILL
            with trio.move_on_after(REAP_TIMEOUT):
                await drain()
    if who.workspace is not None:
        # What the agent wrote is on its disk before the answer goes out: a VM
        # killed right after loses nothing it reported done.
        await trio.to_thread.run_sync(os.sync)
    output, truncated = task_output(cap.kept, truncated=cap.truncated, note=note)
    log.info("%s: exited %d%s", label, code, f" ({note})" if note else "")
    return code, output, truncated
