"""The rules of operating a fleet, sans-I/O: what state a host is in, where a
new named agent goes, and how ``!fleet`` and ``status`` show the hosts.

A host's state, from its row in the hosts table (its last heartbeat's age,
by the database's clock, and the drain flag)::

    fenced    silent past cluster.silent_after: presumed dead; its tasks are
              requeued and whatever it might still write is fenced off
    silent    missed its heartbeats (older than ``late``), not yet presumed dead
    draining  told to drain: it claims nothing and keeps no warm VMs
    up        none of these

Placement of a new named agent of a role: among the hosts that are ``up`` and
run that role, the least loaded, that is with the fewest VMs of the role at
work; a tie goes to the name that sorts first, so that every host would make
the same choice. The load a host's heartbeat reported is a few seconds old, so
it counts at least the named agents the agents table already places there:
two agents placed back to back do not both land on one host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from fireclaw.supervisor.state_registry import HostRow

HostState = Literal["up", "draining", "silent", "fenced"]


def host_state(row: HostRow, *, late: float, silent_after: float) -> HostState:
    """What ``row``'s host is now (the module docstring's table)."""
    if row.age > silent_after:
        return "fenced"
    if row.age > late:
        return "silent"
    return "draining" if row.draining else "up"


class NoRoom(Exception):
    """No host can take the agent; the message is the one line saying why."""


def place(
    rows: Sequence[HostRow],
    role: str,
    *,
    placed: Mapping[str, int],
    late: float,
    silent_after: float,
) -> str:
    """The host a new named agent of ``role`` goes to. ``placed``: named agents
    of the role the agents table has on each host. Raises ``NoRoom``."""
    running = [r for r in rows if role in r.load.roles]
    if not running:
        raise NoRoom(f"no host runs the role {role}")
    ready = [r for r in running if host_state(r, late=late, silent_after=silent_after) == "up"]
    if not ready:
        shown = ", ".join(
            f"{r.name} {host_state(r, late=late, silent_after=silent_after)}" for r in running
        )
        raise NoRoom(f"no host of role {role} can take an agent now ({shown})")

    def load(row: HostRow) -> tuple[int, str]:
        return max(row.load.roles[role].active, placed.get(row.name, 0)), row.name

    return min(ready, key=load).name


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{max(seconds, 0):.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h"


def fleet_line(row: HostRow, *, late: float, silent_after: float) -> str:
    """One host for ``!fleet``: name, state, each role's load (at work/warm
    target), its running tasks and the age of its last heartbeat."""
    state = host_state(row, late=late, silent_after=silent_after)
    roles = ", ".join(
        f"{name} {load.active}/{load.target}" for name, load in sorted(row.load.roles.items())
    )
    tasks = "1 task" if row.load.tasks == 1 else f"{row.load.tasks} tasks"
    return (
        f"{row.name}: {state}; roles {roles or 'none'} (active/target); {tasks} running;"
        f" heartbeat {_age(row.age)} ago"
    )


def host_status(row: HostRow, *, late: float, silent_after: float) -> dict[str, object]:
    """One host for ``status`` and the API."""
    return {
        "name": row.name,
        "state": host_state(row, late=late, silent_after=silent_after),
        "draining": row.draining,
        "roles": {
            name: {"active": load.active, "target": load.target}
            for name, load in sorted(row.load.roles.items())
        },
        "tasks": row.load.tasks,
        "heartbeat_age": round(row.age, 1),
    }
