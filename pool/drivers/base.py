"""The VMM driver protocol: what the pool needs from anything that runs a VM.

A driver starts a VM (boot or restore) from a ``VmSpec`` and hands back a
``VmHandle`` for the one VMM process behind it. Everything else (the control
channel, health, restarts) lives above the driver, so a new driver changes
none of it.

A driver may also ``adopt`` a VMM a previous supervisor started and left
running (``Running`` says which process it is). The handle then watches a
process that is not the supervisor's child: its exit status is unknowable,
and ``wait`` says so with None. A driver whose VMs cannot outlive their
supervisor raises ``DriverError`` there and its VMs are reclaimed.

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


@dataclass(frozen=True, kw_only=True)
class Running:
    """A VMM process a previous supervisor started, as its VM registry recorded it.

    The pid alone names no process (pids are reused): ``start_time`` (clock
    ticks since boot, ``/proc/PID/stat`` field 22) and ``boot_id`` make it one."""

    pid: int
    start_time: int
    boot_id: str
    control_socket: Path  # the VMM's own control socket (qemu: QMP)
    started_as: str = ""  # "booted" or "restored <template>", for the record


class VmHandle(Protocol):
    """One running VMM process."""

    @property
    def pid(self) -> int: ...

    async def wait(self) -> int | None:
        """Wait for the VMM to exit; its exit code, negative for a signal, None
        when it is unknowable (an adopted process is not our child)."""
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
    #: Whether its VMs run on without the supervisor, so that the next one on the
    #: same state dir can adopt them (a handover leaves them running then).
    outlives_supervisor: bool

    async def start(self, spec: VmSpec) -> VmHandle: ...

    async def adopt(self, spec: VmSpec, running: Running) -> VmHandle:
        """Take over ``running``, the VMM of the VM ``spec`` describes, as it runs.

        ``DriverError`` when it is not that process any more, does not answer
        or is not running its guest, or this driver's VMs cannot be adopted."""
        ...
