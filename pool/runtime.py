"""What every VM of a swarm shares: ``Runtime``, owned by the supervisor.

It holds the driver, the state store, the swarm's network, the snapshot
templates and the limits every VM child (``pool/vm.py``) runs under, and the
routes a VM's listeners lead to (``IrcRoute``; the model gateway's meter,
``AuditedMeter``, which also writes each call into the event log).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio
from fireclaw.config import ControlSpec, StopSpec
from fireclaw.pool import cgroup, disks, netns
from fireclaw.pool.drivers.base import Driver, DriverError
from fireclaw.pool.gateway_core import Meter, ModelRoute
from fireclaw.pool.network import GATEWAY, Network, NetworkError
from fireclaw.pool.store import CallRecord, StateStore

if TYPE_CHECKING:
    from fireclaw.pool.templates import Templates


#: What making a VM's resources and starting its VMM may raise: the VM did not start.
SETUP_ERRORS: Final = (
    DriverError,
    netns.NetnsError,
    NetworkError,
    disks.DiskError,
    cgroup.CgroupError,
    OSError,
)


@dataclass(frozen=True)
class IrcRoute:
    """The IRC server named agents join, and the terms they join it on."""

    upstream: tuple[str, int]  # as the supervisor reaches it
    agents_channel: str
    password: str | None = field(default=None, repr=False)  # the server's: kept out of logs
    cooldown: float = 10.0


def instance_id(state_dir: Path) -> str:
    """A short id of the supervisor owning ``state_dir``.

    It is part of every VM id, so every namespace, cgroup and guest process a
    swarm creates names the swarm it belongs to, even with several on one host."""
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:6]


@dataclass(kw_only=True)
class Runtime:
    """What every VM of the swarm shares; owned by the supervisor."""

    driver: Driver
    store: StateStore
    state_dir: Path
    control: ControlSpec
    stop: StopSpec
    isolate_net: bool
    use_cgroups: bool
    instance: str = "fc"  # instance_id(state_dir): the prefix of every VM id
    graceful: bool = True  # False after a second SIGINT: kill at once
    #: The supervisor is handing its VMs over to the next one on this state dir:
    #: a VM that can outlive it is left running, with its resources and registry row.
    leaving: bool = False
    irc: IrcRoute | None = None  # None: agents stay off IRC
    models: ModelRoute | None = None  # None: no model gateways
    #: Snapshot templates to restore pool VMs from (a driver that can snapshot);
    #: None: every VM cold-boots.
    templates: Templates | None = None
    #: Memory the VMM needs above the guest's RAM, added to each VM's cgroup limit.
    vmm_overhead_mib: int = 0
    #: The swarm's bridge (real VMs, as root): each VM's namespace gets a tap and a veth,
    #: and the supervisor's listeners there are on the tap's address.
    network: Network | None = None
    #: Where each VM's own overlay disk goes, and the image it sits on (real VMs).
    disks_dir: Path | None = None
    base_disk: Path | None = None
    #: Named agents' workspace images (a driver that can attach them); None: none.
    workspaces_dir: Path | None = None
    uniform: Callable[[float, float], float] = random.uniform  # backoff jitter
    #: VMs booting at once. Boots compete for CPU: unbounded, 200 of them all finish
    #: together after a long wait; bounded, VMs become ready one after another.
    boots: trio.CapacityLimiter = field(
        default_factory=lambda: trio.CapacityLimiter(2 * (os.cpu_count() or 1))
    )
    on_event: Callable[[str, str, dict[str, object]], None] = field(default=lambda k, s, d: None)
    #: Bumped on every state change of any VM, so watchers can wait for "something changed".
    version: int = 0
    _change: trio.Event = field(default_factory=trio.Event)

    def event(self, kind: str, subject: str, **detail: object) -> None:
        self.on_event(kind, subject, detail)

    def bump(self) -> None:
        self.version += 1
        self._change.set()
        self._change = trio.Event()

    @property
    def listen_host(self) -> str:
        """Where the supervisor's listeners in a VM's namespace are bound, and where
        its guest reaches them: the tap's address for real VMs, else loopback."""
        return GATEWAY if self.network is not None else "127.0.0.1"

    async def wait_change(self, since: int) -> None:
        """Return once ``version`` is past ``since``."""
        while self.version <= since:
            await self._change.wait()

    async def no_boots(self) -> None:
        """Return once no VM is booting or being restored (at once if none is): a
        VM's boot slot is given back as it becomes ready, or fails, and either
        changes its state (``bump``)."""
        while self.boots.borrowed_tokens:
            await self.wait_change(self.version)


@dataclass(frozen=True)
class AuditedMeter:
    """A gateway's meter that also writes each finished call into the event log:
    whose it was (as the supervisor knows it), the tokens, the time, the outcome."""

    meter: Meter
    rt: Runtime

    def refusal(self, role: str) -> str | None:
        return self.meter.refusal(role)

    def record(self, call: CallRecord) -> None:
        self.meter.record(call)
        self.rt.event(
            "model_call",
            call.agent or call.vm,
            agent=call.agent,
            role=call.role,
            vm=call.vm,
            task=call.task,
            model=call.model,
            prompt_tokens=call.prompt_tokens,
            completion_tokens=call.completion_tokens,
            duration=call.duration,
            outcome=call.outcome,
        )

    async def wait_changed(self) -> None:
        await self.meter.wait_changed()
