"""The supervisor's controller: the commands the API, the overseer and the
dashboard give it (status, run, tasks, scale, reset, usage, events, named
agents), answered from the fleet the process tree keeps (``daemon.py``).

A command that cannot be done raises ``ControllerError``: one line and an HTTP
status; a state disk that refuses the write is 507 (``_unwritable``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio
from fireclaw.config import Config
from fireclaw.config.cluster import fleet_nick
from fireclaw.guest_daemon import protocol as p
from fireclaw.pool.control import GuestLost
from fireclaw.pool.group import PoolError, RoleGroup
from fireclaw.pool.runs import RunEvent, run_command
from fireclaw.pool.runtime import Runtime
from fireclaw.pool.vm import Child
from fireclaw.pool.vm_base import AgentIdentity
from fireclaw.supervisor.api import ControllerError
from fireclaw.supervisor.budget import Budgets
from fireclaw.supervisor.ircd import ManagedIrcd
from fireclaw.supervisor.modelserver import ManagedModelServer
from fireclaw.supervisor.state import (
    AgentExists,
    AgentRecord,
    StateError,
    StateUnwritable,
    Store,
    TaskConflict,
    TaskNotFound,
    TaskRow,
)

log = logging.getLogger("fireclaw.supervisor")

#: The longest agent name (an IRC nick) the guest protocol accepts.
MAX_AGENT_NAME: Final = 30
#: IRC nicks, as the guest protocol accepts them.
_AGENT_NAME: Final = re.compile(r"[A-Za-z\[\]\\`_^{|}][A-Za-z0-9\[\]\\`_^{|}-]{0,29}")
#: A task by its name (``task-N``), as the events and the question name it.
_TASK_NAME: Final = re.compile(r"task-([1-9][0-9]{0,15})")
#: Waiting tasks looked through for the one an agent's name gives.
MAX_WAITING_LISTED: Final = 1000


class SupervisorController:
    """The commands of ``Supervisor`` (``daemon.py``). What they read and act on
    is the supervisor's; the declarations below name it for the type checker."""

    config: Config
    state_dir: Path
    store: Store
    rt: Runtime
    groups: dict[str, RoleGroup]
    stopping: bool
    last_reload_error: str | None
    backend_reason: str
    isolation: dict[str, object]
    budgets: Budgets
    modelserver: ManagedModelServer | None
    ircd: ManagedIrcd | None
    http_url: str | None

    if TYPE_CHECKING:

        def event(self, kind: str, subject: str, **detail: object) -> None: ...

        async def check_models(self, config: Config, extra: str | None = None) -> str | None: ...

        def hosts_status(self) -> list[dict[str, object]] | None: ...

    def _group(self, role: str) -> RoleGroup:
        group = self.groups.get(role)
        if group is None:
            raise ControllerError(
                f"no role {role!r} (roles: {', '.join(self.groups) or 'none'})", 404
            )
        return group

    def _status_line(self) -> str:
        counts = [g.counts() for g in self.groups.values()]
        idle = sum(int(c["idle"]) for c in counts)  # type: ignore[call-overload]
        active = sum(int(c["active"]) for c in counts)  # type: ignore[call-overload]
        failed = sum(int(c["failed"]) for c in counts)  # type: ignore[call-overload]
        line = f"{idle} idle, {active} active, {failed} failed"
        health = self.store.health
        if not health.writable:
            line += (
                f"; state disk {health.why}: tasks refused, {health.dropped_events} events dropped"
            )
        return line

    async def status(self, since: int | None = None, wait: float = 0.0) -> dict[str, object]:
        """The fleet; with ``since``, first wait up to ``wait`` s for a change past it."""
        if since is not None:
            with trio.move_on_after(wait):
                await self.rt.wait_change(since)
        return {
            "version": self.rt.version,
            "pid": os.getpid(),
            "config": str(self.config.path),
            "state_dir": str(self.state_dir),
            "backend": self.backend_reason,
            "isolation": self.isolation,
            "network": self._network_status(),
            "stopping": self.stopping,
            "last_reload_error": self.last_reload_error,
            "roles": {name: g.counts() for name, g in self.groups.items()},
            "agents": [a for g in self.groups.values() for a in g.snapshot()],
            "tasks": self._task_counts(),
            "state": self.store.health.status(),
            "irc": self._irc_status(),
            "models": self._models_status(),
            "http": self.http_url,
            "hosts": self.hosts_status(),
        }

    def _models_status(self) -> dict[str, object] | None:
        spec = self.config.models
        if spec is None:
            return None
        status: dict[str, object] = {"server": spec.server, "budget": self.budgets.status()}
        if self.modelserver is not None:
            status["managed"] = self.modelserver.status()
        return status

    def _task_counts(self) -> dict[str, int] | None:
        """Tasks by state; None when a failing disk cannot even be read (the
        store has logged that once; status is asked for often)."""
        try:
            return self.store.count_tasks()
        except StateUnwritable:
            return None

    def _network_status(self) -> dict[str, object] | None:
        net = self.rt.network
        if net is None:
            return None
        return {
            "bridge": net.bridge,
            "subnet": str(net.subnet),
            "gateway": net.gateway,
            "egress": net.egress,
        }

    def _irc_status(self) -> dict[str, object]:
        spec = self.config.irc
        if not spec.enabled:
            return {"enabled": False}
        host, port = self.rt.irc.upstream if self.rt.irc else spec.endpoint
        status: dict[str, object] = {"enabled": True, "server": f"{host}:{port}"}
        if self.ircd is not None:
            status["managed"] = self.ircd.status()
        return status

    def run(
        self, role: str | None, argv: list[str], user: str = ""
    ) -> AsyncGenerator[RunEvent, None]:
        """``argv`` run in a VM of ``role`` (None: the first role), as the pool's events."""
        if not argv:
            raise ControllerError("nothing to run: give a command after --")
        group = self._group(role or next(iter(self.groups), ""))
        return run_command(group, argv, user=user)

    async def submit_task(self, role: str, prompt: str) -> dict[str, object]:
        group = self._group(role)
        if not prompt.strip():
            raise ControllerError("task: the prompt is empty")
        if len(prompt) > p.MAX_PROMPT_CHARS:
            raise ControllerError(
                f"task: the prompt has {len(prompt)} characters, at most {p.MAX_PROMPT_CHARS}"
            )
        try:
            task = self.store.add_task(role, prompt)
        except StateUnwritable as exc:
            raise _unwritable(exc, "task not accepted") from None
        self.event("task_queued", f"task-{task.id}", role=role)
        group.tasks_queued()
        return _task_dict(task)

    async def answer(self, name: str, text: str) -> dict[str, object]:
        """Queue the task waiting for input that ``name`` names (``task-N``, or the
        agent that asked, when one task of it waits) again: its next run resumes
        its CLI session with ``text`` as the prompt, on whichever VM claims it."""
        if not text.strip():
            raise ControllerError("answer: the answer is empty")
        if len(text) > p.MAX_PROMPT_CHARS:
            raise ControllerError(
                f"answer: it has {len(text)} characters, at most {p.MAX_PROMPT_CHARS}"
            )
        task = self._waiting_task(name)
        try:
            row = self.store.answer_task(task.id, text)
        except StateUnwritable as exc:
            raise _unwritable(exc, f"task {task.id} not answered") from None
        except TaskNotFound as exc:
            raise ControllerError(str(exc), 404) from None
        except TaskConflict as exc:
            raise ControllerError(str(exc), 409) from None
        self.event("task_answered", f"task-{row.id}", role=row.role, asked_by=task.owner)
        group = self.groups.get(row.role)
        if group is not None:
            group.tasks_queued()
        return _task_dict(row)

    def _waiting_task(self, name: str) -> TaskRow:
        """The task ``name`` names, waiting for input; one line saying why not."""
        if (numbered := _TASK_NAME.fullmatch(name)) is not None:
            task = self.store.get_task(int(numbered[1]))
            if task is None:
                raise ControllerError(f"no task {numbered[1]}", 404)
            if task.state != "waiting_for_input":
                raise ControllerError(
                    f"task {task.id} is {task.state}, not waiting for an answer", 409
                )
            return task
        waiting = [
            t
            for t in self.store.list_tasks(state="waiting_for_input", limit=MAX_WAITING_LISTED)
            if t.owner == name
        ]
        if len(waiting) == 1:
            return waiting[0]
        if waiting:
            names = ", ".join(f"task-{t.id}" for t in sorted(waiting, key=lambda t: t.id))
            raise ControllerError(
                f"{name} has {len(waiting)} tasks waiting for an answer; name one: {names}", 409
            )
        known = name in self.groups or any(
            g.find_agent(name) is not None or name in g.children for g in self.groups.values()
        )
        if known:
            raise ControllerError(f"{name} has no task waiting for an answer", 409)
        raise ControllerError(f"no task or agent named {name!r} is waiting for an answer", 404)

    async def get_task(self, task_id: int) -> dict[str, object]:
        task = self.store.get_task(task_id)
        if task is None:
            raise ControllerError(f"no task {task_id}", 404)
        return _task_dict(task)

    async def list_tasks(self, state: str | None) -> list[dict[str, object]]:
        return [_task_dict(t) for t in self.store.list_tasks(state=state)]

    async def scale(self, role: str, n: int) -> dict[str, object]:
        if not 0 <= n <= 1000:
            raise ControllerError(f"scale: {n} is out of range (0..1000)")
        group = self._group(role)
        try:
            self.store.set_scale(role, n)
        except StateUnwritable as exc:
            raise _unwritable(exc, "scale not changed") from None
        group.set_scale(n)
        self.event("scaled", role, n=n)
        return {"role": role, "target": n}

    async def reset(self, name: str) -> dict[str, object]:
        if name in self.groups:
            return {"reset": self.groups[name].reset()}
        for group in self.groups.values():
            child = group.children.get(name)
            if child is not None:
                child.reset()
                return {"reset": 1}
        raise ControllerError(f"no role or VM named {name!r}", 404)

    async def usage(self, by: str, since: int, key: str | None) -> dict[str, object]:
        """The ledger of model calls since ``since`` summed per ``by``, and the budgets."""
        assert by in ("agent", "role", "task", "model", "vm")
        rows = self.store.usage(by=by, since=float(since), key=key)  # type: ignore[arg-type]
        return {
            "by": by,
            "since": since,
            "rows": [
                {
                    "key": r.key,
                    "calls": r.calls,
                    "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens,
                    "tokens": r.tokens,
                }
                for r in rows
            ],
            "budget": self.budgets.status(),
        }

    async def events(self, after: int, limit: int) -> list[dict[str, object]]:
        return [
            {"id": e.id, "at": e.at, "kind": e.kind, "subject": e.subject, "detail": e.detail}
            for e in self.store.events(after=after, limit=limit)
        ]

    # --- named agents (the overseer's !invoke, !destroy, !model, !persona) -------

    def _agent(self, name: str) -> tuple[RoleGroup, Child]:
        for group in self.groups.values():
            child = group.find_agent(name)
            if child is not None:
                return group, child
        raise ControllerError(f"no agent named {name!r}", 404)

    def _free_agent_name(self, group: RoleGroup) -> str:
        taken = {c.agent.name for g in self.groups.values() for c in g.children.values() if c.agent}
        n = 1
        while (name := self._auto_name(group, n)) in taken:
            n += 1
        return name

    def _auto_name(self, group: RoleGroup, n: int) -> str:
        """Replica ``n``'s nick; in a cluster with the host in it, as every host
        counts from 1 and the hosts' IRC servers are one network."""
        nick = group.role.nick(n)
        if self.config.cluster is None:
            return nick
        irc = self.config.irc
        longest = min(MAX_AGENT_NAME, irc.managed.max_nick_length) if irc.is_managed else None
        return fleet_nick(nick, self.store.host, longest or MAX_AGENT_NAME)

    async def invoke(
        self, role: str, name: str | None = None, model: str | None = None
    ) -> dict[str, object]:
        """Bring up a named agent of ``role``: it keeps its name across restarts."""
        group = self._group(role)
        name = name or self._free_agent_name(group)
        if not _AGENT_NAME.fullmatch(name):
            raise ControllerError(
                f"{name!r} is not a usable agent name (letters, digits and -_[]{{}}|^`)"
            )
        if any(g.find_agent(name) for g in self.groups.values()):
            raise ControllerError(f"an agent named {name!r} already exists", 409)
        if model is not None and self.config.models is not None:
            problem = await self.check_models(self.config, model)
            if problem is not None:
                raise ControllerError(problem)
        # Remembered first: an agent the disk cannot remember is not made. The
        # name is the table's key, so it is unique across a cluster's hosts too.
        record = AgentRecord(name=name, role=role, model=model)
        try:
            try:
                self.store.add_agent(record)
            except AgentExists as exc:
                if exc.host not in (None, self.store.host):
                    raise ControllerError(str(exc), 409) from None
                self.store.put_agent(record)  # this host's, whose restore failed: again
        except StateUnwritable as exc:
            raise _unwritable(exc, f"agent {name} not invoked") from None
        boot_timeout = self.config.control.boot_timeout
        child = None
        try:
            with trio.move_on_after(boot_timeout):
                try:
                    child = await group.invoke(AgentIdentity(name=name, model=model))
                except PoolError as exc:
                    raise ControllerError(str(exc), 503) from None
            if child is None:
                raise ControllerError(f"no {role} VM became ready within {boot_timeout:g}s", 503)
        except BaseException:
            with contextlib.suppress(StateError):
                self.store.drop_agent(name)
            raise
        return {"name": name, "role": role, "vm": child.name}

    async def destroy(self, name: str) -> dict[str, object]:
        group, child = self._agent(name)
        try:
            self.store.drop_agent(name)
        except StateUnwritable as exc:
            raise _unwritable(exc, f"agent {name} not destroyed") from None
        self.event("destroyed", name, role=group.name, vm=child.name)
        await child.stop("destroyed")
        return {"name": name, "destroyed": True}

    async def cancel(self, name: str, reason: str) -> dict[str, object]:
        """End the current turn(s) of the agent ``name`` (a named agent, or the VM
        running a task): its model streams close, its tool processes are killed,
        a task so ended fails with exit 130. The VM and the agent stay."""
        child = next(
            (c for g in self.groups.values() if (c := g.find_agent(name)) is not None), None
        )
        if child is None:
            child = next(
                (g.children[name] for g in self.groups.values() if name in g.children), None
            )
        if child is None:
            raise ControllerError(f"no agent or VM named {name!r}", 404)
        if child.promoted_as is None:
            raise ControllerError(f"{name} is not at work: it has no turn to stop", 409)
        try:
            await child.cancel_turn(reason)
        except GuestLost as exc:
            raise ControllerError(f"{name}: {exc.reason}", 409) from None
        return {"name": name, "vm": child.name, "cancelled": True}

    async def retune(
        self, name: str, *, model: str | None = None, persona: str | None = None
    ) -> dict[str, object]:
        """Give a named agent a new model or persona, without restarting its VM."""
        group, child = self._agent(name)
        assert child.agent is not None
        if model is not None and self.config.models is not None:
            problem = await self.check_models(self.config, model)
            if problem is not None:
                raise ControllerError(problem)
        agent = dataclasses.replace(
            child.agent,
            model=child.agent.model if model is None else model,
            persona=child.agent.persona if persona is None else persona,
        )
        try:
            self.store.put_agent(
                AgentRecord(name=name, role=group.name, model=agent.model, persona=agent.persona)
            )
        except StateUnwritable as exc:
            raise _unwritable(exc, f"agent {name} not changed") from None
        child.agent.model, child.agent.persona = agent.model, agent.persona
        await group.retune(child)
        self.event("retuned", name, model=agent.model, persona=agent.persona is not None)
        return {"name": name, "model": agent.model or group.role.model}

    async def _restore_agent(self, rec: AgentRecord) -> None:
        """Bring back a named agent the previous supervisor had."""
        group = self.groups.get(rec.role)
        if group is None:
            log.warning("agent %s: its role %s is gone; forgetting it", rec.name, rec.role)
            with contextlib.suppress(StateError):  # forgotten at a later start, then
                self.store.drop_agent(rec.name)
            return
        if group.find_agent(rec.name) is not None:
            return  # its VM was adopted: it is back as it was
        try:
            await group.invoke(AgentIdentity(name=rec.name, model=rec.model, persona=rec.persona))
        except PoolError as exc:
            log.warning("agent %s not restored: %s", rec.name, exc)


def _unwritable(exc: StateUnwritable, what: str) -> ControllerError:
    """The one line a request gets when the state disk refuses what it asks:
    507 Insufficient Storage; it can be tried again once the disk has room."""
    return ControllerError(f"the state disk is {exc.why}: {what} ({exc.path})", 507)


def _task_dict(task: object) -> dict[str, object]:
    import msgspec

    return msgspec.structs.asdict(task)  # type: ignore[arg-type]
