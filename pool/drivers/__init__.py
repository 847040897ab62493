"""VMM drivers and the choice between them (``backend:`` in swarm.yaml).

Two steps. ``choose(backend, ...)`` decides at once, without side effects,
which driver will run the VMs and says why in one line. ``open_backend`` then
makes it ready: for ``qemu`` it builds the guest image (or finds it in the
image cache: a first build takes about a minute), picks KVM or TCG with the
accelerator's cached boot probe and creates the qemu driver.

``firecracker`` needs the ``firecracker`` and ``jailer`` binaries, KVM, root
and network namespaces; ``open_backend`` then also needs an image whose kernel
Firecracker boots and a KVM that boots it (the accelerator's boot probe).
A configured ``firecracker`` that lacks any of it is refused in one line
saying which.

``auto`` picks ``firecracker`` where all that ``choose`` can see is there;
else ``qemu`` when ``qemu-system-x86_64`` is installed, we are root with
working network namespaces (every QEMU VM runs in one), and the image is
cached or can be built here; else ``process``. If the one picked then cannot
be made ready, ``auto`` falls back to the next and says why; a configured
backend fails instead.

Errors::

    BackendUnavailable      the configured backend cannot run here (one line)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

import msgspec
import trio
from fireclaw.pool.drivers.base import (
    Capability,
    Driver,
    DriverError,
    DriverInfo,
    Running,
    Unsupported,
    VmHandle,
    VmmCommandError,
    VmSpec,
)
from fireclaw.pool.drivers.process import ProcessDriver

if TYPE_CHECKING:
    from fireclaw.pool.image import Image

__all__ = [
    "ACCEL_CACHE",
    "AVAILABLE",
    "Backend",
    "BackendUnavailable",
    "Capability",
    "Choice",
    "Driver",
    "DriverError",
    "DriverInfo",
    "NotReady",
    "ProcessDriver",
    "QEMU",
    "QEMU_OVERHEAD_MIB",
    "Running",
    "Unsupported",
    "VmHandle",
    "VmSpec",
    "VmmCommandError",
    "choose",
    "describe_here",
    "open_backend",
    "why_not_firecracker",
    "why_not_qemu",
]

#: Drivers this build has, in the order ``auto`` tries them.
AVAILABLE: Final = ("firecracker", "qemu", "process")
QEMU: Final = "qemu-system-x86_64"
#: What a QEMU process needs above its guest's RAM. Measured: ~110 MiB RSS above a
#: 256 MiB guest under TCG (the translation cache, device models, slirp, QMP). A
#: cgroup limit of guest RAM alone would OOM-kill QEMU as the guest touches its
#: memory; 256 MiB of headroom covers that with room for a larger code cache.
QEMU_OVERHEAD_MIB: Final = 256
#: The accelerator's boot probe answers, in the image cache.
ACCEL_CACHE: Final = "accel.json"
#: Programs a fresh image build runs (besides Python).
_BUILD_TOOLS: Final = ("mmdebstrap", "mke2fs", "chroot", "dpkg-deb", "apt-get", "zstd")


class BackendUnavailable(Exception):
    """The configured backend cannot run here."""


@dataclass(frozen=True)
class Choice:
    """Which driver will run the VMs, before it is ready."""

    name: Literal["process", "qemu", "firecracker"]
    reason: str  # one line: why this one
    auto: bool  # picked by ``auto``: fall back to the next if it cannot be made ready

    @property
    def outlives_supervisor(self) -> bool:
        """Whether this driver's VMs go on running without the supervisor (as its
        driver's ``outlives_supervisor`` will say): only those can be adopted."""
        return self.name != "process"


@dataclass(frozen=True)
class Backend:
    """A driver ready to start VMs, and what the pool must know about it."""

    driver: Driver
    reason: str  # one line, shown by ``status``
    #: Memory the VMM needs above the guest's RAM (added to each VM's cgroup limit).
    memory_overhead_mib: int = 0
    #: The coding-agent CLIs its guest image has; None: no image (the process
    #: driver's guests run the CLIs of the host).
    clis: tuple[str, ...] | None = None


class NotReady:
    """Stands in for the driver until ``open_backend`` has made the real one."""

    name = "not-ready"
    outlives_supervisor = False

    def describe(self) -> DriverInfo:
        return DriverInfo(
            name=self.name,
            capabilities=frozenset(),
            unavailable="the VMM backend is not set up yet",
        )

    async def start(self, spec: VmSpec) -> VmHandle:
        raise DriverError(f"{spec.name}: the VMM backend is not set up yet")

    async def restore(self, spec: VmSpec, snapshot: Path) -> VmHandle:
        raise DriverError(f"{spec.name}: the VMM backend is not set up yet")

    async def adopt(self, spec: VmSpec, running: Running) -> VmHandle:
        raise DriverError(f"{spec.name}: the VMM backend is not set up yet")


def _cached_image(images: Path) -> Image | None:
    from fireclaw.pool.image import load_image

    try:
        folders = sorted(images.iterdir())
    except OSError:
        return None
    found = (load_image(f) for f in folders if f.is_dir())
    return next((image for image in found if image is not None), None)


def why_not_qemu(images: Path, netns_why: str | None) -> str | None:
    """None if qemu can run here, else one line saying why not."""
    for tool in (QEMU, "qemu-img", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if os.geteuid() != 0:
        return "not root (each QEMU VM runs in a network namespace of its own)"
    if netns_why is not None:
        return f"no network namespaces: {netns_why}"
    if _cached_image(images) is None:
        missing = [tool for tool in _BUILD_TOOLS if shutil.which(tool) is None]
        if missing:
            return f"no image in {images} and cannot build one ({', '.join(missing)} missing)"
    return None


def why_not_firecracker(netns_why: str | None) -> str | None:
    """None if firecracker could run here (before its image and KVM boot checks)."""
    from fireclaw.pool.drivers.firecracker_host import why_not_here

    why = why_not_here(shutil.which("firecracker"), shutil.which("jailer"))
    if why is None and netns_why is not None:
        return f"no network namespaces: {netns_why}"
    return why


def describe_here(images: Path, netns_why: str | None) -> list[DriverInfo]:
    """What each driver of this build says of itself on this host (its
    ``describe()``), in the order ``auto`` tries them. Nothing is built, probed
    or booted: ``doctor`` asks this.

    Each driver is made as ``open_backend`` would make it, over the guest image
    cached in ``images`` (qemu also over the accelerator its boot probe
    settled), and what ``open_backend`` checks before making it comes first in
    ``unavailable``: programs, root, network namespaces. One that needs an
    image while none is cached (a start builds it) lacks every capability
    until then."""
    from fireclaw.pool.accel import installed_version, known_accel
    from fireclaw.pool.drivers.firecracker import FirecrackerDriver
    from fireclaw.pool.drivers.qemu import QemuDriver

    image = _cached_image(images)
    version = installed_version(QEMU) if image is not None else None
    accel = (
        known_accel(image, cache_path=images / ACCEL_CACHE, version=version)
        if image is not None and version is not None
        else None
    )
    qemu: Driver | None = (
        QemuDriver(image, accel, qemu=QEMU) if image is not None and accel is not None else None
    )
    firecracker: Driver | None = (
        FirecrackerDriver(
            image,
            firecracker=shutil.which("firecracker") or "firecracker",
            jailer=shutil.which("jailer") or "jailer",
        )
        if image is not None
        else None
    )
    fc_why = why_not_firecracker(netns_why)
    return [
        _described("firecracker", firecracker, fc_why),
        _described("qemu", qemu, why_not_qemu(images, netns_why)),
        ProcessDriver().describe(),
    ]


def _described(name: str, made: Driver | None, host_why: str | None) -> DriverInfo:
    """``made.describe()`` with the host's reason first; a driver not made (no
    image yet) lacks everything."""
    if made is None:
        not_yet = "its guest image is not built and probed here yet: a start does both"
        return DriverInfo(
            name=name,
            capabilities=frozenset(),
            lacking=dict.fromkeys(Capability, not_yet),
            unavailable=host_why,
        )
    info = made.describe()
    return replace(info, unavailable=host_why or info.unavailable)


def choose(backend: str, *, images: Path, netns_why: str | None) -> Choice:
    """Which driver runs the VMs and why; ``images`` is the guest image cache.

    ``netns_why`` is ``netns.probe()``'s answer. Raises BackendUnavailable for a
    backend this build does not have."""
    if backend == "process":
        return Choice("process", "process (configured)", auto=False)
    if backend == "qemu":
        return Choice("qemu", "qemu (configured)", auto=False)
    if backend == "firecracker":
        host_lacks = why_not_firecracker(netns_why)
        if host_lacks is not None:
            raise BackendUnavailable(f"firecracker cannot run here: {host_lacks}")
        return Choice("firecracker", "firecracker (configured)", auto=False)
    if backend == "auto":
        if why_not_firecracker(netns_why) is None:
            # Whether KVM boots its guest is the boot probe's, when it is made ready.
            found = "firecracker and jailer found, KVM, root, network namespaces"
            return Choice("firecracker", f"auto: firecracker ({found})", auto=True)
        why_not = why_not_qemu(images, netns_why)
        if why_not is not None:
            return Choice("process", f"auto: process (not qemu: {why_not})", auto=True)
        cached = _cached_image(images)
        image = "an image is cached" if cached is not None else "the image can be built"
        return Choice("qemu", f"auto: qemu ({QEMU} found, root, {image})", auto=True)
    available = ", ".join((*AVAILABLE, "auto"))
    raise BackendUnavailable(f"backend {backend!r} is not available in this build ({available})")


async def open_backend(
    choice: Choice,
    *,
    images: Path,
    netns_why: str | None,
    progress: Callable[[str], None],
    clis: Sequence[str] = (),
) -> Backend:
    """Make ``choice`` ready. ``progress`` gets one line per image build step; the
    QEMU guest image is built with the coding-agent CLIs ``clis``.

    Raises BackendUnavailable (one line) when a configured ``qemu`` or
    ``firecracker`` cannot run."""
    if choice.name == "process":
        return Backend(driver=ProcessDriver(), reason=choice.reason)
    if choice.name == "firecracker":
        try:
            return await _open_firecracker(choice, images=images, progress=progress)
        except BackendUnavailable as exc:
            if not choice.auto:
                raise
            why = f"not firecracker: {exc}"
            if why_not_qemu(images, netns_why) is not None:
                return Backend(driver=ProcessDriver(), reason=f"auto: process ({why})")
            choice = Choice("qemu", f"auto: qemu ({why})", auto=True)
            try:
                opened = await _open_qemu(
                    choice, images=images, netns_why=netns_why, progress=progress, clis=clis
                )
            except BackendUnavailable as qemu_exc:
                return Backend(driver=ProcessDriver(), reason=f"auto: process (qemu: {qemu_exc})")
            return replace(opened, reason=f"{opened.reason}; {why}")
    try:
        return await _open_qemu(
            choice, images=images, netns_why=netns_why, progress=progress, clis=clis
        )
    except BackendUnavailable as exc:
        if not choice.auto:
            raise
        return Backend(driver=ProcessDriver(), reason=f"auto: process (qemu: {exc})")


async def _open_qemu(
    choice: Choice,
    *,
    images: Path,
    netns_why: str | None,
    progress: Callable[[str], None],
    clis: Sequence[str],
) -> Backend:
    from fireclaw.pool.accel import AccelError, choose_accel
    from fireclaw.pool.drivers.qemu import QemuDriver
    from fireclaw.pool.image import ImageError, ImageSpec, build_image, prune_images

    if not choice.auto:
        why_not = why_not_qemu(images, netns_why)
        if why_not is not None:
            raise BackendUnavailable(f"qemu cannot run here: {why_not}")
    spec = msgspec.convert({"clis": list(clis)}, ImageSpec)
    try:
        image = await trio.to_thread.run_sync(lambda: build_image(spec, images, progress=progress))
    except ImageError as exc:
        raise BackendUnavailable(f"guest image: {exc}") from exc
    # Each change of the guest daemon makes a new image: drop the old ones (never fails).
    await trio.to_thread.run_sync(prune_images, images, image.key, progress)
    try:
        accel = await choose_accel(image, cache_path=images / ACCEL_CACHE, qemu=QEMU)
    except AccelError as exc:
        raise BackendUnavailable(str(exc)) from exc
    running = f"qemu ({accel.name}: {accel.reason})"
    return Backend(
        driver=QemuDriver(image, accel, qemu=QEMU),
        reason=f"auto: {running}" if choice.auto else running,
        memory_overhead_mib=QEMU_OVERHEAD_MIB,
        clis=image.clis,
    )


async def _open_firecracker(
    choice: Choice, *, images: Path, progress: Callable[[str], None]
) -> Backend:
    from fireclaw.pool.drivers.firecracker_host import open_driver
    from fireclaw.pool.drivers.firecracker_jail import OVERHEAD_MIB

    try:
        driver = await open_driver(images, progress=progress, qemu=QEMU)
    except DriverError as exc:
        raise BackendUnavailable(f"firecracker cannot run here: {exc}") from exc
    # Its image is the default one: no coding-agent CLIs.
    return Backend(driver=driver, reason=choice.reason, memory_overhead_mib=OVERHEAD_MIB, clis=())
