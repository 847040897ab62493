"""Running a host program to completion: the one way the host side does it.

``run_program(argv, timeout=...)`` runs ``argv`` with stdin from ``input`` (or
/dev/null), waits for it and returns its stdout. A program that cannot start,
that runs past ``timeout`` (it is killed) or that exits non-zero raises
``ProgramFailed``, whose ``str()`` is one line: the program's name and the
stderr line most likely to say what went wrong (``telling``). With ``on_line``
each stderr line is also handed over as it arrives, for progress.

Blocking: call it from a thread under trio (``trio.to_thread.run_sync``). The
guest daemon has its own (it ships alone into VM images).

Exceptions::

    ProgramFailed   the program did not start, timed out or exited non-zero
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence

__all__ = ["ProgramFailed", "run_program", "telling"]


class ProgramFailed(Exception):
    """``program`` failed. ``returncode`` is None when it never ran to an exit (it
    could not start, or it was killed at its timeout); ``stderr_line`` is its most
    telling stderr line, empty when it wrote none; ``why`` says it in one line."""

    def __init__(
        self, program: str, why: str, *, returncode: int | None = None, stderr_line: str = ""
    ) -> None:
        super().__init__(program, why)
        self.program = program
        self.why = why
        self.returncode = returncode
        self.stderr_line = stderr_line

    def __str__(self) -> str:
        # Many programs start their own error lines with their name already.
        if self.why.startswith(f"{self.program}:"):
            return self.why
        return f"{self.program}: {self.why}"


def telling(lines: Sequence[str]) -> str:
    """The stderr line most likely to say what went wrong: the last one marked as an
    error (``E:``, ``error:``, ...), else the last one; empty when there is none."""
    text = [line.strip() for line in lines if line.strip()]
    for prefix in ("E:", "ERROR:", "error:", "Error:"):
        errors = [line for line in text if line.startswith(prefix)]
        if errors:
            return errors[-1]
    return text[-1] if text else ""


def run_program(
    argv: Sequence[str],
    *,
    timeout: float | None,
    input: bytes | None = None,
    name: str | None = None,
    cwd: str | os.PathLike[str] | None = None,
    on_line: Callable[[str], None] | None = None,
) -> bytes:
    """Run ``argv`` to completion and return its stdout; ``ProgramFailed`` otherwise.

    ``name`` is how errors call the program (default: ``argv[0]``'s base name),
    for a program run through another (``nsenter ... nft``). ``on_line`` streams
    stderr and takes no ``timeout`` or ``input``.
    """
    program = name or os.path.basename(argv[0])
    if on_line is not None:
        assert timeout is None and input is None, "a streamed run takes no timeout or input"
        out, lines, code = _streamed(argv, program, cwd, on_line)
    else:
        try:
            done = subprocess.run(
                list(argv),
                input=input,
                stdin=subprocess.DEVNULL if input is None else None,
                capture_output=True,
                cwd=cwd,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ProgramFailed(program, f"took over {timeout:g}s") from None
        except OSError as exc:
            raise ProgramFailed(program, exc.strerror or str(exc)) from exc
        out, code = done.stdout, done.returncode
        lines = done.stderr.decode(errors="replace").splitlines()
    if code != 0:
        line = telling(lines)
        why = line or f"exit code {code}"
        raise ProgramFailed(program, why, returncode=code, stderr_line=line)
    return out


def _streamed(
    argv: Sequence[str],
    program: str,
    cwd: str | os.PathLike[str] | None,
    on_line: Callable[[str], None],
) -> tuple[bytes, list[str], int]:
    try:
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except OSError as exc:
        raise ProgramFailed(program, exc.strerror or str(exc)) from exc
    # Stream stderr for progress; stdout is small for every streamed step, so
    # reading it after stderr's EOF cannot deadlock.
    assert proc.stderr is not None and proc.stdout is not None
    lines = []
    with proc:
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            lines.append(line)
            on_line(line)
        out = proc.stdout.read()
        proc.wait()
    return out, lines, proc.returncode
