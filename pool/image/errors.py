"""What can go wrong while building a guest image.

Exceptions::

    ImageError              base; str(e) is one line a user can act on
    ├── ToolMissing         a host program the build needs is not installed
    ├── KernelError         the kernel cannot be found, unpacked or PVH-booted
    └── StepFailed          a build command failed (its last error line is kept)
"""

from __future__ import annotations


class ImageError(Exception):
    """A guest image could not be built. The message is one line."""


class ToolMissing(ImageError):
    """A host program the build needs is not installed."""


class KernelError(ImageError):
    """The kernel cannot be found, unpacked, or booted through its PVH entry."""


class StepFailed(ImageError):
    """A command the build runs exited with an error."""
