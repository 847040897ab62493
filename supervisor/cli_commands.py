"""The commands of ``fireclaw-swarm``: one ``cmd_*`` function per subcommand.

Each takes the parsed ``argparse.Namespace`` (supervisor/cli.py builds the
parser), talks to the running supervisor through its API socket where it needs
to (supervisor/client.py), prints what it got (supervisor/cli_format.py) and
returns the exit status. A command that fails raises ``CliError`` (one line and
its exit status) or ``UsageError`` (exit 2); ``cli.main`` prints them.

Standard library only at import, and little of it: the API client, the config
package, the pool and the supervisor itself are imported by the commands that
need them, since every module a command imports adds to its start-up time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from fireclaw.supervisor.cli_format import (
    PROG,
    cell,
    format_event,
    format_status,
    format_usage,
    print_json,
    shorten,
    summary,
    table,
)

# Names for the type checker alone: importing ``typing`` costs a command's start
# a few milliseconds (tests/test_cli_startup.py keeps it off the run path).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from fireclaw.supervisor.client import ApiClient

__all__ = [
    "DEFAULT_CONFIG",
    "DOWN_TIMEOUT",
    "CliError",
    "UsageError",
    "cmd_destroy",
    "cmd_doctor",
    "cmd_down",
    "cmd_gc",
    "cmd_image_build",
    "cmd_invoke",
    "cmd_logs",
    "cmd_reload",
    "cmd_reset",
    "cmd_run",
    "cmd_scale",
    "cmd_status",
    "cmd_stop",
    "cmd_task",
    "cmd_tasks",
    "cmd_up",
    "cmd_usage",
    "cmd_version",
    "concerns",
    "exit_status",
    "socket_path",
    "state_dir",
    "version",
]

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
    from fireclaw.guest_daemon.exits import EX_CONFIG

    try:
        config = load_config(args.config or DEFAULT_CONFIG)
    except ConfigError as exc:
        raise CliError(str(exc), EX_CONFIG) from exc
    return os.fspath(config.state_dir)


def socket_path(args: argparse.Namespace) -> str:
    """Where the running supervisor's API socket is, for these options."""
    return os.path.join(state_dir(args), "api.sock")


def _client(args: argparse.Namespace) -> ApiClient:
    from fireclaw.supervisor.client import ApiClient

    return ApiClient(socket_path(args))


def _dict(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CliError(f"the supervisor sent a malformed {what}")
    return value


def cmd_up(args: argparse.Namespace) -> int:
    from fireclaw.config.cluster import ClusterFlags
    from fireclaw.supervisor.up import run_up

    state_dir = args.state_dir or os.environ.get("FIRECLAW_STATE_DIR") or None
    cluster = None
    if args.cluster is not None or args.host is not None or args.cluster_password_file:
        if args.cluster is None:
            raise UsageError("up: --host and --cluster-password-file go with --cluster DSN")
        cluster = ClusterFlags(
            database=args.cluster, host=args.host, password_file=args.cluster_password_file
        )
    return run_up(args.config or DEFAULT_CONFIG, state_dir, handover=args.handover, cluster=cluster)


def cmd_version(args: argparse.Namespace) -> int:
    print(f"{PROG} {version()}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = _dict(_client(args).get("/status"), "status")
    if args.json:
        print_json(status)
        return 0
    print(format_status(status))
    return 0


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
    while task.get("state") not in ("done", "failed", "waiting_for_input"):
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
        raise CliError(f"task {task_id} failed (exit code {cell(task.get('exit_code'))})")
    if task.get("state") == "waiting_for_input":
        raise CliError(
            f"task {task_id} waits for an answer: fireclaw-swarm answer task-{task_id} TEXT"
        )
    return 0


def cmd_answer(args: argparse.Namespace) -> int:
    body = {"name": args.name, "text": args.text}
    task = _dict(_client(args).post("/answers", body), "answer result")
    print(f"task {task.get('id')} resumes with the answer")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    target = "/tasks" + (f"?state={args.state}" if args.state else "")
    tasks = _dict(_client(args).get(target), "task list").get("tasks") or []
    if args.json:
        print_json(tasks)
        return 0
    if not tasks:
        print("no tasks")
        return 0
    print(
        table(
            ["ID", "ROLE", "STATE", "ATTEMPTS", "OWNER", "PROMPT"],
            (
                [
                    t.get("id"),
                    t.get("role"),
                    t.get("state"),
                    t.get("attempts"),
                    t.get("owner"),
                    shorten(str(t.get("prompt", "")), 50),
                ]
                for t in tasks
                if isinstance(t, dict)
            ),
        )
    )
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    result = _client(args).post("/scale", {"role": args.role, "n": args.n})
    print(f"{args.role}: scaled to {args.n}" if isinstance(result, dict) else summary(result))
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    result = _client(args).post("/reset", {"name": args.name})
    print(f"{args.name}: reset ({summary(result)})")
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


def _host_name(text: str) -> str:
    """A fleet host's name as ``drain`` takes it (it goes into the request's path)."""
    import re

    from fireclaw.config.cluster import HOST_NAME_PATTERN

    if not re.fullmatch(HOST_NAME_PATTERN, text):
        raise UsageError(f"{text[:64]!r} is not a host name (letters, digits, '.', '_', '-')")
    return text


def cmd_drain(args: argparse.Namespace) -> int:
    _client(args).post(f"/hosts/{_host_name(args.host)}/drain", {})
    print(f"{args.host}: draining (it finishes its tasks; `{PROG} status` shows when)")
    return 0


def cmd_undrain(args: argparse.Namespace) -> int:
    _client(args).post(f"/hosts/{_host_name(args.host)}/undrain", {})
    print(f"{args.host}: no longer draining")
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
    from fireclaw.config import CLI_KINDS
    from fireclaw.pool.image import (
        DEFAULT_PACKAGES,
        ImageError,
        ImageSpec,
        build_image,
        prune_images,
    )

    wanted = [name.strip() for name in args.clis.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in CLI_KINDS]
    if unknown:
        what = "is not a CLI" if len(unknown) == 1 else "are not CLIs"
        raise CliError(
            f"image build --with: {', '.join(unknown)} {what} it installs"
            f" (it installs: {', '.join(CLI_KINDS)})"
        )
    try:
        spec = msgspec.convert(
            {
                "kernel": args.kernel,
                "packages": [*DEFAULT_PACKAGES, *args.package],
                "clis": wanted,
            },
            ImageSpec,
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
        from fireclaw.guest_daemon.exits import EX_CONFIG

        raise CliError(f"reload rejected: {result.get('error') or 'no reason given'}", EX_CONFIG)
    applied = result.get("applied")
    print("reloaded" + (f": {summary(applied)}" if applied else ""))
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


def cmd_usage(args: argparse.Namespace) -> int:
    target = f"/usage?by={args.by}&since={int(args.since)}"
    answer = _dict(_client(args).get(target), "usage")
    if args.json:
        print_json(answer)
        return 0
    print(format_usage(answer))
    return 0


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
    from fireclaw.guest_daemon.exits import EX_CONFIG
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

    from fireclaw.pool.runtime import instance_id
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


def version() -> str:
    """The installed distribution's version."""
    from importlib.metadata import version

    return version("fireclaw-swarm")
