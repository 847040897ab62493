"""The state of one VM child and the bookkeeping every part of it shares.

``Child`` (``pool/vm.py``) is one class written in layers, each in its own
module and each using only itself and the layers below it:

    vm_base.py          ChildBase: what a child holds, its lifecycle, its registry row
    vm_work.py          ChildWork: the work a guest does (promotion, cancel, workspace)
    vm_serve.py         ChildServing: serving a running VM's control channel and listeners
    vm_incarnation.py   ChildIncarnation: one VM, cold-booted, restored or adopted, and its teardown
    vm.py               Child: the child task, restarts, claims and stops
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import trio
from fireclaw.pool.backoff import RestartTracker
from fireclaw.pool.control import ControlSession
from fireclaw.pool.drivers.base import VmHandle
from fireclaw.pool.gateway_core import Who
from fireclaw.pool.lifecycle import Event, Lifecycle, State
from fireclaw.pool.runtime import Runtime
from fireclaw.pool.store import VmRecord

if TYPE_CHECKING:
    from fireclaw.pool.group import RoleGroup


@dataclass
class AgentIdentity:
    """Who a named agent is; it keeps this across restarts of its VM."""

    name: str
    model: str | None = None  # None: the role's
    persona: str | None = None


@dataclass
class Outcome:
    """How an incarnation ended."""

    code: int | None = None  # the VMM's exit code, None when unknown or killed by us
    reason: str = ""
    broke_protocol: bool = False


class ChildBase:
    """What a VM child holds; ``Child`` is the whole of it."""

    def __init__(
        self,
        name: str,
        group: RoleGroup,
        runtime: Runtime,
        *,
        now: float,
        adopt: VmRecord | None = None,
    ) -> None:
        self.name = name
        self.group = group
        self.rt = runtime
        self.lifecycle = Lifecycle(now)
        self.tracker = RestartTracker(group.role.restart, uniform=runtime.uniform)
        self.claimed = False  # handed out by the pool: no longer one of its idle VMs
        self.agent: AgentIdentity | None = None  # set: a named agent, restarted as itself
        self.stopping = False
        self.session: ControlSession | None = None
        self.handle: VmHandle | None = None
        self.restarts = 0
        self.reason = ""  # why it last crashed or failed
        self.promoted_as: str | None = None
        self.irc_endpoint: tuple[str, int] | None = None  # the IRC server, as the guest reaches it
        #: Its model gateway, as the guest reaches it (``http://host:port/v1``).
        self.model_endpoint: tuple[str, int] | None = None
        #: Whose model calls its gateway carries: promotion and task code keep it current.
        self.who = Who(vm=name, role=group.name)
        self.started_as = ""  # "restored <template>" or "booted": how the current VM began
        self.ready_seconds: float | None = None  # VMM start (or restore) to guest connected
        self.vmm_seconds = 0.0  # of a restore: until the clone runs
        self._scope = trio.CancelScope()
        self._reset = trio.Event()
        self._exited = trio.Event()  # the current incarnation's VMM has exited
        self._booting = False  # holds a token of the runtime's boot limiter
        self._workspace_in: VmHandle | None = None  # the VM a workspace was attached to
        #: A running VM a previous supervisor left, to adopt as the first incarnation.
        self._adopt = adopt
        self._row: VmRecord | None = None  # the current incarnation's registry row
        if adopt is not None:
            self.claimed = adopt.claimed
        self.done = trio.Event()  # the child task has finished

    @property
    def state(self) -> State:
        return self.lifecycle.state

    @property
    def pid(self) -> int | None:
        return self.handle.pid if self.handle is not None else None

    def _fire(self, event: Event) -> None:
        self.lifecycle.fire(event, trio.current_time())
        self.group.changed()

    def _ended_in_crash(self) -> bool:
        """Whether the incarnation that just ended crashed: it was not stopped, and
        it was not a claimed VM whose run is over."""
        return not (self.stopping or (self.claimed and self.agent is None))

    @property
    def _log_path(self) -> Path:
        return self.rt.state_dir / "logs" / f"{self.name}.log"

    def _register(self, **changes: Any) -> None:
        """Write the current incarnation's registry row: ``changes``, and what the
        child does now (claimed, as which agent, with its workspace attached)."""
        assert self._row is not None
        attached = self.handle is not None and self._workspace_in is self.handle
        self._row = msgspec.structs.replace(
            self._row,
            claimed=self.claimed,
            agent=self.agent.name if self.agent is not None else None,
            workspace=attached,
            **changes,
        )
        self.rt.store.put_vm(self._row)

    def _boot_done(self) -> None:
        if self._booting:
            self._booting = False
            self.rt.boots.release_on_behalf_of(self)
