"""Guest images: a Debian root filesystem, a PVH-bootable kernel and an initramfs.

``build_image(spec, cache_dir, progress=print)`` returns an ``Image`` whose
files a VMM boots directly (QEMU ``-M microvm``, Firecracker)::

    <cache_dir>/<key[:16]>/
        vmlinux             uncompressed ELF kernel with the Xen PVH entry note
        initramfs.cpio.gz   busybox + virtio modules; mounts /dev/vda, switch_root
        rootfs.ext4         Debian minbase + python3, the guest daemon in /opt/fireclaw
        manifest.json       the spec, every hashed input, sizes, build time

Each change of the inputs makes a new directory; ``prune_images(cache_dir,
keep_key, progress)`` removes the old ones that no process uses (``prune.py``).

In the root filesystem, /sbin/fireclaw-init is PID 1: it mounts /proc, /sys,
/dev, tmpfs on /run and /tmp (and on /root, /var/tmp, /home/agent when the root
is read-only, the default), sets the hostname and eth0 from ``fireclaw.*``
kernel arguments, runs /opt/fireclaw/bin/guest-daemon, and powers off when it
exits. The ``agent`` user (uid 1000) owns /home/agent.

Exceptions (``errors``)::

    ImageError
    ├── ToolMissing
    ├── KernelError
    └── StepFailed
"""

from .build import (
    BASE_CMDLINE,
    BUILDER_VERSION,
    DEBIAN_CLOUD,
    DEFAULT_PACKAGES,
    Image,
    ImageSpec,
    KeyInputs,
    build_image,
    default_cache_dir,
    gather_inputs,
    image_key,
    load_image,
)
from .errors import ImageError, KernelError, StepFailed, ToolMissing
from .prune import GRACE_SECONDS, Removed, prune, prune_images

__all__ = [
    "BASE_CMDLINE",
    "BUILDER_VERSION",
    "DEBIAN_CLOUD",
    "DEFAULT_PACKAGES",
    "GRACE_SECONDS",
    "Image",
    "ImageError",
    "ImageSpec",
    "KernelError",
    "KeyInputs",
    "Removed",
    "StepFailed",
    "ToolMissing",
    "build_image",
    "default_cache_dir",
    "gather_inputs",
    "image_key",
    "load_image",
    "prune",
    "prune_images",
]
