"""Running the host programs a build needs, with their failures as one line."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

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
        proc = subprocess.Popen(
            [program, *argv[1:]],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except OSError as exc:
        raise StepFailed(f"{step}: cannot run {argv[0]}: {exc.strerror or exc}") from exc
    if on_line is None:
        out, err = proc.communicate()
        lines = err.decode(errors="replace").splitlines()
    else:
        # Stream stderr for progress; stdout is small for every streamed step.
        assert proc.stderr is not None and proc.stdout is not None
        lines = []
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            lines.append(line)
            on_line(line)
        out = proc.stdout.read()
        proc.wait()
    if proc.returncode != 0:
        raise StepFailed(f"{step}: {argv[0]} exited with {proc.returncode}: {_telling(lines)}")
    return out


def _telling(lines: list[str]) -> str:
    """The stderr line most likely to say what went wrong."""
    text = [line.strip() for line in lines if line.strip()]
    for prefix in ("E:", "ERROR:", "error:", "Error:"):
        errors = [line for line in text if line.startswith(prefix)]
        if errors:
            return errors[-1]
    return text[-1] if text else "no error output"
