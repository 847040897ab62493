"""The ``fireclaw-swarm`` command.

::

    fireclaw-swarm up [--config PATH] [--state-dir DIR]   run the supervisor in the foreground
    fireclaw-swarm status [--json]                       roles and agents
    fireclaw-swarm run [--role R] -- CMD...              run CMD in a pooled VM, stream its output
    fireclaw-swarm task ROLE PROMPT [--wait]             queue a task, print its id (or result)
    fireclaw-swarm tasks [--state S] [--json]            list tasks
    fireclaw-swarm scale ROLE N                          set the number of VMs of a role
    fireclaw-swarm reset NAME                            clear the failed state of a VM or role
    fireclaw-swarm reload                                re-read the config file
    fireclaw-swarm down                                  stop the supervisor and its VMs
    fireclaw-swarm stop NAME                             end what an agent is doing now
    fireclaw-swarm logs [--follow] [--agent NAME] [--json]  the event log (the audit trail)
    fireclaw-swarm doctor [--config PATH]                what the host offers; what swarms left
    fireclaw-swarm gc [--all]                            remove what a dead swarm left behind
    fireclaw-swarm version

Every command but ``up``, ``doctor``, ``gc`` and ``version`` talks to the running
supervisor through its API socket, ``<state_dir>/api.sock``. The state dir is
``--state-dir``, else ``$FIRECLAW_STATE_DIR``, else the ``state_dir`` of the
config file (``--config``, default ``./swarm.yaml``); the config is only read in
that last case, and by ``doctor``, which checks it against the host.

Exit status: 0 done; 1 runtime error (no supervisor, request refused, task
failed); 2 usage error; 78 bad config; 130 interrupted. ``run`` exits with the
command's own status, and a command killed by signal N gives 128+N as in a
shell. Every error is one line on stderr starting with ``fireclaw-swarm: ``.

Only the standard library is imported at start: the config package and the
supervisor are imported by the commands that need them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn

from fireclaw.supervisor.client import ApiClient, ApiError

__all__ = ["build_parser", "exit_status", "main", "socket_path"]

PROG = "fireclaw-swarm"
EX_USAGE = 2
EX_CONFIG = 78
DEFAULT_CONFIG = "swarm.yaml"
#: ``down`` waits for the fleet to stop (the config's fleet_deadline is 60 s by default).
DOWN_TIMEOUT = 180.0
_FOLLOW_INTERVAL = 1.0
_EVENTS_PAGE = 1000


class UsageError(Exception):
    """The command line is wrong (exit 2)."""


class CliError(Exception):
    """A command failed; ``str()`` is one line, ``code`` the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# ---------------------------------------------------------------- helpers


def exit_status(code: int) -> int:
    """Map a command's exit code to ours: -N (killed by signal N) -> 128+N, capped at 255."""
    if code < 0:
        return min(128 - code, 255)
    return min(code, 255)


def state_dir(args: argparse.Namespace) -> str:
    """The state directory for these options: flag, environment, then the config's."""
    given = args.state_dir or os.environ.get("FIRECLAW_STATE_DIR")
    if given:
        return str(given)
    from fireclaw.config import ConfigError, load_config

    try:
        config = load_config(args.config or DEFAULT_CONFIG)
    except ConfigError as exc:
        raise CliError(str(exc), EX_CONFIG) from exc
    return os.fspath(config.state_dir)


def socket_path(args: argparse.Namespace) -> str:
    """Where the running supervisor's API socket is, for these options."""
    return os.path.join(state_dir(args), "api.sock")


def _client(args: argparse.Namespace) -> ApiClient:
    return ApiClient(socket_path(args))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return _one_line(str(value))


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    cells = [list(headers)] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _summary(result: object) -> str:
    if isinstance(result, dict):
        return " ".join(f"{k}={json.dumps(v)}" for k, v in result.items())
    return json.dumps(result)


def _dict(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CliError(f"the supervisor sent a malformed {what}")
    return value


# ---------------------------------------------------------------- commands


def cmd_up(args: argparse.Namespace) -> int:
    from fireclaw.supervisor.daemon import run_up

    state_dir = args.state_dir or os.environ.get("FIRECLAW_STATE_DIR") or None
    return run_up(args.config or DEFAULT_CONFIG, state_dir, handover=args.handover)


def cmd_version(args: argparse.Namespace) -> int:
    print(f"{PROG} {_version()}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = _dict(_client(args).get("/status"), "status")
    if args.json:
        _print_json(status)
        return 0
    print(format_status(status))
    return 0


def format_status(status: dict[str, Any]) -> str:
    """The human view of GET /status: a header, a table of roles, a table of agents."""
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
            f"{kind} off ({_one_line(str(isolation.get(f'{kind}_why')))})"
            for kind in ("netns", "cgroups")
            if isolation.get(kind) is False
        ]
        if off:
            lines.append("isolation: " + "; ".join(off))
    if status.get("last_reload_error"):
        lines.append(f"last reload rejected: {_one_line(str(status['last_reload_error']))}")
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
            _table(
                ["ROLE", "IDLE", "ACTIVE", "FAILED", "DEGRADED"],
                (
                    [name, r.get("idle"), r.get("active"), r.get("failed"), r.get("degraded")]
                    for name, r in roles.items()
                    if isinstance(r, dict)
                ),
            )
        )
    agents = status.get("agents") or []
    if isinstance(agents, list) and agents:
        lines.append("")
        lines.append(
            _table(
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


def cmd_run(args: argparse.Namespace) -> int:
    import binascii

    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError("run: give the command to run after `--`")
    outputs = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    sys.stdout.flush()
    code: int | None = None
    body: dict[str, object] = {"role": args.role, "argv": argv}
    if args.user:
        body["user"] = args.user
    for item in _client(args).stream("/run", body):
        if "exit" in item:
            if not isinstance(item["exit"], int) or isinstance(item["exit"], bool):
                raise CliError("the supervisor sent a malformed exit status")
            code = item["exit"]
            continue
        out = outputs.get(str(item.get("stream")))
        if out is None:
            continue  # progress notes such as {"vm": name} are not command output
        data = item.get("data")
        if not isinstance(data, str):
            raise CliError("the supervisor sent a malformed output line")
        try:
            out.write(binascii.a2b_base64(data))
        except binascii.Error:
            raise CliError("the supervisor sent output that is not base64") from None
        out.flush()
    if code is None:
        raise CliError("the run ended without an exit status")
    return exit_status(code)


def cmd_task(args: argparse.Namespace) -> int:
    client = _client(args)
    task = _dict(client.post("/tasks", {"role": args.role, "prompt": args.prompt}), "task")
    task_id = task.get("id")
    if not isinstance(task_id, int):
        raise CliError("the supervisor did not return a task id")
    if not args.wait:
        print(task_id)
        return 0
    deadline = time.monotonic() + args.timeout
    delay = 0.2
    while task.get("state") not in ("done", "failed"):
        if time.monotonic() >= deadline:
            raise CliError(f"task {task_id} still {task.get('state')} after {args.timeout:g} s")
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 1.5, 2.0)
        task = _dict(client.get(f"/tasks/{task_id}"), "task")
    result = task.get("result")
    if result:
        text = str(result)
        print(text, end="" if text.endswith("\n") else "\n")
    if task.get("state") == "failed":
        raise CliError(f"task {task_id} failed (exit code {_cell(task.get('exit_code'))})")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    target = "/tasks" + (f"?state={args.state}" if args.state else "")
    tasks = _dict(_client(args).get(target), "task list").get("tasks") or []
    if args.json:
        _print_json(tasks)
        return 0
    if not tasks:
        print("no tasks")
        return 0
    print(
        _table(
            ["ID", "ROLE", "STATE", "ATTEMPTS", "OWNER", "PROMPT"],
            (
                [
                    t.get("id"),
                    t.get("role"),
                    t.get("state"),
                    t.get("attempts"),
                    t.get("owner"),
                    _shorten(str(t.get("prompt", "")), 50),
                ]
                for t in tasks
                if isinstance(t, dict)
            ),
        )
    )
    return 0


def _shorten(text: str, width: int) -> str:
    text = _one_line(text)
    return text if len(text) <= width else text[: width - 3] + "..."


def cmd_scale(args: argparse.Namespace) -> int:
    result = _client(args).post("/scale", {"role": args.role, "n": args.n})
    print(f"{args.role}: scaled to {args.n}" if isinstance(result, dict) else _summary(result))
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    result = _client(args).post("/reset", {"name": args.name})
    print(f"{args.name}: reset ({_summary(result)})")
    return 0


def cmd_invoke(args: argparse.Namespace) -> int:
    body: dict[str, object] = {"role": args.role}
    if args.name:
        body["name"] = args.name
    if args.model:
        body["model"] = args.model
    result = _dict(_client(args).post("/agents", body, timeout=DOWN_TIMEOUT), "invoke result")
    print(f"{result.get('name')}: up as a {result.get('role')} agent on {result.get('vm')}")
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    _client(args).delete(f"/agents/{args.name}", timeout=DOWN_TIMEOUT)
    print(f"{args.name}: destroyed")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    _client(args).post(f"/agents/{args.name}/stop", {})
    print(f"{args.name}: stopped what it was doing")
    return 0


def cmd_image_build(args: argparse.Namespace) -> int:
    from pathlib import Path

    import msgspec
    from fireclaw.pool.image import (
        DEFAULT_PACKAGES,
        ImageError,
        ImageSpec,
        build_image,
        prune_images,
    )

    try:
        spec = msgspec.convert(
            {"kernel": args.kernel, "packages": [*DEFAULT_PACKAGES, *args.package]}, ImageSpec
        )
    except msgspec.ValidationError as exc:
        raise CliError(f"image build: {exc}") from exc
    cache = Path(args.cache_dir) if args.cache_dir else Path(state_dir(args)) / "images"
    try:
        image = build_image(spec, cache, progress=lambda line: print(line, flush=True))
    except ImageError as exc:
        raise CliError(str(exc)) from exc
    prune_images(cache, image.key, lambda line: print(line, flush=True))
    print(f"kernel {image.vmlinux}\ninitramfs {image.initramfs}\nrootfs {image.rootfs}")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    result = _dict(_client(args).post("/reload", timeout=DOWN_TIMEOUT), "reload result")
    if not result.get("ok", True):
        raise CliError(f"reload rejected: {result.get('error') or 'no reason given'}", EX_CONFIG)
    applied = result.get("applied")
    print("reloaded" + (f": {_summary(applied)}" if applied else ""))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    body = {"leave_vms": True} if args.leave_vms else None
    answer = _dict(_client(args).post("/down", body, timeout=DOWN_TIMEOUT), "down result")
    print(
        "exiting; its VMs run on for the next supervisor"
        if answer.get("leaving_vms")
        else "stopping"
    )
    return 0


def format_event(event: dict[str, Any]) -> str:
    """One event as a log line: ``id time kind subject key=value...``."""
    at = event.get("at")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
        if isinstance(at, int | float) and not isinstance(at, bool)
        else _cell(at)
    )
    detail = event.get("detail")
    parts = [str(event.get("id", "?")), when, _cell(event.get("kind")), _cell(event.get("subject"))]
    if isinstance(detail, dict):
        parts += [
            f"{k}={v if isinstance(v, str) and v.isprintable() and ' ' not in v else json.dumps(v)}"
            for k, v in detail.items()
        ]
    return _one_line(" ".join(parts))


def cmd_usage(args: argparse.Namespace) -> int:
    target = f"/usage?by={args.by}&since={int(args.since)}"
    answer = _dict(_client(args).get(target), "usage")
    if args.json:
        _print_json(answer)
        return 0
    print(format_usage(answer))
    return 0


def format_usage(answer: dict[str, Any]) -> str:
    """The human view of GET /usage: one row per key, then the budgets."""
    rows = [r for r in answer.get("rows") or [] if isinstance(r, dict)]
    by = str(answer.get("by", "agent"))
    lines = []
    if rows:
        lines.append(
            _table(
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


def _since(text: str) -> float:
    """--since: unix seconds, an ISO date or time (UTC unless it says), or an age
    such as 30m, 12h or 7d."""
    import datetime as dt
    import time

    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].isdigit():
        return time.time() - int(text[:-1]) * units[text[-1]]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not unix seconds, an ISO date/time or an age such as 12h"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def concerns(event: dict[str, Any], agent: str) -> bool:
    """Whether ``event`` is about the agent (or VM) named ``agent``: its subject, or
    the agent or VM its detail names."""
    detail = event.get("detail")
    named = (detail.get("agent"), detail.get("vm")) if isinstance(detail, dict) else ()
    return event.get("subject") == agent or agent in named


def cmd_logs(args: argparse.Namespace) -> int:
    client = _client(args)
    after = args.after
    while True:
        answer = _dict(client.get(f"/events?after={after}&limit={_EVENTS_PAGE}"), "event list")
        events = answer.get("events") or []
        for event in events:
            if isinstance(event, dict):
                if args.agent is None or concerns(event, args.agent):
                    print(json.dumps(event, sort_keys=True) if args.json else format_event(event))
                if isinstance(event.get("id"), int):
                    after = max(after, event["id"])
        sys.stdout.flush()
        if len(events) >= _EVENTS_PAGE:
            continue
        if not args.follow:
            return 0
        time.sleep(_FOLLOW_INTERVAL)


def cmd_doctor(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fireclaw.config import ConfigError, load_config
    from fireclaw.supervisor.doctor import examine

    try:
        config = load_config(args.config or DEFAULT_CONFIG)
    except ConfigError as exc:
        raise CliError(str(exc), EX_CONFIG) from exc
    given = args.state_dir or os.environ.get("FIRECLAW_STATE_DIR")
    report = examine(config, Path(given).resolve() if given else config.state_dir)
    print("\n".join(report.lines()))
    return report.exit_status


def cmd_gc(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fireclaw.pool.vm import instance_id
    from fireclaw.supervisor import leftovers
    from fireclaw.supervisor.pidfile import AlreadyRunning, PidLock, PidLockError

    sdir = Path(state_dir(args)).resolve()
    # Held for the whole sweep, so no supervisor starts on this state dir meanwhile.
    lock = PidLock(sdir / leftovers.LOCK_NAME)
    if sdir.is_dir():
        try:
            lock.acquire()
        except AlreadyRunning as exc:
            who = f"pid {exc.pid}" if exc.pid else "pid unknown"
            raise CliError(
                f"the swarm of {sdir} is running ({who}): its resources are in use;"
                " stop it first (`fireclaw-swarm down`)"
            ) from None
        except PidLockError as exc:
            raise CliError(str(exc)) from None
    try:
        found = leftovers.find_all(sdir)
        mine = found.pop(instance_id(sdir))
        targets = [mine]
        if args.all:
            running = leftovers.running_instances(found)
            for instance, other in sorted(found.items()):
                if instance in running:
                    print(
                        f"skipped swarm {instance}: its supervisor runs (pid {running[instance]})"
                    )
                else:
                    targets.append(other)
        done = [r for target in targets for r in leftovers.remove(target)]
    finally:
        lock.release()
    for removal in done:
        print(removal)
    for error in mine.errors:
        print(f"cannot check: {error}")
    failed = sum(not r.ok for r in done) + len(mine.errors)
    if not done and not failed:
        print("nothing to remove")
        return 0
    print(f"removed {sum(r.ok for r in done)} of {len(done)}")
    if failed:
        raise CliError(f"{failed} left: see the lines above")
    return 0


# ---------------------------------------------------------------- parser


def _positive_int(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The full command line. ``--state-dir``/``--config`` go before or after the command."""
    # Options repeated on every subcommand default to SUPPRESS so that a value given
    # before the command is not overwritten by the subcommand's default.
    common = _Parser(add_help=False)
    common.add_argument(
        "--state-dir",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="state directory (holds api.sock); default $FIRECLAW_STATE_DIR, "
        "else the config's state_dir",
    )
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help=f"config file (default ./{DEFAULT_CONFIG})",
    )

    parser = _Parser(prog=PROG, description="Run and control a fleet of AI agents in microVMs.")
    parser.add_argument(
        "--state-dir", metavar="DIR", default=None, help="state directory (holds api.sock)"
    )
    parser.add_argument(
        "--config", metavar="PATH", default=None, help=f"config file (default ./{DEFAULT_CONFIG})"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> _Parser:
        p: _Parser = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = add("up", cmd_up, "run the supervisor in the foreground")
    p.add_argument(
        "--handover",
        action="store_true",
        help="if a supervisor runs on this state dir, take its VMs over without stopping them",
    )
    p = add("status", cmd_status, "show roles and agents")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p = add("run", cmd_run, "run a command in a pooled VM and stream its output")
    p.add_argument("--role", metavar="R", help="role whose pool to use (default: the first)")
    p.add_argument(
        "--user",
        metavar="NAME",
        help="run as this guest user, e.g. root (default: the unprivileged agent user)",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD...")
    p = add("task", cmd_task, "queue a task for a role")
    p.add_argument("role", metavar="ROLE")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--wait", action="store_true", help="wait for the task and print its result")
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=3600.0,
        metavar="SECS",
        help="with --wait, give up after SECS (default 3600)",
    )
    p = add("tasks", cmd_tasks, "list tasks")
    p.add_argument("--state", choices=["queued", "claimed", "done", "failed"])
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p = add("scale", cmd_scale, "set the number of VMs of a role")
    p.add_argument("role", metavar="ROLE")
    p.add_argument("n", metavar="N", type=_positive_int)
    p = add("reset", cmd_reset, "clear the failed state of a VM or a role")
    p.add_argument("name", metavar="NAME")
    p = add("invoke", cmd_invoke, "bring up a named agent that stays until destroyed")
    p.add_argument("role", metavar="ROLE")
    p.add_argument("name", metavar="NAME", nargs="?")
    p.add_argument("--model", metavar="M", help="a model other than the role's")
    p = add("destroy", cmd_destroy, "stop a named agent for good")
    p.add_argument("name", metavar="NAME")
    p = add("stop", cmd_stop, "end what an agent is doing now (its turn); the agent stays")
    p.add_argument("name", metavar="NAME")
    p = sub.add_parser("image", help="guest images", description="guest images")
    image_cmds = p.add_subparsers(dest="image_command", metavar="COMMAND", required=True)
    p = image_cmds.add_parser(
        "build", parents=[common], help="build the guest image, or find it in the cache"
    )
    p.set_defaults(func=cmd_image_build)
    p.add_argument("--kernel", default="debian-cloud", help="debian-cloud, or a vmlinux/bzImage")
    p.add_argument(
        "--package",
        action="append",
        default=[],
        help="one more Debian package (podman: chat agents get the podman_run tool)",
    )
    p.add_argument("--cache-dir", metavar="DIR", help="where images go (<state_dir>/images)")
    add("reload", cmd_reload, "re-read the config file and apply the changes")
    p = add("down", cmd_down, "stop the supervisor and all its VMs")
    p.add_argument(
        "--leave-vms",
        action="store_true",
        help="exit, leaving the VMs running for the next supervisor to adopt",
    )
    p = add("logs", cmd_logs, "print the event log")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    p.add_argument(
        "--after", type=_positive_int, default=0, metavar="ID", help="only events after this id"
    )
    p.add_argument(
        "--agent", metavar="NAME", help="only the events of this agent (or VM), its audit trail"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line (JSON lines)")
    p = add("usage", cmd_usage, "show the model calls' token usage and the budgets")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.add_argument(
        "--by", choices=["agent", "role", "task", "model", "vm"], default="agent", help="sum per"
    )
    p.add_argument(
        "--since",
        type=_since,
        default=0.0,
        metavar="T",
        help="unix seconds, an ISO date/time (UTC) or an age such as 12h (default: all)",
    )
    add("doctor", cmd_doctor, "check the host and list what swarms left on it")
    p = add("gc", cmd_gc, "remove what a crashed swarm left on the host")
    p.add_argument(
        "--all",
        action="store_true",
        help="also other swarms' leftovers (not those whose supervisor is seen running)",
    )
    add("version", cmd_version, "print the version")
    return parser


def _version() -> str:
    from importlib.metadata import version

    return version("fireclaw-swarm")


# ---------------------------------------------------------------- entry point


def _fail(message: str) -> None:
    print(f"{PROG}: {_one_line(message) or 'error'}", file=sys.stderr)


def _is_config_error(exc: BaseException) -> bool:
    # The config package is imported lazily; if it was never loaded, exc is not its error.
    config = sys.modules.get("fireclaw.config")
    error_type = getattr(config, "ConfigError", None)
    return isinstance(error_type, type) and isinstance(exc, error_type)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    try:
        args = build_parser().parse_args(argv)
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except UsageError as exc:
        _fail(str(exc))
        return EX_USAGE
    except (ApiError, CliError) as exc:
        _fail(str(exc))
        return exc.code if isinstance(exc, CliError) else 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Our reader went away (`| head`); say nothing, and keep Python from
        # complaining when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception as exc:
        if _is_config_error(exc):
            _fail(str(exc))
            return EX_CONFIG
        if os.environ.get("FIRECLAW_DEBUG"):
            raise
        if type(exc).__module__.startswith("fireclaw."):
            _fail(str(exc) or type(exc).__name__)
        else:
            _fail(f"internal error: {type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
