"""A named agent's workspace disk, seen from inside its VM.

The supervisor attaches the agent's own ext4 image to the VM's spare
virtio disk (serial ``fc-workspace``) before it promotes the VM, and says so
in ``Promote.workspace``; the daemon then mounts it at ``MOUNT_POINT``,
where the harness runs and ``MEMORY.md`` lives. The disk sat empty until
then, so the kernel may hold stale blocks of it: they are dropped
(BLKFLSBUF) before the mount.

Errors::

    WorkspaceError      the disk is missing or cannot be mounted (one line)
"""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path
from typing import Final

SERIAL: Final = "fc-workspace"
MOUNT_POINT: Final = "/workspace"
_BLKFLSBUF: Final = 0x1261
_MOUNT_TIMEOUT: Final = 30.0


class WorkspaceError(Exception):
    """The workspace disk is missing or cannot be mounted."""


def find_device(sys_block: Path = Path("/sys/block")) -> Path | None:
    """The block device whose virtio serial is ``SERIAL``."""
    for entry in sorted(sys_block.glob("vd*")):
        try:
            serial = (entry / "serial").read_text().strip()
        except OSError:
            continue
        if serial == SERIAL:
            return Path("/dev") / entry.name
    return None


def is_mounted(mount_point: str = MOUNT_POINT, mounts: Path = Path("/proc/mounts")) -> bool:
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return False
    return any(len(w := line.split()) > 1 and w[1] == mount_point for line in lines)


def mount() -> str:
    """Mount the workspace disk (once) and return where; blocking."""
    if is_mounted():
        return MOUNT_POINT
    device = find_device()
    if device is None:
        raise WorkspaceError(f"no disk with serial {SERIAL}")
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, _BLKFLSBUF)
        finally:
            os.close(fd)
        os.makedirs(MOUNT_POINT, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "ext4", "-o", "nosuid,nodev", str(device), MOUNT_POINT],
            capture_output=True,
            timeout=_MOUNT_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise WorkspaceError(f"{device}: {exc}") from exc
    if done.returncode != 0:
        text = done.stderr.decode(errors="replace").strip().splitlines()
        raise WorkspaceError(f"mounting {device}: {text[-1] if text else done.returncode}")
    return MOUNT_POINT
