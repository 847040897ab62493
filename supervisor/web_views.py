"""What the HTTP listener shows of the fleet: its views, and the stream of them.

``fleet_view`` is the fleet as the dashboard and ``/v1`` see it: the roles and
agents of the controller's status with what the config says of them, and
nothing secret (no paths, no endpoints, no tokens). ``views`` is the
server-sent event stream of ``/v1/stream``: a view with the task queue and the
newest events at once, then one after every change, at most one per
``STREAM_MIN_INTERVAL``. supervisor/webapp.py serves both.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final, Protocol

import msgspec
import trio
from fireclaw.config import Config
from fireclaw.supervisor.api import Controller
from fireclaw.supervisor.overseer import Overseer

__all__ = [
    "MAX_EVENTS_LIMIT",
    "STREAM_KEEPALIVE",
    "STREAM_MIN_INTERVAL",
    "Fleet",
    "fleet_view",
    "task_line",
    "views",
]

#: The dashboard gets at most one fresh view per this many seconds, however busy the fleet.
STREAM_MIN_INTERVAL: Final = 0.5
#: A stream with nothing new still says something this often, so proxies keep it.
STREAM_KEEPALIVE: Final = 15.0
#: Tasks and events a view carries.
VIEW_TASKS: Final = 100
VIEW_EVENTS: Final = 50
VIEW_PROMPT_CHARS: Final = 200
#: Most events one read of the audit trail asks for.
MAX_EVENTS_LIMIT: Final = 1000


class Fleet(Controller, Protocol):
    """What the listener reads and acts on: the controller, the config, the audit trail."""

    config: Config
    overseer: Overseer | None

    def event(self, kind: str, subject: str, **detail: object) -> None: ...

    def watch(self) -> trio.MemoryReceiveChannel[tuple[str, str, dict[str, object]]]: ...


def task_line(task: Mapping[str, Any]) -> dict[str, Any]:
    """A task as the dashboard lists it: no result, the prompt cut short, so a
    view stays small however much the agents wrote."""
    prompt = str(task.get("prompt") or "")
    return {
        "id": task.get("id"),
        "role": task.get("role"),
        "state": task.get("state"),
        "attempts": task.get("attempts"),
        "owner": task.get("owner"),
        "prompt": prompt if len(prompt) <= VIEW_PROMPT_CHARS else prompt[:VIEW_PROMPT_CHARS] + "…",
    }


def fleet_view(status: Mapping[str, Any], config: Config) -> dict[str, Any]:
    """The roles and agents of ``status`` with what the config says of them
    (memory, vCPUs, model), and nothing secret: no paths, no endpoints."""
    roles: dict[str, Any] = {}
    for name, counts in dict(status.get("roles") or {}).items():
        role = config.roles.get(name)
        roles[name] = {
            **counts,
            "description": role.description if role else "",
            "model": role.model if role else None,
            "memory_mib": role.resources.memory_mib if role else None,
            "vcpus": role.resources.vcpus if role else None,
        }
    agents = []
    for a in status.get("agents") or []:
        role = config.roles.get(str(a.get("role")))
        agents.append(
            {
                "name": a.get("name"),
                "role": a.get("role"),
                "state": a.get("state"),
                "agent": a.get("agent"),
                "uptime": a.get("for"),
                "restarts": a.get("restarts"),
                "backend": status.get("backend"),
                "memory_mib": role.resources.memory_mib if role else None,
                "reason": a.get("reason"),
                "started_as": a.get("started_as"),
            }
        )
    models = status.get("models") or {}
    return {
        "version": status.get("version"),
        "backend": status.get("backend"),
        "stopping": status.get("stopping"),
        "roles": roles,
        "agents": agents,
        "tasks": status.get("tasks"),
        "budget": models.get("budget") if isinstance(models, dict) else None,
        "irc": {"enabled": bool((status.get("irc") or {}).get("enabled"))},
    }


async def views(fleet: Fleet) -> AsyncIterator[bytes]:
    """Server-sent events: a ``view`` (fleet, queue, newest events) at once and
    after every change, at most one per ``STREAM_MIN_INTERVAL``; a keepalive
    comment when nothing changed for ``STREAM_KEEPALIVE``. Endless."""
    version: int | None = None
    recent: deque[dict[str, object]] = deque(maxlen=VIEW_EVENTS)
    last_id = max(0, await _last_event_id(fleet) - VIEW_EVENTS)
    while True:
        if version is None:
            status = await fleet.status()
        else:
            status = await fleet.status(version, STREAM_KEEPALIVE)
        if status["version"] == version:
            yield b": keepalive\n\n"
            continue
        version = int(status["version"])  # type: ignore[call-overload]
        view = fleet_view(status, fleet.config)
        tasks = (await fleet.list_tasks(None))[:VIEW_TASKS]
        view["queue"] = [task_line(t) for t in tasks]
        for event in await fleet.events(last_id, MAX_EVENTS_LIMIT):
            recent.append(event)
            last_id = int(event["id"])  # type: ignore[call-overload]
        view["events"] = list(recent)
        yield b"event: view\ndata: " + msgspec.json.encode(view) + b"\n\n"
        await trio.sleep(STREAM_MIN_INTERVAL)


async def _last_event_id(fleet: Fleet) -> int:
    """The newest event's id (0: none). The store pages oldest first, so this
    probes ids exponentially, then bisects: a few indexed queries."""
    lo, hi = 0, 1
    while await fleet.events(hi - 1, 1):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if await fleet.events(mid - 1, 1):
            lo = mid
        else:
            hi = mid
    return lo
