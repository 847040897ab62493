"""The work a VM child's guest does for whoever claimed it: promotion to an
agent, cancelling its turn, the audit trail of its tool runs, and a named
agent's workspace disk."""

from __future__ import annotations

import logging

import msgspec
from fireclaw.guest_daemon import protocol as p
from fireclaw.pool import workspaces
from fireclaw.pool.control import GuestLost
from fireclaw.pool.drivers.base import WORKSPACE_BYTES, Capability, DriverError
from fireclaw.pool.lifecycle import Event
from fireclaw.pool.vm_base import ChildBase

log = logging.getLogger("fireclaw.vm")


class ChildWork(ChildBase):
    """A child's work, once its guest is connected (``session``)."""

    async def promote(self, msg: p.Promote) -> None:
        if self.session is None:
            raise GuestLost(f"{self.name} has no guest connected")
        self._fire(Event.PROMOTE)
        if await self._attach_workspace(isinstance(msg.harness, p.CliHarness)):
            msg = msgspec.structs.replace(msg, workspace=True)
        self.who.agent, self.who.model = msg.name, msg.model
        await self.session.promote(msg)
        self.promoted_as = msg.name
        self._fire(Event.PROMOTED)
        self._register()  # a later supervisor adopts it as this agent

    async def cancel_turn(self, reason: str) -> None:
        """End the current turn(s) of this VM's agent (``Cancel``), and record it.

        GuestLost if no guest is connected."""
        if self.session is None:
            raise GuestLost(f"{self.name} has no guest connected")
        await self.session.cancel(reason)
        self._audit("turn_cancelled", self.who.task, reason=reason)

    def _tool_ran(self, msg: p.ToolRan) -> None:
        """One tool run of the agent, for the audit trail. Who ran it is this VM's
        agent; only what ran and how comes from the guest (checked by the session)."""
        self._audit(
            "tool_ran",
            msg.task_id or None,
            tool=msg.tool,
            arguments=msg.arguments,
            exit_code=msg.code,
            duration=round(msg.duration, 3),
            output=msg.output,
            truncated=msg.truncated,
        )

    def _audit(self, kind: str, task: int | None, **detail: object) -> None:
        """An event of the agent's audit trail, under the identity the supervisor gave
        this VM (its agent's name, else the VM's)."""
        self.rt.event(
            kind,
            self.promoted_as or self.name,
            agent=self.promoted_as,
            role=self.group.name,
            vm=self.name,
            task=task,
            **detail,
        )

    async def _attach_workspace(self, cli: bool) -> bool:
        """Give a named agent's VM its workspace disk, or a VM running a task with a
        CLI (``cli``) the task's (``workspaces.for_work``), once per VM; True if
        it has it.

        Without one (a driver that cannot attach one, or it could not be
        attached) the agent works without: that is logged and evented, not fatal."""
        handle, directory = self.handle, self.rt.workspaces_dir
        if directory is None or handle is None:
            return False
        agent = self.agent.name if self.agent is not None else None
        work = workspaces.for_work(directory, agent=agent, task=self.who.task, cli=cli)
        if work is None:
            return False
        directory, owner = work
        if not self.rt.driver.describe().can(Capability.WORKSPACE):
            return False
        if self._workspace_in is handle:
            return True
        try:
            path = await workspaces.ensure(directory, owner, WORKSPACE_BYTES)
            await handle.attach_workspace(path)
        except (workspaces.WorkspaceError, DriverError) as exc:
            log.warning("%s: no workspace for %s: %s", self.name, owner, exc)
            self.rt.event("workspace_failed", owner, vm=self.name, reason=str(exc))
            return False
        self._workspace_in = handle
        return True
