"""The VMM driver protocol: what the pool needs from anything that runs a VM.

A ``Driver`` boots a VM from a ``VmSpec`` (``start``), restores a clone from a
snapshot (``restore``) or takes over one a previous supervisor left running
(``adopt``), and hands back a ``VmHandle`` for the one VMM process behind it.
The handle pauses and resumes the VM, snapshots it, attaches a named agent's
workspace disk, asks it to stop (``terminate``), kills it and waits for it. Everything else
(the control channel, health, restarts, templates) lives above the driver and
names no driver class, so a new driver changes none of it.

How the supervisor and the guest daemon reach each other is the driver's to
say (``DriverInfo.channel``, a ``ChannelKind``): the guest dials a WebSocket on
the VM's network (``DIALLED``), or the VMM offers a device the guest keeps
open and the host connects to through ``VmHandle.open_channel``: a
virtio-serial port (``VIRTIO_SERIAL``, QEMU), or vsock (``VSOCK``, as
Firecracker offers it through its unix socket). On a device, a VM restored
from a snapshot carries on where its template was, and the host comes to it.

A driver says what it is through ``describe()``: its name, what it can do
(``Capability``; a call it cannot serve raises ``Unsupported`` naming why),
whether it can run on this host at all, and what of it a snapshot depends on
(``key_inputs``: a template taken under one QEMU binary or accelerator is no
template for another). It also says what each VM's own root disk must be
(``DiskFormat``): a qcow2 overlay on the image, or a raw file of its own;
the pool makes that disk and never asks which driver it is talking to.

An adopted VMM is not the supervisor's child: its exit status is unknowable,
and ``wait`` says so with None. A driver whose VMs cannot outlive their
supervisor raises ``DriverError`` from ``adopt`` and its VMs are reclaimed.

A snapshot at ``PATH`` is whole when ``PATH`` exists: every driver writes
``PATH.json`` (what it was taken with) and any other files first, and
``PATH`` itself last.

Errors::

    DriverError             a VM could not be started, restored or adopted
    ├── VmmCommandError     a running VM could not be paused, resumed, snapshotted
    │                       or given its workspace
    └── Unsupported         the driver cannot do that at all (see ``describe``)
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol, TypeVar

import msgspec
import trio

T = TypeVar("T")

#: A named agent's workspace disk: its size (every one, and the spare disk it
#: replaces), and the serial the guest finds it by.
WORKSPACE_BYTES: Final = 256 << 20
WORKSPACE_SERIAL: Final = "fc-workspace"
#: The control port to use in every namespace when VMs are restored from snapshots:
#: a clone dials the URL its template was booted with.
CONTROL_PORT: Final = 7000
SNAPSHOT_INFO_SUFFIX: Final = ".json"


class DriverError(Exception):
    """A VM could not be started, restored or adopted."""


class VmmCommandError(DriverError):
    """A running VM could not be paused, resumed, snapshotted or given its workspace."""


class Unsupported(DriverError):
    """The driver cannot do this at all; its ``describe()`` says so beforehand."""


class ChannelKind(enum.Enum):
    """How the supervisor and a VM's guest daemon reach each other."""

    DIALLED = "dialled"  # the guest dials spec.control_url (a WebSocket)
    VIRTIO_SERIAL = "virtio-serial"  # a port the host connects to (open_channel)
    VSOCK = "vsock"  # a vsock port the host connects to (open_channel)


class DiskFormat(enum.Enum):
    """What a VM's own writable root disk is, as its VMM opens it."""

    #: A qcow2 file whose backing is the image's root (or its template's overlay):
    #: empty at first, it holds only what this VM writes.
    QCOW2_OVERLAY = "qcow2 overlay"
    #: A raw file of the whole disk (a VMM that opens raw files only): a reflink
    #: or sparse copy of the image's root, or of its template's disk.
    RAW_COPY = "raw copy"


class Capability(enum.Enum):
    """What a driver may or may not be able to do beyond boot, stop, kill and wait."""

    SNAPSHOT = "snapshot"  # VmHandle.snapshot and Driver.restore
    PAUSE = "pause"  # VmHandle.pause and resume
    WORKSPACE = "workspace"  # VmHandle.attach_workspace


@dataclass(frozen=True, kw_only=True)
class DriverInfo:
    """What a driver says of itself (``Driver.describe``)."""

    name: str
    capabilities: frozenset[Capability]
    #: For each capability it lacks: why, in a few words.
    lacking: Mapping[Capability, str] = field(default_factory=dict)
    #: Why it cannot run VMs on this host, in one line; None when it can.
    unavailable: str | None = None
    #: Everything of this driver a snapshot depends on; part of every template key.
    key_inputs: Mapping[str, object] = field(default_factory=dict)
    #: The image's root filesystem each VM's own disk is made from (None: the
    #: driver's VMs have no disks of their own).
    root_disk: Path | None = None
    #: What each VM's own disk is (with a ``root_disk``).
    disk: DiskFormat = DiskFormat.QCOW2_OVERLAY
    #: How its guests reach the supervisor: dialling, or through a device the host
    #: connects to (``VmHandle.open_channel``).
    channel: ChannelKind = ChannelKind.DIALLED

    def can(self, capability: Capability) -> bool:
        return capability in self.capabilities

    def why_not(self, capability: Capability) -> str:
        """One line: this driver cannot do ``capability``, and why."""
        return str(unsupported(self.name, capability, self.lacking.get(capability, "")))


def unsupported(driver: str, capability: Capability, why: str) -> Unsupported:
    """The error of a call the ``driver`` cannot serve at all, saying why."""
    return Unsupported(f"the {driver} driver cannot {capability.value}: {why or 'not built'}")


@dataclass(frozen=True, kw_only=True)
class VmSpec:
    vm_id: str  # unique per incarnation, used for namespaces, cgroups and logs
    name: str  # the child's stable name, e.g. worker-0
    role: str
    vcpus: int
    memory_mib: int
    #: Where the guest daemon dials, as seen from inside the VM (``ChannelKind.DIALLED``
    #: only; a driver with a channel device does not use it).
    control_url: str
    token: str  # the guest proves it is this VM with it
    netns: str | None  # namespace to run in, None for the host's
    cgroup: Path | None  # cgroup to place the VMM in, None for none
    log_path: Path  # the VMM's stdout and stderr go here
    guest_command: tuple[str, ...] | None = None  # process driver: argv instead of the daemon
    #: The tap in ``netns`` to attach the guest to (None: the driver's own user network).
    tap: str | None = None
    #: This VM's own writable root disk, as ``DriverInfo.disk`` says (None: the
    #: image's root filesystem, shared read-only).
    disk: Path | None = None
    #: The guest's RAM lives in this file, shared. A snapshot then leaves RAM out
    #: (it is the file), and clones map the file privately: they start without
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


@dataclass(frozen=True)
class Snapshot:
    path: Path
    size: int  # bytes written (state, and memory when it is not a shared file)
    seconds: float  # pause + writing, wall time


def info_path(snapshot: Path) -> Path:
    """``PATH.json``, what the snapshot at ``PATH`` was taken with."""
    return snapshot.with_name(snapshot.name + SNAPSHOT_INFO_SUFFIX)


def load_info(snapshot: Path, decoder: msgspec.json.Decoder[T]) -> T:
    """What ``snapshot`` (absolute) was taken with, as its ``PATH.json`` says;
    DriverError (one line) when either file is missing or unreadable."""
    if not snapshot.is_absolute():  # a VMM's helper may run in another directory
        raise DriverError(f"snapshot path {snapshot} is not absolute")
    where = info_path(snapshot)
    try:
        info = decoder.decode(where.read_bytes())
    except OSError as exc:
        raise DriverError(f"snapshot {snapshot}: {exc.strerror} ({where})") from exc
    except msgspec.DecodeError as exc:
        raise DriverError(f"snapshot {snapshot}: unreadable {where}: {exc}") from exc
    if not snapshot.is_file():
        raise DriverError(f"snapshot {snapshot}: no such file")
    return info


class VmHandle(Protocol):
    """One running VMM process."""

    @property
    def pid(self) -> int: ...

    @property
    def control_socket(self) -> Path | None:
        """The VMM's own control socket (recorded, for ``adopt``), or None."""
        ...

    async def wait(self) -> int | None:
        """Wait for the VMM to exit and release what the driver made for it (its
        run directory, its jail); its exit code, negative for a signal, None when
        it is unknowable (an adopted process is not our child)."""
        ...

    def terminate(self) -> None:
        """Ask the VMM to stop (SIGTERM to its process group). Never blocks."""
        ...

    async def kill(self) -> None:
        """Kill the VMM and everything it started, and reap it (as ``wait``)."""
        ...

    def exit_text(self) -> str:
        """How the VMM ended (or that it runs), in one line for a person."""
        ...

    async def pause(self) -> None:
        """Stop the guest's vCPUs (``Capability.PAUSE``)."""
        ...

    async def resume(self) -> None:
        """Let a paused guest run again (``Capability.PAUSE``)."""
        ...

    async def snapshot(self, path: Path) -> Snapshot:
        """Pause the VM and write its state to ``path``, absolute, and beside it
        ``PATH.json`` (``Capability.SNAPSHOT``). The VM stays paused; a snapshot
        not finished leaves none of its files and the VM runs again."""
        ...

    async def attach_workspace(self, path: Path) -> None:
        """Put the image at ``path`` (absolute, ``WORKSPACE_BYTES`` long) under the
        VM's spare disk, the one with ``WORKSPACE_SERIAL``; once per VM
        (``Capability.WORKSPACE``)."""
        ...

    async def open_channel(self) -> trio.abc.Stream:
        """The host's end of the guest's control channel device (a driver whose
        ``channel`` is not ``DIALLED``): a byte stream whose EOF means the VMM is
        gone. One at a time; after a stream is closed, the next call connects
        anew (a supervisor that adopts the VM). Unsupported for a dialled channel."""
        ...

    def info(self) -> dict[str, object]: ...


class Driver(Protocol):
    name: str
    #: Whether its VMs run on without the supervisor, so that the next one on the
    #: same state dir can adopt them (a handover leaves them running then).
    outlives_supervisor: bool

    def describe(self) -> DriverInfo:
        """What this driver is and can do here. Cheap: no process is started."""
        ...

    async def start(self, spec: VmSpec) -> VmHandle:
        """Boot a VM; returns once its VMM answers (the guest may still be booting)."""
        ...

    async def restore(self, spec: VmSpec, snapshot: Path) -> VmHandle:
        """Start a clone of the VM ``snapshot`` was taken of; returns once it runs.

        The clone IS its template: its guest says Hello with the template's
        vm_id and token, to the template's URL; the caller knows it by
        ``spec.netns``. ``Unsupported`` without ``Capability.SNAPSHOT``."""
        ...

    async def adopt(self, spec: VmSpec, running: Running) -> VmHandle:
        """Take over ``running``, the VMM of the VM ``spec`` describes, as it runs.

        ``DriverError`` when it is not that process any more, does not answer
        or is not running its guest, or this driver's VMs cannot be adopted."""
        ...
