"""Running the host programs a build needs, with their failures as one line."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from fireclaw.pool.runner import ProgramFailed, run_program

from .errors import StepFailed, ToolMissing

#: Program -> the Debian package that provides it.
DEBIAN_PACKAGE = {
    "apt-cache": "apt",
    "apt-get": "apt",
    "chroot": "coreutils",
    "dpkg-deb": "dpkg",
    "lz4": "lz4",
    "lzop": "lzop",
    "mke2fs": "e2fsprogs",
    "mmdebstrap": "mmdebstrap",
    "zstd": "zstd",
}


def require(program: str) -> str:
    """The path of ``program``; ToolMissing names the package to install."""
    path = shutil.which(program)
    if path is None:
        package = DEBIAN_PACKAGE.get(program, program)
        raise ToolMissing(f"{program} not found: install it (apt-get install {package})")
    return path


def run(
    argv: Sequence[str],
    *,
    step: str,
    cwd: Path | None = None,
    on_line: Callable[[str], None] | None = None,
) -> bytes:
    """Run ``argv`` to completion and return its stdout.

    Each stderr line goes to ``on_line`` as it arrives (when given). A non-zero
    exit raises StepFailed naming ``step`` and the most telling stderr line.
    """
    program = require(argv[0])
    try:
        return run_program([program, *argv[1:]], timeout=None, cwd=cwd, on_line=on_line)
    except ProgramFailed as exc:
        if exc.returncode is None:
            raise StepFailed(f"{step}: cannot run {argv[0]}: {exc.why}") from exc
        why = exc.stderr_line or "no error output"
        raise StepFailed(f"{step}: {argv[0]} exited with {exc.returncode}: {why}") from exc
