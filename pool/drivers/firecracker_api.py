"""The Firecracker API, sans-I/O: typed calls in, HTTP requests out, order kept.

Firecracker is driven over HTTP/1.1 on a unix socket (the API of
``firecracker-api-v1.16.1.yaml``). Each call the ``firecracker`` driver makes
is a frozen msgspec Struct here; ``FirecrackerApi.prepare(call)`` turns it into
a ``Request`` (method, path, JSON body) and refuses it, before anything is
sent, when the VM is not in a state where Firecracker would take it.
``FirecrackerApi.receive(status, body)`` takes the answer: a 2xx moves the
state on, anything else raises ``ApiFault`` with Firecracker's own
``fault_message`` in one line, and the state stays where it was.

The order Firecracker enforces, as a transition table over ``Phase``::

    fresh --(configure)--> configuring --InstanceStart--> running <--> paused
      \\--snapshot/load--> paused (or running with resume_vm)

- ``snapshot/load`` only on a fresh process, before any configuration;
- pre-boot configuration (boot source, drives, network, machine, entropy,
  MMDS config) only before ``InstanceStart``, which comes once, after a
  boot source;
- ``snapshot/create`` only while paused; pause only when running, resume only
  when paused; the MMDS data store may be written at any time.

No sockets and no clock here: ``pool/drivers/firecracker.py`` carries the bytes.

Errors::

    ApiError
    ├── OutOfOrder      a call Firecracker would refuse in the current phase (never sent)
    └── ApiFault        Firecracker answered with an error status
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

import msgspec
from fireclaw.guest_daemon.lines import one_line
from msgspec import Meta

#: Firecracker's answers are small (a fault message, a version, instance info).
MAX_RESPONSE_BYTES: Final = 64 << 10
#: How much of a fault message a one-line error keeps.
_FAULT_CHARS: Final = 300

DeviceId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class ApiError(Exception):
    """A Firecracker API call was refused, here or by Firecracker."""


class OutOfOrder(ApiError):
    """The call is not one Firecracker takes in the VM's current phase; it was not sent."""


class ApiFault(ApiError):
    """Firecracker answered with an error status; the message is its fault_message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class _Body(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True
):
    """A request body: fields left at None are left out, as the spec's optional fields."""


# --- bodies, as the spec's definitions ---------------------------------------------------


class BootSource(_Body, frozen=True):
    kernel_image_path: str
    boot_args: str | None = None
    initrd_path: str | None = None


class Drive(_Body, frozen=True):
    drive_id: DeviceId
    is_root_device: bool
    path_on_host: str
    is_read_only: bool
    cache_type: Literal["Unsafe", "Writeback"] | None = None
    io_engine: Literal["Sync", "Async"] | None = None


class NetworkInterface(_Body, frozen=True):
    iface_id: DeviceId
    host_dev_name: Annotated[str, Meta(min_length=1, max_length=15)]
    guest_mac: str | None = None
    mtu: Annotated[int, Meta(ge=68, le=65535)] | None = None


class MachineConfiguration(_Body, frozen=True):
    vcpu_count: Annotated[int, Meta(ge=1, le=32)]
    mem_size_mib: Annotated[int, Meta(ge=1)]
    smt: bool | None = None
    track_dirty_pages: bool | None = None


class EntropyDevice(_Body, frozen=True):
    """The virtio-rng device: no fields needed (no rate limiter)."""


class MmdsConfig(_Body, frozen=True):
    network_interfaces: tuple[DeviceId, ...]
    version: Literal["V1", "V2"] | None = None
    ipv4_address: str | None = None


class InstanceActionInfo(_Body, frozen=True):
    action_type: Literal["FlushMetrics", "InstanceStart", "SendCtrlAltDel"]


class VmState(_Body, frozen=True):
    state: Literal["Paused", "Resumed"]


class SnapshotCreateParams(_Body, frozen=True):
    snapshot_path: str
    mem_file_path: str
    snapshot_type: Literal["Full", "Diff"] | None = None


class MemoryBackend(_Body, frozen=True):
    backend_type: Literal["File", "Uffd"]
    backend_path: str


class NetworkOverride(_Body, frozen=True):
    iface_id: DeviceId
    host_dev_name: Annotated[str, Meta(min_length=1, max_length=15)]


class SnapshotLoadParams(_Body, frozen=True):
    snapshot_path: str
    mem_backend: MemoryBackend
    resume_vm: bool | None = None
    network_overrides: tuple[NetworkOverride, ...] | None = None


class InstanceInfo(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /``: unknown fields are ignored (a newer Firecracker may add some)."""

    id: str
    state: Literal["Not started", "Running", "Paused"]
    vmm_version: str
    app_name: str


class _Fault(msgspec.Struct, frozen=True):
    fault_message: str = ""


# --- calls -------------------------------------------------------------------------------


class Phase(enum.Enum):
    FRESH = "fresh"  # nothing configured: a snapshot may still be loaded
    CONFIGURING = "configuring"  # pre-boot configuration under way
    RUNNING = "running"
    PAUSED = "paused"


class Kind(enum.Enum):
    """What a call does to the VM, which is all the order rules look at."""

    CONFIGURE = "configure"  # pre-boot only
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    SNAPSHOT_CREATE = "snapshot create"
    SNAPSHOT_LOAD = "snapshot load"
    SNAPSHOT_LOAD_RESUME = "snapshot load and resume"
    METADATA = "metadata"  # the MMDS data store: any time
    ACTION = "action"  # SendCtrlAltDel, FlushMetrics: on a running VM
    DESCRIBE = "describe"  # GET: never changes anything


#: ``TRANSITIONS[phase][kind]``: the phase after a successful call; missing: refused.
TRANSITIONS: Final[dict[Phase, dict[Kind, Phase]]] = {
    Phase.FRESH: {
        Kind.CONFIGURE: Phase.CONFIGURING,
        Kind.METADATA: Phase.CONFIGURING,
        Kind.SNAPSHOT_LOAD: Phase.PAUSED,
        Kind.SNAPSHOT_LOAD_RESUME: Phase.RUNNING,
        Kind.DESCRIBE: Phase.FRESH,
    },
    Phase.CONFIGURING: {
        Kind.CONFIGURE: Phase.CONFIGURING,
        Kind.METADATA: Phase.CONFIGURING,
        Kind.START: Phase.RUNNING,
        Kind.DESCRIBE: Phase.CONFIGURING,
    },
    Phase.RUNNING: {
        Kind.PAUSE: Phase.PAUSED,
        Kind.METADATA: Phase.RUNNING,
        Kind.ACTION: Phase.RUNNING,
        Kind.DESCRIBE: Phase.RUNNING,
    },
    Phase.PAUSED: {
        Kind.RESUME: Phase.RUNNING,
        Kind.SNAPSHOT_CREATE: Phase.PAUSED,
        Kind.METADATA: Phase.PAUSED,
        Kind.DESCRIBE: Phase.PAUSED,
    },
}


@dataclass(frozen=True)
class Request:
    """One HTTP request to Firecracker's API socket; ``body`` is JSON or empty."""

    method: Literal["GET", "PUT", "PATCH"]
    path: str
    body: bytes
    kind: Kind


_encoder: Final = msgspec.json.Encoder()
_fault_decoder: Final = msgspec.json.Decoder(_Fault)
_info_decoder: Final = msgspec.json.Decoder(InstanceInfo)


def _put(path: str, body: msgspec.Struct | dict[str, Any], kind: Kind) -> Request:
    data = _encoder.encode(body)
    if isinstance(body, msgspec.Struct):
        # A Struct's limits hold only when decoded: the body is, before it goes out.
        try:
            msgspec.json.decode(data, type=type(body))
        except msgspec.ValidationError as exc:
            raise ApiError(f"{path}: {exc}") from None
    return Request("PUT", path, data, kind)


def boot_source(body: BootSource) -> Request:
    return _put("/boot-source", body, Kind.CONFIGURE)


def drive(body: Drive) -> Request:
    return _put(f"/drives/{body.drive_id}", body, Kind.CONFIGURE)


def network_interface(body: NetworkInterface) -> Request:
    return _put(f"/network-interfaces/{body.iface_id}", body, Kind.CONFIGURE)


def machine_config(body: MachineConfiguration) -> Request:
    return _put("/machine-config", body, Kind.CONFIGURE)


def entropy(body: EntropyDevice) -> Request:
    return _put("/entropy", body, Kind.CONFIGURE)


def mmds_config(body: MmdsConfig) -> Request:
    return _put("/mmds/config", body, Kind.CONFIGURE)


def mmds(contents: dict[str, Any]) -> Request:
    """Replace the MMDS data store (what the guest reads at 169.254.169.254)."""
    return _put("/mmds", contents, Kind.METADATA)


def instance_start() -> Request:
    return _put("/actions", InstanceActionInfo(action_type="InstanceStart"), Kind.START)


def send_ctrl_alt_del() -> Request:
    return _put("/actions", InstanceActionInfo(action_type="SendCtrlAltDel"), Kind.ACTION)


def pause() -> Request:
    return Request("PATCH", "/vm", _encoder.encode(VmState(state="Paused")), Kind.PAUSE)


def resume() -> Request:
    return Request("PATCH", "/vm", _encoder.encode(VmState(state="Resumed")), Kind.RESUME)


def snapshot_create(body: SnapshotCreateParams) -> Request:
    return _put("/snapshot/create", body, Kind.SNAPSHOT_CREATE)


def snapshot_load(body: SnapshotLoadParams) -> Request:
    kind = Kind.SNAPSHOT_LOAD_RESUME if body.resume_vm else Kind.SNAPSHOT_LOAD
    return _put("/snapshot/load", body, kind)


def describe() -> Request:
    return Request("GET", "/", b"", Kind.DESCRIBE)


def fault_message(status: int, body: bytes) -> str:
    """What an error answer says: its ``fault_message``, else the start of its body."""
    try:
        found = _fault_decoder.decode(body[:MAX_RESPONSE_BYTES]).fault_message
    except msgspec.DecodeError:
        found = body[:_FAULT_CHARS].decode(errors="replace")
    return one_line(found, _FAULT_CHARS) or f"no fault message (HTTP {status})"


def instance_info(body: bytes) -> InstanceInfo:
    """``GET /``'s answer; ApiError if it is not the spec's InstanceInfo."""
    try:
        return _info_decoder.decode(body[:MAX_RESPONSE_BYTES])
    except msgspec.DecodeError as exc:
        raise ApiError(f"instance info: {one_line(str(exc), _FAULT_CHARS)}") from None


class FirecrackerApi:
    """The calls made to one Firecracker process, one at a time, in an order it takes.

    ``prepare`` then ``receive`` for each call; a call prepared while another is
    unanswered is refused (one connection, one request at a time)."""

    def __init__(self, phase: Phase = Phase.FRESH) -> None:
        self.phase = phase
        self.booted_from: Literal["boot source", "snapshot"] | None = None
        self._has_boot_source = False
        self._pending: Request | None = None

    def prepare(self, request: Request) -> Request:
        """``request`` if Firecracker takes it now, else OutOfOrder (nothing is sent)."""
        if self._pending is not None:
            raise OutOfOrder(f"{request.path}: {self._pending.path} is still unanswered")
        if request.kind is Kind.START and not self._has_boot_source:
            raise OutOfOrder("InstanceStart before a boot source")
        if request.kind not in TRANSITIONS[self.phase]:
            raise OutOfOrder(f"{request.method} {request.path}: not taken when {self.phase.value}")
        self._pending = request
        return request

    def receive(self, status: int, body: bytes) -> bytes:
        """The answer to the prepared call: its body on 2xx, else ApiFault."""
        request, self._pending = self._pending, None
        if request is None:
            raise ApiError(f"an answer (HTTP {status}) to no request")
        if not 200 <= status < 300:
            raise ApiFault(status, fault_message(status, body))
        self.phase = TRANSITIONS[self.phase][request.kind]
        if request.path == "/boot-source":
            self._has_boot_source = True
        if request.kind is Kind.START:
            self.booted_from = "boot source"
        elif request.kind in (Kind.SNAPSHOT_LOAD, Kind.SNAPSHOT_LOAD_RESUME):
            self.booted_from = "snapshot"
        return body

    def abandon(self) -> None:
        """The prepared call got no answer (the connection failed): forget it.

        The phase stays: Firecracker may or may not have acted, and the caller
        treats the VM as broken."""
        self._pending = None
