"""Named agents' workspace disks: one ext4 image per agent, kept across its VMs.

``<directory>/<agent>.ext4`` is made the first time an agent is promoted
(``mke2fs -d``: no loop mount), owned inside by the guest's ``agent`` user
and holding a ``MEMORY.md`` to start from. Every VM the agent runs in gets
it swapped under its spare disk before its promotion, so whatever the agent
wrote survives its VM's crashes, restarts of the supervisor and re-invokes
under the same name. ``destroy`` stops the agent but keeps its workspace.

A task run by a coding-agent CLI gets one too, ``<directory>/tasks/task-N.ext4``
(``for_work``): the CLI keeps its session there, so when the task stops to
ask and an answer resumes it on another VM, the session is still there. It
goes once the task is done or failed (``discard_task``).

Errors::

    WorkspaceError      the image could not be made (one line)
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Final

import trio
from fireclaw.pool.runner import ProgramFailed, run_program

SUFFIX: Final = ".ext4"
#: The guest's ``agent`` user (fireclaw.pool.image.rootfs.AGENT_UID).
AGENT_UID: Final = 1000
_NAME: Final = re.compile(r"[A-Za-z0-9_\-\[\]\\^{}|`]{1,64}")
_TIMEOUT: Final = 60.0


class WorkspaceError(Exception):
    """A workspace image could not be made."""


def path_for(directory: Path, agent: str) -> Path:
    if not _NAME.fullmatch(agent) or agent.startswith("-"):
        raise WorkspaceError(f"agent name {agent!r} cannot name a workspace file")
    return directory / f"{agent}{SUFFIX}"


#: Under the workspaces directory: the workspaces of tasks (apart from agents',
#: whatever an agent is called).
TASKS: Final = "tasks"


def for_work(
    directory: Path, *, agent: str | None, task: int | None, cli: bool
) -> tuple[Path, str] | None:
    """Where the workspace of a VM's work is and its name: a named agent's own;
    a task's, when a CLI runs it; else None (a task of another harness, a run)."""
    if agent is not None:
        return directory, agent
    if task is not None and cli:
        return directory / TASKS, f"task-{task}"
    return None


def discard_task(directory: Path, task: int) -> None:
    """Remove the workspace of ``task`` (done or failed), if it had one."""
    path_for(directory / TASKS, f"task-{task}").unlink(missing_ok=True)


def first_memory(agent: str) -> str:
    return (
        f"# MEMORY.md of {agent}\n"
        "\n"
        "What this agent keeps between tasks and across restarts of its VM.\n"
    )


async def ensure(directory: Path, agent: str, size: int) -> Path:
    """``agent``'s workspace image, made first (``size`` bytes, sparse) if need be."""
    path = path_for(directory, agent)
    await trio.to_thread.run_sync(_ensure, path, agent, size)
    return path


def _ensure(path: Path, agent: str, size: int) -> None:
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    aside = path.with_name(f".{path.name}.partial")
    seed = Path(tempfile.mkdtemp(prefix="fireclaw-workspace-"))
    try:
        memory = seed / "MEMORY.md"
        memory.write_text(first_memory(agent))
        os.chown(memory, AGENT_UID, AGENT_UID)
        argv = [
            "mke2fs", "-q", "-F", "-t", "ext4", "-L", "workspace",
            "-E", f"root_owner={AGENT_UID}:{AGENT_UID}",
            "-d", str(seed), str(aside), f"{size // 1024}k",
        ]  # fmt: skip
        run_program(argv, timeout=_TIMEOUT)
        aside.chmod(0o600)
        os.replace(aside, path)
    except (OSError, ProgramFailed) as exc:
        raise WorkspaceError(f"workspace {path.name}: {exc}") from exc
    finally:
        shutil.rmtree(seed, ignore_errors=True)
        aside.unlink(missing_ok=True)
