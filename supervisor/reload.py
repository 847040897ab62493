"""Reloading ``swarm.yaml`` (SIGHUP, ``reload``, ``!reload``): one at a time;
requests arriving meanwhile collapse into one more run. A file that does not
load, names a model the server does not serve, or a CLI harness the guest
image lacks or a secret that cannot be read, changes nothing and is
reported; otherwise only the difference is applied: roles added, removed,
rescaled, rolled or hot-reloaded.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import msgspec
import trio
from fireclaw.config import Config, ConfigError, diff_config, load_config
from fireclaw.config.cluster import ClusterFlags
from fireclaw.pool.group import RoleGroup
from fireclaw.pool.runtime import Runtime
from fireclaw.supervisor import sdnotify
from fireclaw.supervisor.budget import Budgets
from fireclaw.supervisor.state import StateError, Store

log = logging.getLogger("fireclaw.supervisor")


class Reloads:
    """The reload of ``Supervisor`` (``daemon.py``). What it reads and changes
    is the supervisor's; the declarations below name it for the type checker."""

    config: Config
    store: Store
    rt: Runtime
    groups: dict[str, RoleGroup]
    budgets: Budgets
    last_reload_error: str | None
    cluster_flags: ClusterFlags | None
    _root: trio.Nursery | None
    _reload_wanted: trio.Event
    _reload_done: trio.Event
    _reload_result: dict[str, object]

    if TYPE_CHECKING:

        def event(self, kind: str, subject: str, **detail: object) -> None: ...

        async def check_models(self, config: Config, extra: str | None = None) -> str | None: ...

        def harness_problem(self, config: Config) -> str | None: ...

        async def _start_group(self, name: str) -> RoleGroup: ...

        def _status_line(self) -> str: ...

    def request_reload(self) -> None:
        self._reload_wanted.set()

    async def _reloader(self) -> None:
        # One reload at a time; signals arriving meanwhile collapse into one more run.
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted = trio.Event()
            done, self._reload_done = self._reload_done, trio.Event()
            self._reload_result = await self._apply_reload()
            done.set()

    async def _apply_reload(self) -> dict[str, object]:
        sdnotify.reloading()
        try:
            new = load_config(self.config.path)
            if self.cluster_flags is not None:  # up --cluster: the command line's
                new = msgspec.structs.replace(new, cluster=self.cluster_flags.spec(new.cluster))
        except (ConfigError, ValueError) as exc:  # ValueError: the flags on the file's section
            self.last_reload_error = str(exc)
            log.error("reload rejected: %s", exc)
            self.event("reload_rejected", "supervisor", error=str(exc))
            sdnotify.ready(f"reload rejected: {exc}")
            return {"ok": False, "error": str(exc)}
        problem = await self.check_models(new) if new.models == self.config.models else None
        problem = problem or self.harness_problem(new)
        if problem is not None:
            self.last_reload_error = problem
            log.error("reload rejected: %s", problem)
            self.event("reload_rejected", "supervisor", error=problem)
            sdnotify.ready(f"reload rejected: {problem}")
            return {"ok": False, "error": problem}
        diff = diff_config(self.config, new)
        notes: list[str] = []
        if new.models != self.config.models:
            notes.append("models changes take effect at the next start")
        if new.cluster != self.config.cluster:
            notes.append("cluster changes take effect at the next start")
        if diff.backend_changed:
            notes.append("backend changes take effect at the next start")
        if diff.state_dir_changed:
            notes.append("state_dir changes take effect at the next start")
        if diff.irc_changed:
            notes.append("irc changes take effect at the next start")
        if diff.network_changed:
            notes.append("network changes take effect at the next start")
        if new.http != self.config.http:
            notes.append("http changes take effect at the next start")
        old, self.config = self.config, new
        self.rt.control, self.rt.stop = new.control, new.stop
        self.budgets.update(new.budget)
        assert self._root is not None
        for name in diff.removed:
            self._clear_scale(name)  # a role added again later starts from its file
            group = self.groups.get(name)
            if group is not None:
                self._root.start_soon(group.stop_all, "role removed")
            if self.rt.templates is not None:
                self.rt.templates.forget(name)  # its template is not tried or kept for it
        for name in diff.added:
            await self._start_group(name)
        for name, change in diff.changed.items():
            group = self.groups[name]
            group.update(new.roles[name])
            if change.scale and old.roles[name].pool != new.roles[name].pool:
                self._clear_scale(name)
                group.set_scale(None)
            if change.restart_policy:
                group.reset()
            if change.replace:
                self._root.start_soon(group.roll)
            elif change.hot:
                self._root.start_soon(group.hot_reload)
        self.last_reload_error = None
        self.event(
            "reloaded",
            "supervisor",
            added=list(diff.added),
            removed=list(diff.removed),
            changed=sorted(diff.changed),
        )
        log.info(
            "reloaded: added %s, removed %s, changed %s",
            list(diff.added),
            list(diff.removed),
            sorted(diff.changed),
        )
        sdnotify.ready(self._status_line())
        return {
            "ok": True,
            "error": None,
            "added": list(diff.added),
            "removed": list(diff.removed),
            "changed": sorted(diff.changed),
            "notes": notes,
        }

    def _clear_scale(self, role: str) -> None:
        """Forget a scale override; kept when the state disk refuses (the file's
        scale applies now; the override comes back at the next start)."""
        try:
            self.store.clear_scale(role)
        except StateError as exc:
            log.warning("scale override of %s not cleared: %s", role, exc)

    async def reload(self) -> dict[str, object]:
        """Reload as SIGHUP does, and return what that reload did (or why it was
        rejected); a reload already running is followed by one more."""
        done = self._reload_done
        self.request_reload()
        await done.wait()
        return self._reload_result
