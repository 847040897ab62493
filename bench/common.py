"""What the fireclaw-swarm benchmarks share: statistics, machine facts, a
supervisor in a subprocess, leftover checks, signal handling and the report.

What each benchmark measures stays in its own script (``process_driver.py``,
``qemu_driver.py``); this module holds the mechanics around it. The scripts
run as ``python bench/<name>.py``, so this folder is on ``sys.path`` and they
import it as ``common``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
from fireclaw.pool import cgroup, netns
from fireclaw.supervisor.client import ApiClient

FIRECLAW = str(Path(sys.executable).parent / "fireclaw-swarm")
# The supervisor's fleet_deadline (60 s by default) plus TERM/KILL of stragglers.
STOP_TIMEOUT = 120.0
# How ``run -- true`` through the CLI is shown in the results (S: the state dir).
CLI_RUN_SHOWN = shlex.join(["fireclaw-swarm", "--state-dir", "S", "run", "--", "true"])


class BenchError(Exception):
    """A part of the benchmark could not be measured."""


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived."""


# ---------------------------------------------------------------- small helpers


def percentile(samples: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def summary_ms(
    samples_ms: list[float], *, digits: int = 3, samples: bool = False
) -> dict[str, Any]:
    """Count, p50, p99, max, mean and min of ``samples_ms`` rounded to ``digits``;
    with ``samples``, the samples too (to 3 digits)."""
    out: dict[str, Any] = {
        "n": len(samples_ms),
        "p50_ms": round(percentile(samples_ms, 50), digits),
        "p99_ms": round(percentile(samples_ms, 99), digits),
        "max_ms": round(max(samples_ms), digits),
        "mean_ms": round(sum(samples_ms) / len(samples_ms), digits),
        "min_ms": round(min(samples_ms), digits),
    }
    if samples:
        out["samples_ms"] = [round(s, 3) for s in samples_ms]
    return out


def one_line(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}".strip()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def machine_facts() -> dict[str, Any]:
    """CPUs, memory, kernel, Python, root, and whether VMs get a network
    namespace and a cgroup each (and why not)."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ns_why = netns.probe()
    cg_why = cgroup.probe()
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "root": os.geteuid() == 0,
        "netns": ns_why is None,
        "netns_why": ns_why or "one network namespace per VM",
        "cgroups": cg_why is None,
        "cgroups_why": cg_why or "one memory cgroup per VM",
    }


def fill_defaults(args: argparse.Namespace, quick: dict[str, Any], full: dict[str, Any]) -> None:
    """Give every option left unset its ``--quick`` or full-run default."""
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


# ---------------------------------------------------------------- what a bench leaves behind


def isolation_leftovers(tag: str) -> dict[str, list[str]]:
    """Network namespaces ``fireclaw-<tag>-*`` and cgroups ``<tag>-*`` that exist now."""
    return {
        "netns": netns.leftovers(f"{netns.PREFIX}{tag}-"),
        "cgroups": [str(p) for p in cgroup.leftovers() if p.name.startswith(f"{tag}-")],
    }


def remove_isolation(tag: str) -> None:
    """Remove the cgroups ``<tag>-*`` and the network namespaces ``fireclaw-<tag>-*``."""
    for path in cgroup.leftovers():
        if path.name.startswith(f"{tag}-"):
            with contextlib.suppress(cgroup.CgroupError):
                cgroup.remove(path)
    for name in netns.leftovers(f"{netns.PREFIX}{tag}-"):
        with contextlib.suppress(netns.NetnsError):
            netns.remove_sync(name)


def check_clean(
    name: str,
    find: Callable[[], dict[str, list[str]]],
    sweep: Callable[[], None],
    out: dict[str, Any],
) -> dict[str, list[str]]:
    """Record in ``out["leftovers"]`` what ``find`` reports; if anything, say so and
    ``sweep`` it. Returns what was found."""
    left = find()
    out["leftovers"] = left
    if left:
        print(f"  LEFT BEHIND by {name}: {left}; removing it", flush=True)
        sweep()
    return left


# ---------------------------------------------------------------- a real supervisor


class Supervisor:
    """``fireclaw-swarm up`` in a subprocess, ready when it says READY=1."""

    def __init__(self, root: Path, config_text: str) -> None:
        self.root = root
        self.config = root / "swarm.yaml"
        self.state = root / "state"
        self.log = root / "supervisor.log"
        self.config.write_text(config_text)
        self.proc: subprocess.Popen[bytes] | None = None
        self._notify: socket.socket | None = None
        self.api = ApiClient(self.state / "api.sock")
        self._after = 0

    def start(self, timeout: float = 60) -> None:
        """Start ``up`` and wait for READY=1; again after ``kill9`` too, as systemd
        restarts a service: same config, same state dir, a fresh notify socket."""
        path = self.root / "notify.sock"
        if self._notify is not None:
            self._notify.close()
        path.unlink(missing_ok=True)
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(path))
        env = dict(os.environ, NOTIFY_SOCKET=str(path))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [FIRECLAW, "up", "--config", str(self.config), "--state-dir", str(self.state)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,  # stopped by this script only, not by a terminal's ^C
            )
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise BenchError(f"no READY=1 from the supervisor; log:\n{self.tail()}")
            self._notify.settimeout(min(left, 0.5))
            try:
                msg = self._notify.recv(4096).decode()
            except TimeoutError:
                continue
            if "READY=1" in msg.split("\n"):
                return

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def status(self) -> dict[str, Any]:
        st: dict[str, Any] = self.api.get("/status")
        return st

    def wait_for(
        self,
        what: str,
        pred: Callable[[dict[str, Any]], bool],
        timeout: float,
        seen: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Long-poll /status until ``pred(status)`` holds; ``seen`` gets every status."""
        deadline = time.monotonic() + timeout
        st = self.status()
        while True:
            if seen is not None:
                seen(st)
            if pred(st):
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"timed out waiting for {what}: {st['roles']}")
            if self.proc is not None and self.proc.poll() is not None:
                raise BenchError(f"the supervisor exited while waiting for {what}")
            st = self.api.get(
                f"/status?since={st['version']}&wait={min(left, 5):.2f}", timeout=left + 5
            )
        return st

    def new_events(self) -> list[dict[str, Any]]:
        """Events logged since the last call (all of them at the first)."""
        found: list[dict[str, Any]] = []
        while True:
            page = self.api.get(f"/events?after={self._after}&limit=1000")["events"]
            if not page:
                return found
            self._after = page[-1]["id"]
            found += page

    def run_true(self, role: str) -> int | None:
        """``run -- true`` through the API, until its stream is consumed; its exit code."""
        code = None
        for item in self.api.stream("/run", {"role": role, "argv": ["true"]}):
            if "exit" in item:
                code = item["exit"]
        return code

    def kill9(self) -> None:
        """SIGKILL the supervisor alone (its VMs and services stay) and reap it."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``fireclaw-swarm --state-dir S ARGS...``, its output captured as text."""
        return subprocess.run(
            [FIRECLAW, "--state-dir", str(self.state), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def terminate(self, timeout: float) -> tuple[int | None, float]:
        """SIGTERM, wait up to ``timeout``; (exit code or None if it had to be killed, seconds)."""
        assert self.proc is not None
        t0 = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
            self.proc.kill()
            self.proc.wait()
        return code, time.perf_counter() - t0

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            code, _ = self.terminate(STOP_TIMEOUT)
            if code is None:
                print("  the supervisor did not stop in time: killed", flush=True)
        if self._notify is not None:
            self._notify.close()
            self._notify = None

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"


@contextlib.contextmanager
def supervised(
    sup: Supervisor, check: Callable[[], None], *, hold_signals: bool = False
) -> Iterator[None]:
    """On an error inside, print the tail of the supervisor's log; whatever happens,
    stop the supervisor (killing it if it does not stop in time), then run ``check``
    (with SIGTERM and SIGINT held back meanwhile when ``hold_signals``)."""
    try:
        yield
    except Exception:
        print(f"  supervisor log (tail):\n{sup.tail()}", file=sys.stderr, flush=True)
        raise
    finally:
        with signals_held() if hold_signals else contextlib.nullcontext():
            sup.close()
            check()


def timed_cli_run(sup: Supervisor, timeout: float) -> tuple[int, str | None]:
    """``fireclaw-swarm --state-dir S run -- true``, timed from spawn to exit:
    (nanoseconds, what went wrong or None)."""
    cmd = [FIRECLAW, "--state-dir", str(sup.state), "run", "--", "true"]
    start = time.perf_counter_ns()
    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    took = time.perf_counter_ns() - start
    if done.returncode != 0:
        return took, f"exit {done.returncode}: {done.stderr.decode()!r}"
    return took, None


def timed_api_run(sup: Supervisor, role: str) -> tuple[int, int | None]:
    """``run -- true`` through the API, timed until its stream is consumed:
    (nanoseconds, exit code)."""
    start = time.perf_counter_ns()
    code = sup.run_true(role)
    return time.perf_counter_ns() - start, code


def cli_and_api(cli: dict[str, Any], api: dict[str, Any]) -> dict[str, Any]:
    """The CLI's and the API's run summaries, and the CLI start-up share of p50."""
    return {
        "cli": cli,
        "api": api,
        "cli_startup_share_p50_ms": round(cli["p50_ms"] - api["p50_ms"], 3),
    }


def supervisor_stopped(sup: Supervisor, out: dict[str, Any], *, say: bool = True) -> None:
    """SIGTERM, and the time the supervisor takes to stop, in ``out`` (and printed
    when ``say``); it must exit 0."""
    code, took = sup.terminate(STOP_TIMEOUT)
    out["stop_s"] = round(took, 3)
    out["stop_exit_code"] = code
    if say:
        print(f"  stopped in {took:.2f} s (exit {code})", flush=True)
    if code != 0:
        raise BenchError(f"the supervisor exited {code} after SIGTERM; log:\n{sup.tail()}")


# ---------------------------------------------------------------- signals


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Turn SIGTERM into an exception so that every cleanup runs."""

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGTERM and SIGINT back while a cleanup runs; they arrive after it."""
    held = {signal.SIGTERM, signal.SIGINT}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# ---------------------------------------------------------------- a whole bench


def _shown(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def new_results(params: dict[str, Any], machine: dict[str, Any]) -> dict[str, Any]:
    """The head of the results: command line, date, parameters, machine facts."""
    return {
        "command": shlex.join([_shown(sys.executable), *sys.argv]),
        "argv": sys.argv,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "params": params,
        "machine": machine,
    }


def run_parts(
    results: dict[str, Any],
    parts: Callable[[Path], None],
    *,
    prefix: str,
    keep: bool,
    hold_signals: bool = False,
) -> int:
    """Run ``parts`` in a fresh work directory with SIGTERM turned into an exception;
    the error, if any, goes to ``results``. The work directory is removed afterwards
    (under ``signals_held`` with ``hold_signals``) unless ``keep``. Returns 0, 1 on
    an error, 130 when interrupted."""
    status = 0
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        with sigterm_interrupts():
            parts(workdir)
    except (KeyboardInterrupt, Interrupted) as exc:
        results["error"] = f"interrupted ({one_line(exc)})"
        status = 130
    except Exception as exc:
        results["error"] = one_line(exc)
        status = 1
    finally:
        with signals_held() if hold_signals else contextlib.nullcontext():
            if keep:
                print(f"work directory kept: {workdir}", flush=True)
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    return status


def finish(
    results: dict[str, Any],
    status: int,
    *,
    parts: Sequence[str],
    started: float,
    path: Path,
    table: Callable[[dict[str, Any]], str],
) -> int:
    """Gather the leftovers of ``parts`` (anything left makes a 0 status 1), write
    the results to ``path`` as JSON and print ``table(results)``. Returns the status."""
    left: dict[str, list[str]] = {}
    for part in parts:
        for key, value in results.get(part, {}).get("leftovers", {}).items():
            left.setdefault(key, []).extend(value)
    results["leftovers"] = left
    if left and status == 0:
        status = 1
    results["total_s"] = round(time.perf_counter() - started, 1)
    results["exit_status"] = status
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print()
    print(table(results))
    print(f"\nwritten to {path.relative_to(Path(__file__).resolve().parent.parent)}")
    return status


# ---------------------------------------------------------------- report


def machine_row(m: dict[str, Any]) -> tuple[str, str]:
    return (
        "machine",
        f"{m['nproc']} CPUs, {m['cpu_model']}, {m['memory_gib']} GiB, Linux {m['kernel']}",
    )


def isolation_row(m: dict[str, Any]) -> tuple[str, str]:
    iso = (
        "on (netns + cgroups)"
        if m["netns"] and m["cgroups"]
        else f"netns {'on' if m['netns'] else 'off'}, cgroups {'on' if m['cgroups'] else 'off'}"
    )
    return ("isolation", iso)


def stop_row(label: str, s: dict[str, Any]) -> tuple[str, str]:
    """The row of a graceful stop that ``supervisor_stopped`` recorded in ``s``."""
    return (label, f"{s['stop_s']:.2f} s (exit {s['stop_exit_code']})")


def render_table(
    results: dict[str, Any], head: list[tuple[str, str]], rows: list[tuple[str, str]]
) -> str:
    """``head``, a rule, then ``rows`` and what was left behind (and the error, if any)."""
    rows = list(rows)
    left = {k: v for k, v in results.get("leftovers", {}).items() if v}
    rows.append(("left behind", "nothing" if not left else json.dumps(left)))
    if results.get("error"):
        rows.append(("ERROR", results["error"]))
    width = max(len(k) for k, _ in head + rows)
    lines = [f"{k:<{width}}  {v}" for k, v in head]
    lines.append("-" * (width + 40))
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)
