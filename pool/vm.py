"""One VM child: a named slot that runs VM incarnations and restarts them per policy.

A child is one trio task. Each incarnation creates its resources (a control
listener, inside a fresh network namespace when isolation is on, with a tap
and a veth on the swarm's bridge for real VMs; a cgroup when available; its
own overlay disk for real VMs), starts the VMM through the driver (a cold
boot, or a restore from its role's snapshot template when the runtime has
templates), waits for the guest's Hello and serves the control session until
the VM ends. Inside the VM's namespace it also opens the IRC forwarder and
the model gateway (``pool/gateway.py``), whose calls it attributes to
``who``. The audit trail of the agent's work is the child's events: each model
call through its gateway (``model_call``), each tool run its guest reports
(``tool_ran``), each turn an operator cancels (``turn_cancelled``), all under
the identity the supervisor gave the VM. Whatever happens, a shielded, bounded
teardown stops the VMM (TERM, then KILL) and releases every resource the
incarnation created. A
named agent's VM also gets the agent's workspace disk before each promotion.

A child may begin with a VM a previous supervisor left running (``adopt``, its
registry row): that incarnation takes the running VMM and its resources over
instead of making new ones, listens again where its guest dials, and takes
its guest back as it is (an agent still promoted, a task still held) when
the guest's Hello says so. A VM that cannot be adopted is reclaimed like a
crashed one.

A claimed child serves one piece of work (a run, a task) and is then retired;
it is never restarted. A claimed child with an ``agent`` identity is a named,
long-lived agent: restarted per the role's policy like a pool child, and
promoted again under the same name each time its guest says hello. A pool
child is restarted per the role's policy, with backoff, until its circuit
breaker opens.

The class is written in layers, one module each (see ``pool/vm_base.py``).
"""

from __future__ import annotations

import logging

import trio
from fireclaw.pool.backoff import ExitClass, classify_exit
from fireclaw.pool.lifecycle import Event, State
from fireclaw.pool.vm_base import Outcome
from fireclaw.pool.vm_incarnation import ChildIncarnation

log = logging.getLogger("fireclaw.vm")


class Child(ChildIncarnation):
    """One VM child: a named slot of a role group, run as one trio task (``run``)."""

    # --- the child task ----------------------------------------------------------

    async def run(self) -> None:
        try:
            with self._scope:
                while True:
                    outcome = await self._incarnate()
                    if not self._ended_in_crash():
                        return
                    if self.state is not State.CRASHED:  # _teardown said so already
                        self._fire(Event.CRASH)
                    if not await self._after_crash(outcome):
                        return
        finally:
            self.session = None
            if self.lifecycle.can(Event.STOP):
                self.lifecycle.fire(Event.STOP, trio.current_time())
            if self.lifecycle.can(Event.EXIT):
                self.lifecycle.fire(Event.EXIT, trio.current_time())
            self.done.set()
            self.group.child_done(self)

    async def _after_crash(self, outcome: Outcome) -> bool:
        """Decide and wait out the restart; False when the child should end."""
        self.reason = outcome.reason
        policy = self.group.role.restart
        exit_class = (
            ExitClass.FAILURE if outcome.broke_protocol else classify_exit(outcome.code, policy)
        )
        decision = self.tracker.exited(trio.current_time(), exit_class)
        self.rt.event(
            "crashed",
            self.name,
            role=self.group.name,
            reason=outcome.reason,
            exit_code=outcome.code,
            cause=exit_class.value,
            restart=decision.restart,
            delay=round(decision.delay, 3),
            failed=decision.failed,
        )
        log.warning("%s crashed: %s", self.name, outcome.reason)
        if not decision.restart:
            self.reason = f"{outcome.reason}; not restarted: {decision.reason}"
            self._fire(Event.GIVE_UP)
            self.rt.event("failed", self.name, role=self.group.name, reason=self.reason)
            log.error("%s failed: %s", self.name, self.reason)
            await self._reset.wait()
            self._reset = trio.Event()
            self.tracker.reset()
            self._fire(Event.RESET)
            return True
        self.restarts += 1
        self.rt.store.record_restart(
            self.name,
            self.group.name,
            reason=outcome.reason,
            exit_code=outcome.code,
            delay=decision.delay,
        )
        if decision.delay > 0:
            self._fire(Event.RETRY)
            with trio.move_on_after(decision.delay):
                await self._reset.wait()  # a reset or reload cuts the wait short
            self._reset = trio.Event()
        while self.group.degraded and not self.group.stopping:
            await self.group.wait_changed()  # a degraded role pauses its restarts
        self._fire(Event.RESTART)
        return True

    def claim(self) -> None:
        """Hand this idle child out of the pool (the registry says so: a VM that
        served a run is not taken back as an idle one)."""
        self.claimed = True
        self._fire(Event.CLAIM)
        if self._row is not None:
            self._register()

    def reset(self) -> None:
        """Clear a failed child, or cut a backoff wait short."""
        self.tracker.reset()
        self._reset.set()

    async def stop(self, reason: str, *, graceful: bool = True) -> None:
        """Stop this child (ask the guest, then TERM, then KILL) and wait for it to end."""
        self.stopping = True
        if self.lifecycle.can(Event.STOP):
            self._fire(Event.STOP)
        session = self.session
        if graceful and self.rt.graceful and session is not None and self.handle is not None:
            await session.ask_stop(reason)
            with trio.move_on_after(self.rt.stop.grace_period):
                await self._exited.wait()
        self._scope.cancel()
        await self.done.wait()

    def cancel(self) -> None:
        self.stopping = True
        self._scope.cancel()

    # --- one incarnation ------------------------------------------------------------

    def snapshot(self) -> dict[str, object]:
        return {
            "name": self.name,
            "role": self.group.name,
            "state": self.state.value,
            "pid": self.pid,
            "restarts": self.restarts,
            "for": round(trio.current_time() - self.lifecycle.since, 1),
            "agent": self.agent.name if self.agent is not None else self.promoted_as,
            "model_endpoint": (
                "http://{}:{}/v1".format(*self.model_endpoint) if self.model_endpoint else None
            ),
            "reason": self.reason,
            "started_as": self.started_as,
            "ready_seconds": (
                round(self.ready_seconds, 3) if self.ready_seconds is not None else None
            ),
        }
