"""The ``process`` driver: the guest daemon as a local subprocess.

No kernel of its own, so no isolation a user should trust with hostile code;
it exists for the fast path (tests, development, hosts without virtualisation)
and behaves like a VM towards everything above it. As root, each "VM" runs in
its own network namespace (via ``nsenter``) and cgroup; otherwise it shares the
host's loopback.

Its guests cannot be adopted by a restarted supervisor: a guest daemon that
is not in a VM ends when its control connection is lost (it has no VM to keep
running in), so a supervisor's crash ends them and the next start reclaims
what is left. Nor can they be paused, snapshotted or given a workspace disk:
there is no VM to hold that state (``describe`` says so, and those calls raise
``Unsupported``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Final, NoReturn

import psutil
import trio
from fireclaw.pool import cgroup
from fireclaw.pool.drivers.base import (
    Capability,
    DriverError,
    DriverInfo,
    Running,
    Snapshot,
    VmSpec,
    unsupported,
)
from fireclaw.pool.drivers.spawn import in_netns, open_log, open_vmm
from fireclaw.pool.drivers.vmm import VmmProcess

#: Host variables a guest process may see; the rest of the supervisor's environment stays out.
#: FIRECLAW_AGENT_USER names the user agent work runs as (guest_daemon/users.py).
_PASSED_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "HOME", "TMPDIR", "FIRECLAW_AGENT_USER")


#: What a guest that is a host process cannot do, and why.
_LACKING: Final = {
    Capability.SNAPSHOT: "a host process has no VM state to save or restore",
    Capability.PAUSE: "a host process has no vCPUs to stop",
    Capability.WORKSPACE: "a host process has no disks",
}


def _unsupported(capability: Capability) -> NoReturn:
    raise unsupported("process", capability, _LACKING[capability])


class ProcessVm(VmmProcess):
    """The guest daemon's process; ``kill`` also takes whatever it started (its
    descendants, and with a cgroup whatever is in it)."""

    vmm_name = "the guest process"

    @property
    def control_socket(self) -> None:
        return None

    async def kill_process(self) -> None:
        await trio.to_thread.run_sync(self._kill_tree)

    def _kill_tree(self) -> None:
        # Processes the guest started in sessions of their own are not in our process
        # group: find them as descendants first. In a cgroup none can escape at all.
        try:
            descendants = psutil.Process(self._proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        for child in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()

    def release(self) -> None:
        """Remove the agent folders the guest made in the temp dir under its VM's
        name (``guest_daemon.users.AgentDir``): a guest killed leaves them."""
        for path in Path(tempfile.gettempdir()).glob(f"fireclaw-{self._spec.vm_id}-*"):
            shutil.rmtree(path, ignore_errors=True)  # refuses a symlink: never followed

    def info(self) -> dict[str, object]:
        return {"driver": "process", "pid": self.pid, "netns": self._spec.netns}

    async def pause(self) -> None:
        _unsupported(Capability.PAUSE)

    async def resume(self) -> None:
        _unsupported(Capability.PAUSE)

    async def snapshot(self, path: Path) -> Snapshot:
        _unsupported(Capability.SNAPSHOT)

    async def attach_workspace(self, path: Path) -> None:
        _unsupported(Capability.WORKSPACE)


class ProcessDriver:
    name = "process"
    #: A guest ends with its control connection: nothing is left to adopt.
    outlives_supervisor = False

    def __init__(self, python: str = sys.executable) -> None:
        self._python = python

    def describe(self) -> DriverInfo:
        """No capabilities beyond boot, stop, kill and wait; runs everywhere."""
        return DriverInfo(
            name=self.name,
            capabilities=frozenset(),
            lacking=_LACKING,
            key_inputs={"python": self._python},
        )

    def argv(self, spec: VmSpec) -> list[str]:
        argv = list(spec.guest_command or (self._python, "-m", "fireclaw.guest_daemon"))
        return in_netns(argv, spec.netns)

    async def adopt(self, spec: VmSpec, running: Running) -> ProcessVm:
        raise DriverError(f"{spec.name}: process guests end with their connection: reclaimed")

    async def restore(self, spec: VmSpec, snapshot: Path) -> ProcessVm:
        _unsupported(Capability.SNAPSHOT)

    async def start(self, spec: VmSpec) -> ProcessVm:
        env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
        env.update(
            FIRECLAW_CONTROL_URL=spec.control_url,
            FIRECLAW_VM_ID=spec.vm_id,
            FIRECLAW_TOKEN=spec.token,
            FIRECLAW_NAME=spec.name,
            FIRECLAW_ROLE=spec.role,
        )
        log_fd = open_log(spec.log_path)
        try:
            proc = await open_vmm(self.argv(spec), log_fd=log_fd, env=env)
        except OSError as exc:
            raise DriverError(f"starting {spec.name}: {exc}") from exc
        finally:
            os.close(log_fd)
        vm = ProcessVm(proc, spec)
        if spec.cgroup is not None:
            try:
                await trio.to_thread.run_sync(cgroup.join, spec.cgroup, proc.pid)
            except BaseException as exc:
                # Cancelled or failed between spawn and hand-over: nobody else knows this
                # process yet, so it is ours to kill.
                with trio.CancelScope(shield=True):
                    await vm.kill()
                if isinstance(exc, cgroup.CgroupError):
                    raise DriverError(str(exc)) from exc
                raise
        return vm
