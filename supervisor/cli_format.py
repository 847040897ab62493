"""How the ``fireclaw-swarm`` command shows what the supervisor answered.

Pure functions from the API's JSON answers to text: a table helper, the human
views of ``status``, ``logs`` and ``usage``. Nothing here talks to the supervisor
or reads the command line; supervisor/cli_commands.py prints what they return.
Standard library only, as the command's start must stay light.
"""

from __future__ import annotations

import json
import math
import time

# Names for the type checker alone: importing ``typing`` costs a command's start
# a few milliseconds (tests/test_cli_startup.py keeps it off the run path).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from typing import Any

__all__ = [
    "PROG",
    "cell",
    "format_event",
    "format_status",
    "format_usage",
    "one_line",
    "print_json",
    "shorten",
    "summary",
    "table",
]

#: The command's name, which starts its error lines and the status header.
PROG = "fireclaw-swarm"


def one_line(text: str) -> str:
    return " ".join(text.split())


def cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return one_line(str(value))


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    cells = [list(headers)] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def print_json(value: object) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def summary(result: object) -> str:
    if isinstance(result, dict):
        return " ".join(f"{k}={json.dumps(v)}" for k, v in result.items())
    return json.dumps(result)


def format_status(status: dict[str, Any]) -> str:
    """The human view of GET /status: a header, a table of roles, in a cluster
    a table of its hosts, and a table of agents."""
    lines: list[str] = []
    head = [f"pid {status['pid']}"] if "pid" in status else []
    if status.get("backend"):
        head.append(f"backend {status['backend']}")
    if status.get("stopping"):
        head.append("stopping")
    tasks = status.get("tasks")
    if isinstance(tasks, dict) and tasks:
        head.append("tasks " + ", ".join(f"{k} {v}" for k, v in sorted(tasks.items())))
    if head:
        lines.append(f"{PROG}: " + "; ".join(head))
    net = status.get("network")
    if isinstance(net, dict):
        egress = "NAT out" if net.get("egress") else "no egress"
        lines.append(f"network: bridge {net.get('bridge')} {net.get('subnet')}, {egress}")
    isolation = status.get("isolation")
    if isinstance(isolation, dict):
        off = [
            f"{kind} off ({one_line(str(isolation.get(f'{kind}_why')))})"
            for kind in ("netns", "cgroups")
            if isolation.get(kind) is False
        ]
        if off:
            lines.append("isolation: " + "; ".join(off))
    if status.get("last_reload_error"):
        lines.append(f"last reload rejected: {one_line(str(status['last_reload_error']))}")
    models = status.get("models")
    if isinstance(models, dict):
        managed = models.get("managed")
        where = (
            f"managed {managed.get('model')} ({managed.get('state')}, {managed.get('url')})"
            if isinstance(managed, dict)
            else str(models.get("server"))
        )
        lines.append(f"models: {where}")
        budget = models.get("budget")
        scopes = budget.get("scopes") if isinstance(budget, dict) else None
        for scope, b in (scopes or {}).items():
            if isinstance(b, dict):
                spent = "  SPENT: calls refused, tasks wait" if b.get("exhausted") else ""
                lines.append(
                    f"budget {scope}: {b.get('spent')} of {b.get('limit')} tokens"
                    f" this {budget.get('period')}{spent}"  # type: ignore[union-attr]
                )
    disk = status.get("state")
    if isinstance(disk, dict) and disk.get("writable") is False:
        since = time.strftime("%H:%M:%S", time.localtime(float(disk.get("since") or 0)))
        waiting, dropped = disk.get("pending_writes"), disk.get("dropped_events")
        lines.append(
            f"state disk {disk.get('why')} since {since}: tasks refused,"
            f" {waiting} task writes waiting, {dropped} events dropped"
        )

    roles = status.get("roles") or {}
    if isinstance(roles, list):
        roles = {str(r.get("name", "?")): r for r in roles if isinstance(r, dict)}
    if isinstance(roles, dict) and roles:
        lines.append("")
        lines.append(
            table(
                ["ROLE", "IDLE", "ACTIVE", "FAILED", "DEGRADED"],
                (
                    [name, r.get("idle"), r.get("active"), r.get("failed"), r.get("degraded")]
                    for name, r in roles.items()
                    if isinstance(r, dict)
                ),
            )
        )
    if isinstance(roles, dict):
        lines += _account_lines(roles)
    hosts = status.get("hosts")
    if isinstance(hosts, list) and hosts:
        lines.append("")
        lines.append(table(["HOST", "STATE", "ROLES (ACTIVE/TARGET)", "TASKS", "HEARTBEAT"], (
            [
                h.get("name"),
                h.get("state"),
                ", ".join(
                    f"{name} {r.get('active')}/{r.get('target')}"
                    for name, r in (h.get("roles") or {}).items()
                    if isinstance(r, dict)
                ) or "-",
                h.get("tasks"),
                f"{h.get('heartbeat_age')} s ago",
            ]
            for h in hosts
            if isinstance(h, dict)
        )))  # fmt: skip
    agents = status.get("agents") or []
    if isinstance(agents, list) and agents:
        lines.append("")
        lines.append(
            table(
                ["VM", "ROLE", "STATE", "PID", "RESTARTS", "AGENT"],
                (
                    [
                        a.get("name"),
                        a.get("role"),
                        a.get("state"),
                        a.get("pid"),
                        a.get("restarts"),
                        a.get("agent"),
                    ]
                    for a in agents
                    if isinstance(a, dict)
                ),
            )
        )
    return "\n".join(lines).strip("\n") or "(empty status)"


def _account_lines(roles: dict[str, Any]) -> list[str]:
    """Under the roles: each role's accounts that rest and until when, and whether
    its tasks wait for one."""
    lines: list[str] = []
    for name, r in roles.items():
        if not isinstance(r, dict) or not r.get("accounts"):
            continue
        resting = r.get("accounts_resting")
        for account, until in resting.items() if isinstance(resting, dict) else ():
            lines.append(f"account {name}/{account}: resting until {_clock(until)}")
        waiting = r.get("waiting_for_account")
        if waiting is not None:
            lines.append(f"tasks of {name} wait for an account until {_clock(waiting)}")
    return [""] + lines if lines else []


def _clock(at: object) -> str:
    if not isinstance(at, int | float) or isinstance(at, bool) or not math.isfinite(at):
        return "its budget period ends"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def shorten(text: str, width: int) -> str:
    text = one_line(text)
    return text if len(text) <= width else text[: width - 3] + "..."


def format_event(event: dict[str, Any]) -> str:
    """One event as a log line: ``id time kind subject key=value...``."""
    at = event.get("at")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
        if isinstance(at, int | float) and not isinstance(at, bool)
        else cell(at)
    )
    detail = event.get("detail")
    parts = [str(event.get("id", "?")), when, cell(event.get("kind")), cell(event.get("subject"))]
    if isinstance(detail, dict):
        parts += [
            f"{k}={v if isinstance(v, str) and v.isprintable() and ' ' not in v else json.dumps(v)}"
            for k, v in detail.items()
        ]
    return one_line(" ".join(parts))


def format_usage(answer: dict[str, Any]) -> str:
    """The human view of GET /usage: one row per key, then the budgets."""
    rows = [r for r in answer.get("rows") or [] if isinstance(r, dict)]
    by = str(answer.get("by", "agent"))
    lines = []
    if rows:
        lines.append(
            table(
                [by.upper(), "CALLS", "PROMPT", "COMPLETION", "TOKENS"],
                (
                    [
                        r.get("key") if r.get("key") is not None else "-",
                        r.get("calls"),
                        r.get("prompt_tokens"),
                        r.get("completion_tokens"),
                        r.get("tokens"),
                    ]
                    for r in rows
                ),
            )
        )
    else:
        lines.append("no model calls")
    budget = answer.get("budget")
    if isinstance(budget, dict):
        for scope, b in (budget.get("scopes") or {}).items():
            if isinstance(b, dict):
                state = "  SPENT: calls refused" if b.get("exhausted") else ""
                lines.append(
                    f"budget {scope}: {b.get('spent')} of {b.get('limit')} tokens"
                    f" this {budget.get('period')}{state}"
                )
    return "\n".join(lines)
