"""Chaos runs of fireclaw-swarm: what the README promises, tested by breaking things.

Not a timed test: a program that runs for minutes against a real
``fireclaw-swarm up`` subprocess (readiness by sd_notify ``READY=1``, state
awaited with the status long-poll) and prints what it saw. The config is the
default ``swarm.yaml``'s (managed IRC on, on a free port of its own; default
heartbeats: 2 s, missed for 10 s means crashed; three attempts per task) with
one role, ``chaos``, from the ``worker`` template: two idle VMs, four at work
at most, and a harness that takes a little time (half a second between a
``start`` and an ``end`` line). Its ``max_restarts`` is raised to 1000: at
five crashes in ten minutes the circuit breaker would (rightly) stop restarting
the VMs a minute into a kill storm, and the run would measure the breaker
instead of the recovery. Backoff stays as it is (1 s doubling to 60 s, jitter,
at once after 10 s of readiness).

Throughout every scenario tasks go in at a steady rate (``--rate`` per second)
through the real CLI, ``fireclaw-swarm task chaos PROMPT``, each prompt unique.
A task the CLI got an id for is *accepted*; one it was refused (the supervisor
down, the disk full) is *refused* and owed nothing.

1. ``vm-kill``: in calm, one idle VM is killed and its replacement timed (the
   floor); then ``kill -9`` of a random VM process (on qemu: QEMU itself) once a
   second for ``--minutes``. Recovery: a killed VM's slot idle again with
   another process.
2. ``supervisor-kill``: ``kill -9`` of the supervisor every 30 to 60 s for
   ``--minutes``, started again at once as systemd would (same config, same
   state dir). Recovery: the restart to READY=1 and to the pool full again,
   beside a clean start's in the same run.
3. ``ircd-disk-stop``: in a loop for ``--minutes``: ``kill -9`` of the managed
   ngircd (recovery: running again with a new pid, and accepting on its port);
   the state dir, a small tmpfs this program mounts, filled to the last byte
   for 20 s and freed (recovery: the next task accepted; the pool full);
   ``SIGSTOP`` of an idle VM for the heartbeat timeout plus 5 s, then
   ``SIGCONT`` (seen as crashed after: the heartbeat timeout is the floor;
   recovery: its slot idle again).

After each scenario the submissions stop, the queue drains (every accepted
task done or failed), and then it is checked that no accepted task was lost
(every one done, or failed with a reason) and none was done twice. A second
execution is detected from the work itself, not from the state: on the
process backend the harness appends ``start``/``end`` lines with the prompt
to a log in this program's work directory; on qemu (where the harness runs
inside the guest) from the events, one ``task_done`` per execution that ran to
its end, and the task's output, which must hold its own ``end`` line. Then
``fireclaw-swarm down``; what the instance left behind is counted as
``tests/swarmctl.py`` counts it (namespaces, cgroups, guest and QEMU
processes, links, nft tables, overlays, sockets, run dirs) and by
``fireclaw-swarm doctor``, whose lines for this instance are printed (other
swarms on the host are not counted). Anything left is reported, then removed
with ``fireclaw-swarm gc``.

Run (from the repository root, as root: VMs run in network namespaces, and
the tmpfs is mounted)::

    .venv/bin/python bench/chaos.py                       # 10 minutes a scenario, both backends
    .venv/bin/python bench/chaos.py --minutes 2
    .venv/bin/python bench/chaos.py --backends process --scenarios vm-kill --minutes 1

Results are printed and written to ``bench/results/chaos.json``. Exit status:
0 when no task was lost or doubled and nothing was left behind, 1 otherwise
(or when a scenario could not run), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import (
    STOP_TIMEOUT,
    BenchError,
    Supervisor,
    finish,
    free_port,
    machine_facts,
    machine_row,
    new_results,
    one_line,
    render_table,
    run_parts,
    signals_held,
    summary_ms,
)
from fireclaw.pool.runtime import instance_id
from fireclaw.supervisor.client import ApiError
from qemu_driver import TEST_CACHE, backend_facts

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from swarmctl import leftovers as swarm_leftovers  # noqa: E402  (tests/ is not a package)

RESULTS = HERE / "results" / "chaos.json"
ROLE = "chaos"
MIN_IDLE = 2
MAX_ACTIVE = 4
HEARTBEAT_TIMEOUT = 10.0  # swarm.yaml's default
STABLE_AFTER = 10.0  # the worker template's
SCENARIOS = ("vm-kill", "supervisor-kill", "ircd-disk-stop")
BACKENDS = ("process", "qemu")
# Its own subnet, away from the tests' and the other benchmarks'.
QEMU_SUBNET = "10.246.7.0/24"


class Backend:
    """What differs between the two backends: boot timeouts, the harness, the waits."""

    def __init__(self, name: str, images: Path) -> None:
        self.name = name
        self.images = images if name == "qemu" else None
        qemu = name == "qemu"
        # TCG on two shared cores: a first image build and a template boot precede READY=1.
        self.start_timeout = 900.0 if qemu else 60.0
        self.boot_timeout = 120.0 if qemu else 30.0
        # Generous: the queue drains after minutes of chaos on a loaded machine.
        self.drain_timeout = 1200.0 if qemu else 300.0
        self.pool_timeout = 600.0 if qemu else 120.0
        self.tmpfs_mib = 1024 if qemu else 64  # qemu: the template's 256 MiB RAM file is there

    def harness(self, log: Path) -> str:
        """The harness's shell script: a start line, half a second of work, an end line.

        On the process backend the lines go to ``log`` (the harness runs on this
        host), on qemu to the task's output."""
        out = f">> {log}" if self.name == "process" else ""
        return (
            f'echo "start $FIRECLAW_PROMPT $FIRECLAW_AGENT $(date +%s.%N)" {out}; sleep 0.5;'
            f' echo "end $FIRECLAW_PROMPT $FIRECLAW_AGENT $(date +%s.%N)" {out};'
            ' echo "end $FIRECLAW_PROMPT"'
        )


def swarm_yaml(backend: Backend, *, irc_port: int, log: Path) -> str:
    network = f"network:\n  subnet: {QEMU_SUBNET}\n" if backend.name == "qemu" else ""
    script = backend.harness(log).replace("'", "''")
    return (
        f"version: 1\nbackend: {backend.name}\n{network}"
        "control:\n  heartbeat_interval: 2\n"
        f"  heartbeat_timeout: {HEARTBEAT_TIMEOUT:g}\n"
        f"  boot_timeout: {backend.boot_timeout:g}\n"
        "task_max_attempts: 3\n"
        "irc:\n  enabled: true\n  server: managed\n"
        f"  managed: {{listen: 127.0.0.1, port: {irc_port}}}\n"
        "roles:\n"
        f"  {ROLE}:\n"
        "    template: worker\n"
        f"    pool: {{min_idle: {MIN_IDLE}, max_active: {MAX_ACTIVE}}}\n"
        "    resources: {vcpus: 1, memory_mib: 256}\n"
        "    restart: {max_restarts: 1000}\n"
        "    harness:\n"
        "      kind: command\n"
        f"      command: [sh, -c, '{script}']\n"
        "      timeout: 60\n"
    )


# ---------------------------------------------------------------- the swarm


class ChaosSwarm(Supervisor):
    """A supervisor whose state dir may be a tmpfs of its own (mounted here) and
    whose ``images`` folder may be a link to the shared image cache."""

    def __init__(
        self, root: Path, config_text: str, images: Path | None, tmpfs_mib: int | None
    ) -> None:
        root.mkdir(parents=True)
        super().__init__(root, config_text)
        self.state.mkdir()
        self.mounted = False
        if tmpfs_mib is not None:
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={tmpfs_mib}m,mode=0755", "tmpfs", self.state],
                check=True,
                capture_output=True,
            )
            self.mounted = True
        if images is not None:
            images.mkdir(parents=True, exist_ok=True)
            (self.state / "images").symlink_to(images, target_is_directory=True)
        self.baseline = swarm_leftovers(self.state)
        self.unexpected_exits: list[str] = []
        #: (wall clock, what was signalled, pid, signal) of every blow dealt.
        self.blows: list[tuple[float, str, int, str]] = []

    def blow(self, what: str, pid: int, sig: int) -> None:
        """``sig`` to ``pid`` (``what`` it is), recorded; ProcessLookupError if it is gone."""
        os.kill(pid, sig)
        self.blows.append((time.time(), what, pid, signal.Signals(sig).name))

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def keep_up(self, timeout: float) -> None:
        """Start the supervisor again if it exited on its own (as systemd's
        ``Restart=always`` would), recording that it did."""
        if self.proc is not None and not self.running():
            code = self.proc.returncode
            self.unexpected_exits.append(f"exit {code} at {time.strftime('%H:%M:%S')}")
            print(f"  the supervisor exited by itself ({code}): starting it again", flush=True)
            self.start(timeout)

    def quiet_status(self) -> dict[str, Any] | None:
        """/status, or None while nothing answers (the supervisor down or restarting)."""
        try:
            return self.status()
        except (ApiError, OSError):
            return None

    def unmount(self) -> str | None:
        """Unmount the state dir's tmpfs; what went wrong, or None."""
        if not self.mounted:
            return None
        done = subprocess.run(["umount", self.state], capture_output=True, text=True)
        if done.returncode != 0:
            return done.stderr.strip() or f"umount exit {done.returncode}"
        self.mounted = False
        return None


def role_of(st: dict[str, Any]) -> dict[str, Any]:
    r: dict[str, Any] = st["roles"][ROLE]
    return r


def pool_full(st: dict[str, Any]) -> bool:
    return bool(role_of(st)["idle"] >= MIN_IDLE)


def settled_pool(st: dict[str, Any]) -> bool:
    """A full pool whose idle VMs have been ready for longer than ``stable_after``."""
    idle = [a for a in vms(st) if a["state"] == "idle" and a["for"] > STABLE_AFTER + 1]
    return len(idle) >= MIN_IDLE


def vms(st: dict[str, Any]) -> list[dict[str, Any]]:
    return [a for a in st["agents"] if a["role"] == ROLE]


class Watcher(threading.Thread):
    """Long-polls /status and hands every status to ``on_status``; rides out the
    supervisor being down (it answers again after a restart)."""

    def __init__(self, sup: ChaosSwarm, on_status: Callable[[dict[str, Any], float], None]):
        super().__init__(daemon=True)
        self.sup, self.on_status = sup, on_status
        self.done = threading.Event()

    def run(self) -> None:
        version: int | None = None
        while not self.done.is_set():
            try:
                target = "/status" if version is None else f"/status?since={version}&wait=2"
                st = self.sup.api.get(target, timeout=10)
            except (ApiError, OSError):
                version = None
                self.done.wait(0.1)  # nothing answers: the supervisor is restarting
                continue
            version = st["version"]
            self.on_status(st, time.monotonic())

    def stop(self) -> None:
        self.done.set()
        self.join(15)


class Slots:
    """Times from a VM's kill (or stop) to its slot being idle again with another process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: dict[str, tuple[float, int]] = {}
        self.samples: list[float] = []
        self.events: list[tuple[str, float]] = []

    def hit(self, name: str, pid: int, at: float) -> None:
        with self.lock:
            self.pending.setdefault(name, (at, pid))

    def on_status(self, st: dict[str, Any], now: float) -> None:
        with self.lock:
            for a in vms(st):
                hit = self.pending.get(a["name"])
                if hit is not None and a["state"] == "idle" and a["pid"] != hit[1]:
                    self.samples.append(now - hit[0])
                    self.events.append((a["name"], now))
                    del self.pending[a["name"]]

    def wait_recovered(self, name: str, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if name not in self.pending:
                    return self.samples[-1]
            time.sleep(0.05)
        return None


# ---------------------------------------------------------------- tasks


class Submitter(threading.Thread):
    """``fireclaw-swarm task chaos PROMPT`` at a steady rate, each prompt unique."""

    def __init__(self, sup: ChaosSwarm, rate: float, tag: str) -> None:
        super().__init__(daemon=True)
        self.sup, self.period, self.tag = sup, 1.0 / rate, tag
        self.accepted: dict[str, int] = {}
        self.refused: collections.Counter[str] = collections.Counter()
        self.accepted_at: list[float] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        n = 0
        next_at = time.monotonic()
        while not self.stopping.wait(max(0.0, next_at - time.monotonic())):
            next_at += self.period
            prompt = f"{self.tag}-{n:05d}"
            n += 1
            try:
                done = self.sup.cli("task", ROLE, prompt, timeout=30)
            except subprocess.TimeoutExpired:
                self.refused["the CLI did not answer within 30 s"] += 1
                continue
            if done.returncode == 0 and done.stdout.strip().isdigit():
                self.accepted[prompt] = int(done.stdout.strip())
                self.accepted_at.append(time.monotonic())
            else:
                why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
                self.refused[re.sub(r"\b\d+\b", "N", why)[:160]] += 1

    def stop(self) -> None:
        self.stopping.set()
        self.join(60)


def tally(
    sup: ChaosSwarm, sub: Submitter, backend: Backend, log: Path, out: dict[str, Any]
) -> None:
    """Lost, doubled, failed (and why) among the accepted tasks, from their rows,
    the events and, on the process backend, the harness's own log."""
    rows: dict[str, dict[str, Any]] = {}
    missing: list[str] = []
    for prompt, task_id in sub.accepted.items():
        try:
            rows[prompt] = sup.api.get(f"/tasks/{task_id}")
        except ApiError as exc:
            missing.append(f"{prompt} (task {task_id}): {exc}")
    events = sup.new_events()
    by_id = {task_id: prompt for prompt, task_id in sub.accepted.items()}
    done_events: collections.Counter[str] = collections.Counter()
    claims: collections.Counter[str] = collections.Counter()
    for e in events:
        which = by_id.get(e["detail"].get("task_id", -1))
        if which is None:
            continue
        if e["kind"] == "task_done":
            done_events[which] += 1
        elif e["kind"] == "task_claimed":
            claims[which] += 1
    starts: collections.Counter[str] = collections.Counter()
    ends: collections.Counter[str] = collections.Counter()
    lines: dict[str, list[str]] = collections.defaultdict(list)
    if backend.name == "process":
        with contextlib.suppress(FileNotFoundError):
            for line in log.read_text().splitlines():
                word, prompt, *_ = line.split() + ["", ""]
                (starts if word == "start" else ends)[prompt] += 1
                lines[prompt].append(line)
        executions = ends
    else:
        executions = done_events
    states = collections.Counter(r["state"] for r in rows.values())
    unfinished = [
        f"{p}: {r['state']}" for p, r in rows.items() if r["state"] not in ("done", "failed")
    ]
    failed = {p: r for p, r in rows.items() if r["state"] == "failed"}
    no_reason = [p for p, r in failed.items() if not (r.get("result") or "").strip()]
    reasons = collections.Counter(
        (r.get("result") or "").strip().splitlines()[-1][:120]
        if (r.get("result") or "").strip()
        else "(none)"
        for r in failed.values()
    )
    done = {p: r for p, r in rows.items() if r["state"] == "done"}
    unproven = [p for p, r in done.items() if f"end {p}" not in (r.get("result") or "")]
    if backend.name == "process":
        unproven += [p for p in done if ends[p] == 0]
    doubled = sorted(p for p, n in executions.items() if n > 1)
    out.update(
        submitted=len(sub.accepted) + sum(sub.refused.values()),
        accepted=len(sub.accepted),
        refused=sum(sub.refused.values()),
        refused_why=dict(sub.refused.most_common(5)),
        done=states["done"],
        failed=states["failed"],
        failed_why=dict(reasons.most_common(5)),
        failed_without_reason=no_reason,
        lost=missing + unfinished,
        duplicated=doubled,
        duplicated_detail={
            p: doubled_detail(p, lines[p], claims_of(events, sub, p), sup.blows)
            for p in doubled[:10]
        },
        done_without_execution=sorted(set(unproven))[:10],
        retried=sum(1 for n in claims.values() if n > 1),
        interrupted_executions=sum(max(0, starts[p] - ends[p]) for p in starts),
        event_kinds=dict(collections.Counter(e["kind"] for e in events).most_common()),
    )


def claims_of(events: list[dict[str, Any]], sub: Submitter, prompt: str) -> list[str]:
    """The task events of ``prompt``'s task, one line each (wall clock, kind, VM, reason)."""
    task_id = sub.accepted[prompt]
    return [
        f"{e['at']:.3f} {e['kind']} {e['subject']} {e['detail'].get('reason', '')}".rstrip()
        for e in events
        if e["detail"].get("task_id") == task_id or e["subject"] == f"task-{task_id}"
    ]


def doubled_detail(
    prompt: str,
    harness: list[str],
    task_events: list[str],
    blows: list[tuple[float, str, int, str]],
) -> dict[str, Any]:
    """What tells how a task came to run twice: the harness's own lines (with the
    time each was written), its task's events, and the blows dealt within two
    seconds of them."""
    stamps = [x.split()[-1] for x in harness] + [x.split()[0] for x in task_events]
    times = [float(t) for t in stamps if re.fullmatch(r"\d+\.\d+", t)] or [0.0]
    near = [
        f"{t:.3f} {sig} {what} (pid {pid})"
        for t, what, pid, sig in blows
        if min(times) - 2 <= t <= max(times) + 2
    ]
    return {"harness": harness, "events": task_events, "blows": near}


def drain(sup: ChaosSwarm, backend: Backend, out: dict[str, Any]) -> None:
    """Wait until no accepted task is queued or claimed (restarting a supervisor
    that exited by itself on the way)."""
    t0 = time.monotonic()
    deadline = t0 + backend.drain_timeout
    while True:
        sup.keep_up(backend.start_timeout)
        try:
            sup.wait_for(
                "the queue to drain",
                lambda st: st["tasks"].get("queued", 0) + st["tasks"].get("claimed", 0) == 0,
                max(1.0, deadline - time.monotonic()),
            )
            break
        except BenchError:
            if sup.running() or time.monotonic() >= deadline:
                out["drain_error"] = f"the queue did not drain in {backend.drain_timeout:g} s"
                break
    out["drain_s"] = round(time.monotonic() - t0, 1)


# ---------------------------------------------------------------- what is left


def doctor_lines(sup: ChaosSwarm) -> tuple[int, list[str]]:
    """``doctor``'s exit status and its lines about this instance (not others')."""
    done = sup.cli("--config", str(sup.config), "doctor", timeout=300)
    mine: list[str] = []
    for line in done.stdout.splitlines():
        if line.startswith("others"):
            break
        mine.append(line)
    mine += [line for line in done.stdout.splitlines() if line.startswith(("problem", "cannot"))]
    return done.returncode, mine


def doctor_clean(lines: list[str]) -> bool:
    """No leftovers of this instance and no problem in ``doctor``'s lines."""
    left = [line for line in lines if line.startswith("leftovers")]
    bad = [line for line in lines if line.startswith(("problem", "cannot check"))]
    return bool(left) and left[0].split(None, 1)[1] == "none" and not bad


def shut_down(sup: ChaosSwarm, out: dict[str, Any]) -> None:
    """``down`` through the CLI, wait for the supervisor to exit, then count what
    the instance left and remove it with ``gc``."""
    if sup.running():
        t0 = time.monotonic()
        done = sup.cli("down", timeout=STOP_TIMEOUT)
        assert sup.proc is not None
        try:
            code: int | None = sup.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
        out["down"] = {
            "cli_exit": done.returncode,
            "supervisor_exit": code,
            "s": round(time.monotonic() - t0, 1),
        }
    sup.close()
    left = {k: v for k, v in swarm_leftovers(sup.state, sup.baseline).items() if v}
    status, lines = doctor_lines(sup)
    out["leftovers"] = left
    out["doctor_exit"] = status
    out["doctor"] = lines
    out["doctor_clean"] = doctor_clean(lines)
    if left or not out["doctor_clean"]:
        print(f"  LEFT BEHIND: {left}; doctor:\n    " + "\n    ".join(lines), flush=True)
        gc = sup.cli("gc", timeout=300)
        out["gc"] = (gc.stdout + gc.stderr).strip().splitlines()[-10:]
        if not out["doctor_clean"]:
            out["leftovers"].setdefault("doctor", [x for x in lines if x.startswith(" ")])
    problem = sup.unmount()
    if problem is not None:
        out["leftovers"].setdefault("tmpfs", []).append(f"{sup.state}: {problem}")


# ---------------------------------------------------------------- the scenarios


def start_clean(sup: ChaosSwarm, backend: Backend, out: dict[str, Any]) -> None:
    """The floor: a clean start to READY=1 and to a full pool."""
    t0 = time.monotonic()
    sup.start(backend.start_timeout)
    out["clean_ready_s"] = round(time.monotonic() - t0, 2)
    sup.wait_for("a full pool", pool_full, backend.pool_timeout)
    out["clean_pool_s"] = round(time.monotonic() - t0, 2)
    out.update(backend_facts(sup.status()))
    print(
        f"  clean start: READY=1 in {out['clean_ready_s']:.2f} s, pool full in"
        f" {out['clean_pool_s']:.2f} s ({out['backend']})",
        flush=True,
    )


def kill_one(
    sup: ChaosSwarm, sig: int, states: tuple[str, ...], rng: random.Random
) -> tuple[str, int] | None:
    """``sig`` to a random VM of the role in one of ``states``; (name, pid) or None."""
    st = sup.quiet_status()
    if st is None:
        return None
    targets = [a for a in vms(st) if a["pid"] and a["state"] in states]
    if not targets:
        return None
    vm = rng.choice(targets)
    try:
        sup.blow(vm["name"], vm["pid"], sig)
    except ProcessLookupError:
        return None
    return vm["name"], vm["pid"]


def calm_kill(sup: ChaosSwarm, backend: Backend, out: dict[str, Any]) -> None:
    """The floor of ``vm-kill``, before any task: one idle VM killed in calm, ready
    long enough (``stable_after``) to be restarted at once rather than after a
    backoff, and the time until its slot is idle again."""
    slots = Slots()
    watcher = Watcher(sup, slots.on_status)
    watcher.start()
    try:
        sup.wait_for("a full pool of settled VMs", settled_pool, backend.pool_timeout)
        hit = kill_one(sup, signal.SIGKILL, ("idle",), random.Random())
        if hit is None:
            raise BenchError("no idle VM to kill for the floor")
        slots.hit(hit[0], hit[1], time.monotonic())
        floor = slots.wait_recovered(hit[0], backend.pool_timeout)
    finally:
        watcher.stop()
    if floor is None:
        raise BenchError(
            f"{hit[0]}, killed in calm, was not idle again in {backend.pool_timeout:g} s"
        )
    out["calm_replacement_s"] = round(floor, 3)
    print(f"  calm: a killed idle VM was idle again after {floor:.2f} s", flush=True)


def vm_kill(sup: ChaosSwarm, backend: Backend, minutes: float, out: dict[str, Any]) -> None:
    rng = random.Random()
    slots = Slots()
    watcher = Watcher(sup, slots.on_status)
    watcher.start()
    try:
        kills = missed = 0
        end = time.monotonic() + minutes * 60
        while time.monotonic() < end:
            sup.keep_up(backend.start_timeout)
            t = time.monotonic()
            hit = kill_one(sup, signal.SIGKILL, ("idle", "promoting", "active", "restoring"), rng)
            if hit is None:
                missed += 1
            else:
                kills += 1
                slots.hit(hit[0], hit[1], t)
            time.sleep(max(0.0, t + 1.0 - time.monotonic()))  # the kill rate: once a second
        t_last = time.monotonic()
        st = sup.wait_for("a full pool after the kills", pool_full, backend.pool_timeout)
        out["pool_full_after_last_kill_s"] = round(time.monotonic() - t_last, 2)
        out["kills"] = kills
        out["kill_misses"] = missed
        # A slot killed again before its replacement was idle counts once.
        out["kills_survived"] = len(slots.samples)
        out["restarts_seen"] = sum(a["restarts"] for a in vms(st))
        with slots.lock:
            out["replacement"] = (
                summary_ms([s * 1000 for s in slots.samples]) if slots.samples else None
            )
            out["not_replaced_before_next_kill"] = len(slots.pending)
    finally:
        watcher.stop()


def supervisor_kill(sup: ChaosSwarm, backend: Backend, minutes: float, out: dict[str, Any]) -> None:
    rng = random.Random()
    ready: list[float] = []
    pool: list[float] = []
    kills = 0
    end = time.monotonic() + minutes * 60
    while True:
        wait = rng.uniform(30, 60)
        if time.monotonic() + wait > end:
            break
        time.sleep(wait)
        sup.keep_up(backend.start_timeout)
        sup.blows.append((time.time(), "supervisor", sup.pid, "SIGKILL"))
        sup.kill9()
        kills += 1
        t0 = time.monotonic()
        sup.start(backend.start_timeout)  # at once, as systemd's Restart=always
        ready.append(time.monotonic() - t0)
        sup.wait_for("a full pool after a restart", pool_full, backend.pool_timeout)
        pool.append(time.monotonic() - t0)
        print(
            f"  kill -9 #{kills}: READY=1 after {ready[-1]:.2f} s, pool full after"
            f" {pool[-1]:.2f} s",
            flush=True,
        )
    out["kills"] = kills
    out["kills_survived"] = len(pool)
    out["restart_ready"] = summary_ms([s * 1000 for s in ready]) if ready else None
    out["restart_pool"] = summary_ms([s * 1000 for s in pool]) if pool else None


def ircd_pid(st: dict[str, Any]) -> tuple[str, int | None]:
    managed = st["irc"].get("managed") or {}
    return str(managed.get("state")), managed.get("pid")


def ircd_replaced(pid: int) -> Callable[[dict[str, Any]], bool]:
    """ngircd running again, in another process than ``pid``."""
    return lambda st: ircd_pid(st)[0] == "running" and ircd_pid(st)[1] not in (None, pid)


def no_longer_idle(name: str, pid: int) -> Callable[[dict[str, Any]], bool]:
    """VM ``name`` is no longer the idle process ``pid``."""
    return lambda st: any(
        a["name"] == name and (a["pid"] != pid or a["state"] != "idle") for a in vms(st)
    )


def irc_accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=5):
        return True
    return False


def fill(path: Path) -> int:
    """Write ``path`` until the file system is full; the bytes written."""
    chunk = b"\0" * (1 << 20)
    written = 0
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                written += f.write(chunk)
            except OSError:
                break
        # The last partial chunk: the file system to its last byte.
        for size in (1 << 16, 1 << 12, 1):
            while True:
                try:
                    written += f.write(chunk[:size])
                except OSError:
                    break
    return written


def ircd_disk_stop(
    sup: ChaosSwarm,
    backend: Backend,
    minutes: float,
    out: dict[str, Any],
    sub: Submitter,
    irc_port: int,
) -> None:
    rng = random.Random()
    slots = Slots()
    watcher = Watcher(sup, slots.on_status)
    watcher.start()
    ircd: list[float] = []
    ircd_port_ok = 0
    disk_fills: list[dict[str, Any]] = []
    stops: list[dict[str, Any]] = []
    end = time.monotonic() + minutes * 60
    try:
        while time.monotonic() < end:
            # 1. ngircd
            sup.keep_up(backend.start_timeout)
            _, pid = ircd_pid(sup.status())
            if pid:
                sup.blow("ngircd", pid, signal.SIGKILL)
                t0 = time.monotonic()
                sup.wait_for("ngircd running again", ircd_replaced(pid), 120)
                ircd.append(time.monotonic() - t0)
                ircd_port_ok += irc_accepts(irc_port)
            # 2. the disk full
            sup.keep_up(backend.start_timeout)
            big = sup.state / "filler"
            t0 = time.monotonic()
            size = fill(big)
            sup.blows.append((time.time(), "state dir", 0, "FILLED"))
            refused0 = sum(sub.refused.values())
            accepted0 = len(sub.accepted)
            time.sleep(20)
            answered = sup.quiet_status() is not None
            big.unlink()
            freed = time.monotonic()
            sup.blows.append((time.time(), "state dir", 0, "FREED"))
            item: dict[str, Any] = {
                "filled_mib": round(size / 2**20, 1),
                "refused_while_full": sum(sub.refused.values()) - refused0,
                "accepted_while_full": len(sub.accepted) - accepted0,
                "status_answered_while_full": answered,
            }
            sup.keep_up(backend.start_timeout)
            n = len(sub.accepted_at)
            deadline = freed + 60
            while time.monotonic() < deadline and not [t for t in sub.accepted_at[n:] if t > freed]:
                time.sleep(0.05)
            after = [t for t in sub.accepted_at[n:] if t > freed]
            item["first_accepted_after_free_s"] = round(after[0] - freed, 2) if after else None
            sup.wait_for("a full pool after the disk", pool_full, backend.pool_timeout)
            item["pool_full_after_free_s"] = round(time.monotonic() - freed, 2)
            item["full_for_s"] = round(freed - t0, 1)
            disk_fills.append(item)
            print(f"  disk full: {item}", flush=True)
            # 3. SIGSTOP of a guest
            sup.keep_up(backend.start_timeout)
            sup.wait_for("a full pool", pool_full, backend.pool_timeout)
            hit = kill_one(sup, signal.SIGSTOP, ("idle",), rng)
            if hit is not None:
                name, pid = hit
                t0 = time.monotonic()
                slots.hit(name, pid, t0)
                seen = sup.wait_for(
                    f"{name} seen as not idle", no_longer_idle(name, pid), HEARTBEAT_TIMEOUT * 6
                )
                detected = time.monotonic() - t0
                state = next((a["state"] for a in vms(seen) if a["name"] == name), "gone")
                time.sleep(max(0.0, t0 + HEARTBEAT_TIMEOUT + 5 - time.monotonic()))
                with contextlib.suppress(ProcessLookupError):
                    sup.blow(name, pid, signal.SIGCONT)
                back = slots.wait_recovered(name, backend.pool_timeout)
                stops.append(
                    {
                        "vm": name,
                        "detected_s": round(detected, 2),
                        "seen_as": state,
                        "replaced_s": None if back is None else round(back, 2),
                    }
                )
                print(f"  SIGSTOP: {stops[-1]}", flush=True)
    finally:
        watcher.stop()
    out["ircd_kills"] = len(ircd)
    out["ircd_recovered"] = summary_ms([s * 1000 for s in ircd]) if ircd else None
    out["ircd_port_accepting_after"] = ircd_port_ok
    out["disk_fills"] = disk_fills
    out["sigstops"] = stops
    out["kills"] = len(ircd) + len(disk_fills) + len(stops)
    out["kills_survived"] = (
        sum(1 for _ in ircd)
        + sum(1 for d in disk_fills if d["first_accepted_after_free_s"] is not None)
        + sum(1 for s in stops if s["replaced_s"] is not None)
    )


def run_scenario(
    args: argparse.Namespace, workdir: Path, backend: Backend, name: str, out: dict[str, Any]
) -> None:
    root = workdir / f"{backend.name}-{name}"
    harness_log = workdir / f"{backend.name}-{name}.executions"
    harness_log.touch(mode=0o666)
    irc_port = free_port()
    config = swarm_yaml(backend, irc_port=irc_port, log=harness_log)
    sup = ChaosSwarm(
        root,
        config,
        backend.images,
        backend.tmpfs_mib if name == "ircd-disk-stop" else None,
    )
    out["instance"] = instance_id(sup.state)
    out["irc_port"] = irc_port
    sub = Submitter(sup, args.rate if backend.name == "process" else args.rate / 2, f"{name}")
    t0 = time.monotonic()
    try:
        start_clean(sup, backend, out)
        if name == "vm-kill":
            calm_kill(sup, backend, out)
        sub.start()
        if name == "vm-kill":
            vm_kill(sup, backend, args.minutes, out)
        elif name == "supervisor-kill":
            supervisor_kill(sup, backend, args.minutes, out)
        else:
            ircd_disk_stop(sup, backend, args.minutes, out, sub, irc_port)
        sub.stop()
        drain(sup, backend, out)
        tally(sup, sub, backend, harness_log, out)
        out["unexpected_supervisor_exits"] = sup.unexpected_exits
    except Exception:
        print(f"  supervisor log (tail):\n{sup.tail()}", file=sys.stderr, flush=True)
        raise
    finally:
        sub.stopping.set()
        with signals_held():
            shut_down(sup, out)
        out["wall_s"] = round(time.monotonic() - t0, 1)
    print_scenario(backend.name, name, out)


# ---------------------------------------------------------------- report


def _ms(s: dict[str, Any] | None) -> str:
    if not s:
        return "none measured"
    return (
        f"p50 {s['p50_ms'] / 1000:.2f} / max {s['max_ms'] / 1000:.2f} s (n={s['n']},"
        f" min {s['min_ms'] / 1000:.2f})"
    )


def scenario_rows(backend: str, name: str, o: dict[str, Any]) -> list[tuple[str, str]]:
    p = f"{backend} {name}"
    rows = [(p, f"{o.get('wall_s', '?')} s; {o.get('backend', '')}")]
    if "clean_ready_s" in o:
        rows.append(
            (
                "  floor: clean start",
                f"READY {o['clean_ready_s']:.2f} s, pool full {o['clean_pool_s']:.2f} s",
            )
        )
    if "kills" in o:
        rows.append(
            ("  kills done / recovered from", f"{o['kills']} / {o.get('kills_survived', '?')}")
        )
    if name == "vm-kill" and "replacement" in o:
        rows += [
            ("  floor: calm kill to replacement idle", f"{o['calm_replacement_s']} s"),
            ("  kill to replacement idle", _ms(o["replacement"])),
            ("  killed again before replaced", str(o["not_replaced_before_next_kill"])),
            ("  pool full after the last kill", f"{o['pool_full_after_last_kill_s']} s"),
        ]
    if name == "supervisor-kill" and "restart_ready" in o:
        rows += [
            ("  restart to READY=1", _ms(o["restart_ready"])),
            ("  restart to pool full", _ms(o["restart_pool"])),
        ]
    if name == "ircd-disk-stop" and "disk_fills" in o:
        rows.append(
            (
                "  ngircd kill to running again",
                f"{_ms(o['ircd_recovered'])}; port accepting after"
                f" {o['ircd_port_accepting_after']} of them",
            )
        )
        for d in o["disk_fills"]:
            rows.append(
                (
                    "  disk full",
                    f"{d['full_for_s']} s ({d['filled_mib']} MiB):"
                    f" refused {d['refused_while_full']},"
                    f" accepted {d['accepted_while_full']}; next accepted after"
                    f" {d['first_accepted_after_free_s']} s, pool full after"
                    f" {d['pool_full_after_free_s']} s",
                )
            )
        for s in o["sigstops"]:
            rows.append(
                (
                    "  SIGSTOP of a guest",
                    f"seen {s['seen_as']} after {s['detected_s']} s (floor: heartbeat timeout"
                    f" {HEARTBEAT_TIMEOUT:g} s); idle again after {s['replaced_s']} s",
                )
            )
    if "accepted" in o:
        rows += [
            (
                "  tasks submitted / accepted / refused",
                f"{o['submitted']} / {o['accepted']} / {o['refused']}",
            ),
            (
                "  tasks done / failed / lost / duplicated",
                f"{o['done']} / {o['failed']} / {len(o['lost'])} / {len(o['duplicated'])}",
            ),
            (
                "  retried / interrupted executions",
                f"{o['retried']} / {o['interrupted_executions']}",
            ),
        ]
        if o["failed_why"]:
            rows.append(
                ("  failed because", "; ".join(f"{k} x{v}" for k, v in o["failed_why"].items()))
            )
        if o["refused_why"]:
            rows.append(
                ("  refused because", "; ".join(f"{k} x{v}" for k, v in o["refused_why"].items()))
            )
    if "doctor_exit" in o:
        left = o.get("leftovers") or {}
        rows.append(
            (
                "  left behind (swarmctl / doctor)",
                f"{'nothing' if not left else left}; doctor on this instance:"
                f" {'clean' if o['doctor_clean'] else 'NOT CLEAN'} (exit {o['doctor_exit']})",
            )
        )
    if o.get("unexpected_supervisor_exits"):
        rows.append(("  supervisor exited by itself", ", ".join(o["unexpected_supervisor_exits"])))
    if o.get("error"):
        rows.append(("  ERROR", o["error"]))
    return rows


def print_scenario(backend: str, name: str, o: dict[str, Any]) -> None:
    width = 44
    for k, v in scenario_rows(backend, name, o):
        print(f"{k:<{width}}{v}", flush=True)
    for line in o.get("doctor", []):
        print(f"    doctor: {line}", flush=True)


def keys(results: dict[str, Any]) -> list[str]:
    """The scenario runs of ``results``: ``backend:scenario``."""
    params = results["params"]
    return [f"{b}:{n}" for b in params["backends"] for n in params["scenarios"]]


def table(results: dict[str, Any]) -> str:
    head = [
        ("command", results["command"]),
        machine_row(results["machine"]),
        ("date", results["date"]),
        ("wall time", f"{results['total_s']:.0f} s"),
    ]
    rows: list[tuple[str, str]] = []
    for key in keys(results):
        if key in results:
            backend, name = key.split(":")
            rows += scenario_rows(backend, name, results[key])
    rows += [("PROBLEM", p) for p in results.get("problems", [])]
    return render_table(results, head, rows)


def verdict(results: dict[str, Any]) -> list[str]:
    """What makes the run fail besides leftovers: lost, doubled or unproven tasks,
    failures with no reason, scenarios that could not run."""
    bad = []
    for key in keys(results):
        o = results.get(key, {})
        for field in ("lost", "duplicated", "failed_without_reason", "done_without_execution"):
            if o.get(field):
                bad.append(f"{key}: {field} {o[field][:5]}")
        if o.get("error"):
            bad.append(f"{key}: {o['error']}")
    return bad


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Chaos runs of fireclaw-swarm (see the docstring)."
    )
    parser.add_argument(
        "--minutes", type=float, default=10.0, help="chaos per scenario (default 10)"
    )
    parser.add_argument(
        "--rate", type=float, default=1.0, help="tasks per second (default 1; half on qemu)"
    )
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help="process,qemu (default both)"
    )
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=",".join(SCENARIOS))
    parser.add_argument(
        "--images", type=Path, default=TEST_CACHE, help="the guest image cache (qemu)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory afterwards")
    args = parser.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    for b in args.backends:
        if b not in BACKENDS:
            parser.error(f"--backends: unknown backend {b!r} (known: {', '.join(BACKENDS)})")
    for s in args.scenarios:
        if s not in SCENARIOS:
            parser.error(f"--scenarios: unknown scenario {s!r} (known: {', '.join(SCENARIOS)})")
    if args.minutes <= 0 or args.rate <= 0:
        parser.error("--minutes and --rate must be > 0")
    args.images = args.images.expanduser().resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    results = new_results(
        {
            "minutes": args.minutes,
            "rate": args.rate,
            "backends": args.backends,
            "scenarios": args.scenarios,
        },
        machine_facts(),
    )

    def parts(workdir: Path) -> None:
        if os.geteuid() != 0:
            raise BenchError("VMs run in network namespaces and the tmpfs is mounted: run as root")
        os.chmod(workdir, 0o755)
        for b in args.backends:
            backend = Backend(b, args.images)
            for name in args.scenarios:
                print(f"[{b} {name}] {args.minutes:g} min of chaos", flush=True)
                out: dict[str, Any] = {}
                results[f"{b}:{name}"] = out
                try:
                    run_scenario(args, workdir, backend, name, out)
                except BenchError as exc:
                    out["error"] = one_line(exc)
                    print(f"  ERROR: {out['error']}", flush=True)

    status = run_parts(results, parts, prefix="fcchaos-", keep=args.keep, hold_signals=True)
    results["problems"] = verdict(results)
    if results["problems"] and status == 0:
        status = 1
    return finish(results, status, parts=keys(results), started=started, path=RESULTS, table=table)


if __name__ == "__main__":
    sys.exit(main())
