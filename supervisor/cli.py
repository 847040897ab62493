"""The ``fireclaw-swarm`` command.

::

    fireclaw-swarm up [--config PATH] [--state-dir DIR]   run the supervisor in the foreground
                      [--cluster DSN --host NAME]        ... as a host of a fleet
    fireclaw-swarm status [--json]                       roles and agents
    fireclaw-swarm run [--role R] -- CMD...              run CMD in a pooled VM, stream its output
    fireclaw-swarm task ROLE PROMPT [--wait]             queue a task, print its id (or result)
    fireclaw-swarm tasks [--state S] [--json]            list tasks
    fireclaw-swarm answer NAME TEXT                      resume a task waiting for input
    fireclaw-swarm scale ROLE N                          set the number of VMs of a role
    fireclaw-swarm reset NAME                            clear the failed state of a VM or role
    fireclaw-swarm reload                                re-read the config file
    fireclaw-swarm down                                  stop the supervisor and its VMs
    fireclaw-swarm drain HOST / undrain HOST             a fleet's host stops (resumes) claiming
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
supervisor/cli_commands.py, what they print in supervisor/cli_format.py.

A command should cost little more than the interpreter's own start. At start
only argparse, json and the command modules are imported (not even typing: the
modules name their types for the type checker alone); the API client (socket,
and its own HTTP reader), the config package and the supervisor are imported
by the commands that need them; a command line that names its command plainly
gets a parser holding that command alone (``parse_args``), and ``--version``
looks the version up only when asked. tests/test_cli_startup.py keeps the
heavy modules off the ``run`` and ``status`` path; bench/process_driver.py
measures the cost against ``python -c pass``.
"""

from __future__ import annotations

import argparse
import os
import sys

from fireclaw.supervisor.cli_commands import (
    DEFAULT_CONFIG,
    CliError,
    UsageError,
    cmd_answer,
    cmd_destroy,
    cmd_doctor,
    cmd_down,
    cmd_drain,
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
    cmd_undrain,
    cmd_up,
    cmd_usage,
    cmd_version,
    version,
)
from fireclaw.supervisor.cli_format import PROG, one_line

# Names for the type checker alone: importing ``typing`` costs a command's start
# a few milliseconds (tests/test_cli_startup.py keeps it off the run path).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any, NoReturn

__all__ = ["build_parser", "main", "parse_args"]

EX_USAGE = 2


def _columns() -> int:
    """The terminal's width as ``shutil.get_terminal_size().columns`` gives it
    (``$COLUMNS``, then the terminal on stdout, then 80), without importing
    shutil, which brings the compression modules with it."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0 and sys.__stdout__ is not None:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class _Formatter(argparse.HelpFormatter):
    """argparse's own formatter, at the width argparse itself would choose."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_columns() - 2)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


class _Version(argparse.Action):
    """``--version``: the version is looked up only when asked for, since
    ``importlib.metadata`` takes longer to import than a command takes to run."""

    def __init__(
        self,
        option_strings: Sequence[str],
        dest: str,
        help: str = "show program's version number and exit",
    ) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> NoReturn:
        print(f"{parser.prog} {version()}")
        parser.exit()


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


def _up(p: _Parser) -> None:
    p.add_argument(
        "--handover",
        action="store_true",
        help="if a supervisor runs on this state dir, take its VMs over without stopping them",
    )
    p.add_argument(
        "--cluster",
        metavar="DSN",
        help="run as a host of a fleet sharing this PostgreSQL database (postgresql://...,"
        " no password in it), as swarm.yaml's cluster: does",
    )
    p.add_argument("--host", metavar="NAME", help="this host's name in the fleet")
    p.add_argument(
        "--cluster-password-file",
        metavar="PATH",
        help="the database password's file (owner-only); else PGPASSWORD or PGPASSFILE",
    )


def _host(p: _Parser) -> None:
    p.add_argument("host", metavar="HOST")


def _json(p: _Parser) -> None:
    p.add_argument("--json", action="store_true", help="print the raw JSON")


def _run(p: _Parser) -> None:
    p.add_argument("--role", metavar="R", help="role whose pool to use (default: the first)")
    p.add_argument(
        "--user",
        metavar="NAME",
        help="run as this guest user, e.g. root (default: the unprivileged agent user)",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD...")


def _task(p: _Parser) -> None:
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


def _tasks(p: _Parser) -> None:
    p.add_argument("--state", choices=["queued", "claimed", "waiting_for_input", "done", "failed"])
    _json(p)


def _answer(p: _Parser) -> None:
    p.add_argument("name", metavar="NAME", help="the waiting task (task-N) or the agent that asked")
    p.add_argument("text", metavar="TEXT", help="the answer its CLI session resumes with")


def _scale(p: _Parser) -> None:
    p.add_argument("role", metavar="ROLE")
    p.add_argument("n", metavar="N", type=_positive_int)


def _name(p: _Parser) -> None:
    p.add_argument("name", metavar="NAME")


def _invoke(p: _Parser) -> None:
    p.add_argument("role", metavar="ROLE")
    p.add_argument("name", metavar="NAME", nargs="?")
    p.add_argument("--model", metavar="M", help="a model other than the role's")


def _image_build(p: _Parser) -> None:
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


def _down(p: _Parser) -> None:
    p.add_argument(
        "--leave-vms",
        action="store_true",
        help="exit, leaving the VMs running for the next supervisor to adopt",
    )


def _logs(p: _Parser) -> None:
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    p.add_argument(
        "--after", type=_positive_int, default=0, metavar="ID", help="only events after this id"
    )
    p.add_argument(
        "--agent", metavar="NAME", help="only the events of this agent (or VM), its audit trail"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line (JSON lines)")


def _usage(p: _Parser) -> None:
    _json(p)
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


def _gc(p: _Parser) -> None:
    p.add_argument(
        "--all",
        action="store_true",
        help="also other swarms' leftovers (not those whose supervisor is seen running)",
    )


def _no_arguments(p: _Parser) -> None:
    pass


if TYPE_CHECKING:
    #: A command as the parser adds it: its name, its help line, what adds its own
    #: arguments and the function that runs it; both None for ``image``, a group
    #: of commands.
    _Entry = tuple[
        str, str, Callable[[_Parser], None] | None, Callable[[argparse.Namespace], int] | None
    ]


def _commands() -> list[_Entry]:
    """Every command, in the order ``--help`` lists them: a function rather than a
    constant, so that a parser takes the command functions this module holds
    when the parser is built."""
    return [
        ("up", "run the supervisor in the foreground", _up, cmd_up),
        ("status", "show roles and agents", _json, cmd_status),
        ("run", "run a command in a pooled VM and stream its output", _run, cmd_run),
        ("task", "queue a task for a role", _task, cmd_task),
        ("tasks", "list tasks", _tasks, cmd_tasks),
        ("answer", "answer the question a task stopped at", _answer, cmd_answer),
        ("scale", "set the number of VMs of a role", _scale, cmd_scale),
        ("reset", "clear the failed state of a VM or a role", _name, cmd_reset),
        ("invoke", "bring up a named agent that stays until destroyed", _invoke, cmd_invoke),
        ("destroy", "stop a named agent for good", _name, cmd_destroy),
        (
            "stop",
            "end what an agent is doing now (its turn); the agent stays",
            _name,
            cmd_stop,
        ),
        ("image", "guest images", None, None),
        ("reload", "re-read the config file and apply the changes", _no_arguments, cmd_reload),
        ("down", "stop the supervisor and all its VMs", _down, cmd_down),
        (
            "drain",
            "a fleet's host claims no tasks, finishes its own, stops its warm VMs",
            _host,
            cmd_drain,
        ),
        ("undrain", "a drained host claims tasks and keeps warm VMs again", _host, cmd_undrain),
        ("logs", "print the event log", _logs, cmd_logs),
        ("usage", "show the model calls' token usage and the budgets", _usage, cmd_usage),
        ("doctor", "check the host and list what swarms left on it", _no_arguments, cmd_doctor),
        ("gc", "remove what a crashed swarm left on the host", _gc, cmd_gc),
        ("version", "print the version", _no_arguments, cmd_version),
    ]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full command line, or with ``command`` the same but holding that
    command alone (which parses its command lines exactly as the full one does:
    every parser argparse builds costs start-up time, mostly in gettext lookups).
    ``--state-dir``/``--config`` go before or after the command."""
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
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", required=True)
    for name, help, arguments, func in _commands():
        if command is not None and name != command:
            continue
        if arguments is None:  # image: a group of commands
            p = sub.add_parser(name, help=help, description=help)
            image_cmds = p.add_subparsers(dest="image_command", metavar="COMMAND", required=True)
            p = image_cmds.add_parser(
                "build", parents=[common], help="build the guest image, or find it in the cache"
            )
            p.set_defaults(func=cmd_image_build)
            _image_build(p)
            continue
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(func=func)
        arguments(p)
    return parser


#: The global options as the fast path recognises them (full spelling, a value).
_GLOBAL_OPTIONS = ("--state-dir", "--config")


def _named_command(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names plainly: the first word, after global options in
    their full spelling only. None for anything else (``--help``, an abbreviated
    option), which then gets the full parser."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word in _GLOBAL_OPTIONS:
            i += 2
        elif word.partition("=")[0] in _GLOBAL_OPTIONS:
            i += 1
        elif word.startswith("-"):
            return None
        else:
            return word
    return None


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv`` as ``build_parser().parse_args`` does, building only the
    parser of the command it names when it names one plainly. A command line
    that the small parser refuses is parsed again by the full one, so errors and
    help read the same either way."""
    named = _named_command(argv)
    if named in {name for name, *_ in _commands()}:
        try:
            return build_parser(named).parse_args(argv)
        except UsageError:
            pass
    return build_parser().parse_args(argv)


# ---------------------------------------------------------------- entry point


def _fail(message: str) -> None:
    print(f"{PROG}: {one_line(message) or 'error'}", file=sys.stderr)


def _is_error(exc: BaseException, module: str, name: str) -> bool:
    """Whether ``exc`` is the error ``name`` of ``module``, a module the commands
    import lazily: if it was never loaded, exc is not its error."""
    error_type = getattr(sys.modules.get(module), name, None)
    return isinstance(error_type, type) and isinstance(exc, error_type)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except UsageError as exc:
        _fail(str(exc))
        return EX_USAGE
    except CliError as exc:
        _fail(str(exc))
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Our reader went away (`| head`); say nothing, and keep Python from
        # complaining when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception as exc:
        if _is_error(exc, "fireclaw.supervisor.client", "ApiError"):
            _fail(str(exc))
            return 1
        if _is_error(exc, "fireclaw.config", "ConfigError"):
            from fireclaw.guest_daemon.exits import EX_CONFIG

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
