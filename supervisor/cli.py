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

This module holds the parser and ``main``; the commands are in
supervisor/cli_commands.py, what they print in supervisor/cli_format.py. Only the
standard library is imported at start: the config package and the supervisor are
imported by the commands that need them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from fireclaw.guest_daemon.exits import EX_CONFIG
from fireclaw.supervisor.cli_commands import (
    DEFAULT_CONFIG,
    CliError,
    UsageError,
    cmd_destroy,
    cmd_doctor,
    cmd_down,
    cmd_gc,
    cmd_image_build,
    cmd_invoke,
    cmd_logs,
    cmd_reload,
    cmd_reset,
    cmd_run,
    cmd_scale,
    cmd_status,
    cmd_stop,
    cmd_task,
    cmd_tasks,
    cmd_up,
    cmd_usage,
    cmd_version,
    version,
)
from fireclaw.supervisor.cli_format import PROG, one_line
from fireclaw.supervisor.client import ApiError

__all__ = ["build_parser", "main"]

EX_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


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
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
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
    p.add_argument(
        "--with",
        dest="clis",
        default="",
        metavar="CLI,...",
        help="coding-agent CLIs to install: claude-code, codex, gemini-cli, opencode, aider",
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


# ---------------------------------------------------------------- entry point


def _fail(message: str) -> None:
    print(f"{PROG}: {one_line(message) or 'error'}", file=sys.stderr)


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
