"""VMM drivers and the choice between them (``backend:`` in swarm.yaml)."""

from __future__ import annotations

from fireclaw.pool.drivers.base import Driver, DriverError, VmHandle, VmSpec
from fireclaw.pool.drivers.process import ProcessDriver

__all__ = [
    "Driver",
    "DriverError",
    "VmHandle",
    "VmSpec",
    "ProcessDriver",
    "BackendUnavailable",
    "choose",
]

#: Drivers this build can run, in the order ``auto`` tries them.
AVAILABLE = ("process",)


class BackendUnavailable(Exception):
    """The configured backend cannot run here."""


def choose(backend: str) -> tuple[Driver, str]:
    """The driver for ``backend`` and one line saying why it was picked."""
    if backend == "auto":
        return ProcessDriver(), "auto: process (the only VMM driver in this build)"
    if backend == "process":
        return ProcessDriver(), "process (configured)"
    available = ", ".join((*AVAILABLE, "auto"))
    raise BackendUnavailable(f"backend {backend!r} is not available in this build ({available})")
