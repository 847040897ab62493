"""A VMM process the pool owns: what every driver's VM object shares.

Each VM is one process: our child (``trio.Process``, started by
``spawn.open_vmm`` in a session of its own), or one a previous supervisor
started that we adopted (``adopted.AdoptedProcess``, watched through a
pidfd). ``VmmProcess`` waits for it, signals it (its process group when it is
our child; the process itself, through its pidfd, when adopted, so never a
later process given the same pid), kills it with its cgroup, and once it has
exited removes what the driver made for it (``release``). ``while_running``
bounds a conversation with the VMM by its life: the VMM exiting mid-way
raises ``VmmExited`` at once instead of leaving the caller waiting on a socket
nobody answers.

Errors::

    VmmExited       the VMM exited during a ``while_running`` call
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Awaitable, Callable
from typing import ClassVar, TypeVar

import trio
from fireclaw.pool import cgroup
from fireclaw.pool.drivers.adopted import AdoptedProcess
from fireclaw.pool.drivers.base import Unsupported, VmSpec

T = TypeVar("T")


class VmmExited(Exception):
    """The VMM exited while we were talking to it."""


class VmmProcess:
    """One VMM process and the VM ``spec`` it runs. ``wait``/``kill`` reap it and
    then ``release`` what the driver made for it; subclasses say what that is."""

    #: How the VMM is named to a person ("QEMU", "Firecracker").
    vmm_name: ClassVar[str] = "the VMM"

    def __init__(self, proc: trio.Process | AdoptedProcess, spec: VmSpec) -> None:
        self._proc = proc
        self._spec = spec

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def adopted(self) -> bool:
        """Started by a previous supervisor: not our child."""
        return isinstance(self._proc, AdoptedProcess)

    def gone(self) -> bool:
        """Whether the process is known to have exited."""
        if isinstance(self._proc, AdoptedProcess):
            return self._proc.exited
        return self._proc.returncode is not None

    async def wait(self) -> int | None:
        code = await self._proc.wait()
        if isinstance(self._proc, AdoptedProcess):
            self._proc.close()
        await trio.to_thread.run_sync(self.release)
        return code

    def release(self) -> None:
        """Remove what the driver made for this VM; called (in a thread) once it
        has exited, perhaps more than once."""

    def terminate(self) -> None:
        self.signal(signal.SIGTERM)

    async def kill(self) -> None:
        if not self.gone():
            await self.kill_process()
        if self._spec.cgroup is not None:
            # Also once the VMM has exited by itself: what it started may live on
            # in its cgroup (having left its session, so no signal to the group
            # reached it).
            await trio.to_thread.run_sync(cgroup.kill_all, self._spec.cgroup)
        await self.wait()

    async def kill_process(self) -> None:
        """SIGKILL to the VMM (its group, when it is our child)."""
        # The signal from the event loop: trio's process handle (its returncode, its
        # pidfd) is not to be touched from a worker thread.
        self.signal(signal.SIGKILL)

    def signal(self, sig: signal.Signals) -> None:
        """``sig`` to the VMM's process group, or to an adopted VMM itself (VMMs
        start no processes of their own; the cgroup takes any that are there)."""
        if isinstance(self._proc, AdoptedProcess):
            self._proc.send_signal(sig)
        elif self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, sig)

    async def open_channel(self) -> trio.abc.Stream:
        """Unsupported unless the driver offers a channel device (its guest dials)."""
        raise Unsupported(f"{self._spec.name}: its guest dials the supervisor; no channel device")

    def exit_text(self) -> str:
        """How the VMM ended, or that it runs."""
        code = self._proc.returncode
        if code is not None:
            return f"{self.vmm_name} exited with code {code}"
        if self.gone():
            return f"{self.vmm_name} exited (its exit status is unknowable: it was adopted)"
        return f"{self.vmm_name} is running"

    async def while_running(self, fn: Callable[[], Awaitable[T]]) -> T:
        """``fn()``, unless the VMM exits first: then ``VmmExited``, also when ``fn``
        failed because the VMM went away under it."""
        result: list[T] = []
        error: Exception | None = None
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                await self._proc.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            try:
                result.append(await fn())
            except Exception as exc:  # carried out by hand: the nursery would wrap it
                error = exc
            nursery.cancel_scope.cancel()
        if result:
            return result[0]
        if self.gone():
            raise VmmExited
        assert error is not None  # an outside cancel propagates out of the nursery instead
        raise error
