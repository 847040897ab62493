"""How every driver starts its VMM process, so that all of them do it the same way.

Its own session (so a stop can signal the whole group), stdin from /dev/null,
stdout and stderr appended to the VM's log (never an undrained pipe), no
inherited file descriptors but those it is handed (``pass_fds``), and inside
the VM's network namespace when it has one. No PR_SET_PDEATHSIG: trio spawns
from worker threads that exit when idle.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import trio
from fireclaw.pool.netns import NETNS_DIR


def in_netns(argv: list[str], netns: str | None) -> list[str]:
    """``argv`` run inside namespace ``netns`` (nsenter keeps the pid: it execs)."""
    if netns is None:
        return argv
    return ["nsenter", f"--net={NETNS_DIR / netns}", "--", *argv]


def open_log(path: Path) -> int:
    """The VM's log, opened for appending; the caller closes the descriptor."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)


async def open_vmm(
    argv: list[str], *, log_fd: int, env: Mapping[str, str], pass_fds: Sequence[int] = ()
) -> trio.Process:
    """Start the VMM; ``pass_fds`` are inherited under the same numbers (nsenter
    passes them on: it execs)."""
    return await trio.lowlevel.open_process(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log_fd,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        close_fds=True,
        pass_fds=pass_fds,
        env=env,
        cwd="/",
    )
