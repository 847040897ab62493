"""What a host and a guest image need for the ``firecracker`` backend, and opening it.

``why_not_here`` only looks (binaries, KVM, root) and is what ``choose`` and
``doctor`` ask; ``open_driver`` also builds or finds the guest image, checks
that its kernel can be booted by Firecracker, and that this host's KVM boots
it at all (the accelerator's real boot probe), before the driver is made.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Final

import msgspec
import trio
from fireclaw.pool.accel import KVM_DEVICE, AccelError, choose_accel
from fireclaw.pool.drivers import ACCEL_CACHE
from fireclaw.pool.drivers.base import DriverError
from fireclaw.pool.drivers.firecracker import FirecrackerDriver
from fireclaw.pool.image import Image, ImageError, ImageSpec, build_image


class _ImageModules(msgspec.Struct, frozen=True):
    """What an image's ``manifest.json`` says of its kernel modules (the rest unread)."""

    modules: tuple[str, ...] = ()


_manifest_decoder: Final = msgspec.json.Decoder(_ImageModules)


def why_not_here(firecracker: str | None, jailer: str | None) -> str | None:
    """None if this host could run Firecracker, else one line saying why not.

    Whether its KVM boots the guest is a separate, slower question
    (``pool.accel``'s boot probe); this one only looks."""
    if firecracker is None:
        return "firecracker is not installed"
    if jailer is None:
        return "jailer (Firecracker's) is not installed"
    if not KVM_DEVICE.exists():
        return f"no KVM ({KVM_DEVICE} does not exist)"
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return f"no read/write access to {KVM_DEVICE}"
    if os.geteuid() != 0:
        return "not root (the jailer needs root to make each VM's chroot)"
    return None


def why_image_unfit(image: Image) -> str | None:
    """What ``image`` lacks for Firecracker, or None when nothing is known to be
    missing (a kernel's config is not in the image: one with its virtio drivers
    built in is taken to name its devices from the command line)."""
    try:
        manifest = _manifest_decoder.decode((image.directory / "manifest.json").read_bytes())
    except (OSError, msgspec.DecodeError) as exc:
        return f"image {image.directory}: no readable manifest ({exc})"
    if any(name.startswith("virtio_mmio") for name in manifest.modules):
        return (
            "the image's kernel has virtio_mmio as a module; Firecracker needs it built in"
            " with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y"
        )
    return None


async def open_driver(
    images: Path, *, progress: Callable[[str], None], qemu: str
) -> FirecrackerDriver:
    """A driver for the guest image (built or cached in ``images``), once it is
    known that Firecracker boots it here; else DriverError saying which check failed.

    Whether KVM boots the guest is decided by the accelerator's real boot probe
    (QEMU under KVM, cached): a KVM that cannot boot it under QEMU does not
    under Firecracker either, and "KVM opens" proves nothing (see pool.accel)."""
    firecracker, jailer = shutil.which("firecracker"), shutil.which("jailer")
    why = why_not_here(firecracker, jailer)
    if why is not None or firecracker is None or jailer is None:
        raise DriverError(why or "firecracker is not installed")
    try:
        image = await trio.to_thread.run_sync(
            lambda: build_image(ImageSpec(), images, progress=progress)
        )
    except ImageError as exc:
        raise DriverError(f"guest image: {exc}") from exc
    unfit = why_image_unfit(image)
    if unfit is not None:
        raise DriverError(unfit)
    if shutil.which(qemu) is None:
        raise DriverError(f"cannot tell whether KVM boots the guest: its boot probe needs {qemu}")
    try:
        accel = await choose_accel(image, cache_path=images / ACCEL_CACHE, qemu=qemu)
    except AccelError as exc:
        raise DriverError(str(exc)) from exc
    if accel.name != "kvm":
        raise DriverError(f"KVM does not boot the guest kernel ({accel.reason})")
    return FirecrackerDriver(image, firecracker=firecracker, jailer=jailer)
