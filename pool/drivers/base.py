"""The VMM driver protocol: what the pool needs from anything that runs a VM.

A driver starts a VM (boot or restore) from a ``VmSpec`` and hands back a
``VmHandle`` for the one VMM process behind it. Everything else (the control
channel, health, restarts) lives above the driver, so a new driver changes
none of it.

Errors::

    DriverError         the VM could not be started
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class DriverError(Exception):
    """A VM could not be started."""


@dataclass(frozen=True, kw_only=True)
class VmSpec:
    vm_id: str  # unique per incarnation, used for namespaces, cgroups and logs
    name: str  # the child's stable name, e.g. worker-0
    role: str
    vcpus: int
    memory_mib: int
    control_url: str  # where the guest daemon dials, as seen from inside the VM
    token: str  # the guest proves it is this VM with it
    netns: str | None  # namespace to run in, None for the host's
    cgroup: Path | None  # cgroup to place the VMM in, None for none
    log_path: Path  # the VMM's stdout and stderr go here
    guest_command: tuple[str, ...] | None = None  # process driver: argv instead of the daemon
    #: qemu: the tap in ``netns`` to attach the guest to (None: QEMU's user network).
    tap: str | None = None
    #: qemu: this VM's own writable root disk, a qcow2 overlay over the image (None:
    #: the image's root filesystem, shared read-only).
    disk: Path | None = None
    #: qemu: the guest's RAM lives in this file, shared. A snapshot then leaves RAM
    #: out (it is the file), and clones map the file privately: they start without
    #: copying it and share every page none of them has written.
    memory_file: Path | None = None


class VmHandle(Protocol):
    """One running VMM process."""

    @property
    def pid(self) -> int: ...

    async def wait(self) -> int:
        """Wait for the VMM to exit; its exit code, negative for a signal."""
        ...

    def terminate(self) -> None:
        """Ask the VMM to exit (SIGTERM to its process group). Never blocks."""
        ...

    async def kill(self) -> None:
        """Kill the VMM and everything it started, and reap it."""
        ...

    def info(self) -> dict[str, object]: ...


class Driver(Protocol):
    name: str

    async def start(self, spec: VmSpec) -> VmHandle: ...
