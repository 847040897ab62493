"""Benchmark of fireclaw-swarm on the ``process`` driver: claims, runs, an idle fleet.

What it measures, on this machine:

1. Claim latency. An in-process ``RoleGroup`` built like the supervisor builds
   it (a real ``Runtime`` with the ``ProcessDriver``, a real ``Store`` in a
   temporary directory, a network namespace and a cgroup per VM exactly when
   the supervisor would use them) keeps a warm pool of 16 VMs. The pool is
   filled first; then for each claim the bench waits, untimed, until at least
   one VM is idle (``group.wait_changed()``), times ``await group.claim()``
   alone with ``time.perf_counter_ns`` and retires the VM. Reported: p50, p99
   and max, and the wall time of the whole series (it includes the waits for
   replacement VMs to boot, which is what bounds the claim rate).
2. ``run -- true`` latency. Against a real ``fireclaw-swarm up`` subprocess
   (readiness by sd_notify ``READY=1``; a role with ``min_idle: 4``), each run
   waits, untimed, until the pool is full and quiet again (4 idle, nothing
   booting: status long-poll), then times
   ``fireclaw-swarm --state-dir S run -- true`` from spawn to exit: the
   operator's end-to-end, the CLI's Python start-up included. Interleaved with
   those, the same number of runs through ``ApiClient.stream("/run")``, timed
   until the stream is consumed, give the latency without the CLI start-up.
   Every run must exit 0.
3. An idle fleet. The same supervisor is scaled to 200 VMs (``POST /scale``);
   the bench reports how long the pool took to reach 200 idle (and 90% of
   it), with the restarts and the crash reasons the event log gives for VMs
   that failed to boot meanwhile. Then, after a 5 s settle, it measures the
   supervisor's RSS and its CPU use over a 30 s window at rest (cpu_times
   delta / wall, in % of one core; the default 2 s heartbeats keep it busy),
   the guests' RSS (sum and mean; PSS sum too, since RSS counts shared pages
   once per guest) and their CPU over the same window. Finally it
   sends SIGTERM and times the graceful stop of the supervisor and its VMs.

Percentiles are nearest-rank. Each part runs under a role name of its own
(``bench-claim-<pid>``, ``bench-run-<pid>``), so what it leaves behind can be
told apart from anything else on the host: after each part the bench checks
that no guest process of that role (``FIRECLAW_TOKEN`` in its environment),
no ``/run/netns/fireclaw-<role>-*`` namespace and no cgroup of it is left; if
anything is, it is reported, removed, and the exit status is 1. Every exit
path (an error, Ctrl-C, SIGTERM) stops the VMs and the supervisor, killing the
supervisor if it does not stop in time.

Results are printed (a table at the end, with the command line and machine
facts) and written to ``bench/results/process_driver.json``.

Run (from the repository root)::

    make bench                                    # .venv/bin/python bench/process_driver.py
    .venv/bin/python bench/process_driver.py --quick
    .venv/bin/python bench/process_driver.py --claims 1000 --runs 100 --idle 200

``--quick`` means ``--claims 100 --runs 20 --idle 40 --window 10``; flags given
explicitly win. A count of 0 skips that part (``--runs 0 --idle 0`` skips the
supervisor). ``--keep`` keeps the work directory (configs, the supervisor's
and the guests' logs) instead of removing it.

Both configs use the ``worker`` template with the default control and stop
settings (heartbeats every 2 s), except ``boot_timeout: 120``: a fleet booting
at once shares a few cores, and one boot takes far longer than alone.

Exit status: 0 when every figure was measured, every run exited 0 and nothing
was left behind; 1 otherwise; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import trio
from common import (
    CLI_RUN_SHOWN,
    STOP_TIMEOUT,
    BenchError,
    Interrupted,
    Supervisor,
    check_clean,
    cli_and_api,
    fill_defaults,
    finish,
    isolation_leftovers,
    isolation_row,
    machine_facts,
    machine_row,
    new_results,
    remove_isolation,
    render_table,
    run_parts,
    stop_row,
    summary_ms,
    supervised,
    supervisor_stopped,
    timed_api_run,
    timed_cli_run,
)
from fireclaw.config import parse_config
from fireclaw.pool import cgroup, netns
from fireclaw.pool.drivers import ProcessDriver
from fireclaw.pool.group import RoleGroup
from fireclaw.pool.lifecycle import State
from fireclaw.pool.runtime import Runtime
from fireclaw.supervisor.state import Store

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "process_driver.json"

CLAIM_POOL = 16
RUN_POOL = 4
MAX_ACTIVE = 4096
SETTLE_S = 5.0
# Boots of a whole fleet at once share a few cores: far above one boot's time.
BOOT_TIMEOUT = 120.0
FILL_TIMEOUT = 900.0


def swarm_yaml(role: str, *, min_idle: int, control: str) -> str:
    return (
        "version: 1\nbackend: process\n"
        f"control:\n{control}"
        "roles:\n"
        f"  {role}:\n"
        "    template: worker\n"
        f"    pool: {{min_idle: {min_idle}, max_active: {MAX_ACTIVE}}}\n"
        # The shipped worker asks a model; what is measured here is the VMs, so the
        # role's tasks echo, as the worker did before it thought.
        "    harness: {kind: command, command: [sh, -c, 'echo \"$FIRECLAW_PROMPT\"']}\n"
    )


# ---------------------------------------------------------------- what a role leaves behind


def _environ(pid: int) -> dict[bytes, bytes]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.split(b"=", 1) for kv in raw.split(b"\0") if b"=" in kv)


def guest_pids(role: str) -> list[int]:
    """Processes with FIRECLAW_TOKEN in their environment that belong to ``role``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        env = _environ(int(entry))
        if b"FIRECLAW_TOKEN" in env and env.get(b"FIRECLAW_ROLE") == role.encode():
            found.append(int(entry))
    return found


def leftovers(role: str, state: Path | None = None) -> dict[str, list[str]]:
    """Guest processes, namespaces, cgroups (and API/guest sockets) ``role`` left."""
    found = {"guest_processes": [str(p) for p in guest_pids(role)], **isolation_leftovers(role)}
    if state is not None:
        found["sockets"] = sorted(p.name for p in state.glob("*.sock"))
    return {k: v for k, v in found.items() if v}


def sweep(role: str) -> None:
    """Remove whatever ``role`` left: kill its guests, drop its namespaces and cgroups."""
    for pid in guest_pids(role):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    remove_isolation(role)


def check_role_clean(role: str, state: Path | None, out: dict[str, Any]) -> None:
    check_clean(role, lambda: leftovers(role, state), lambda: sweep(role), out)


# ---------------------------------------------------------------- 1. claim latency


def bench_claims(n: int, workdir: Path, out: dict[str, Any]) -> None:
    role_name = f"bench-claim-{os.getpid()}"
    out["role"] = role_name
    out["pool_min_idle"] = CLAIM_POOL
    root = workdir / "claims"
    state = root / "state"
    root.mkdir()
    text = swarm_yaml(role_name, min_idle=CLAIM_POOL, control=f"  boot_timeout: {BOOT_TIMEOUT:g}\n")
    config = parse_config(text, path=root / "swarm.yaml")
    store = Store.open(state / "swarm.db")
    try:
        rt = Runtime(
            driver=ProcessDriver(),
            store=store,
            state_dir=state,
            control=config.control,
            stop=config.stop,
            isolate_net=netns.probe() is None,
            use_cgroups=cgroup.probe() is None,
            on_event=lambda kind, subject, detail: store.event(kind, subject, **detail),
        )
        out["isolate_net"], out["use_cgroups"] = rt.isolate_net, rt.use_cgroups
        out["heartbeat_interval_s"] = config.control.heartbeat_interval
        group = RoleGroup(
            config.roles[role_name], rt, max_attempts=config.task_max_attempts, scale=None
        )
        print(
            f"[1/3] claim latency: {n} claims from a warm pool of {CLAIM_POOL} (in-process)",
            flush=True,
        )
        trio.run(_claims_main, group, n, out)
    finally:
        store.close()
        check_role_clean(role_name, None, out)
    if out.get("interrupted"):
        raise Interrupted("a signal arrived during the claims")


async def _claims_main(group: RoleGroup, n: int, out: dict[str, Any]) -> None:
    samples: list[int] = []
    boot_timeout = group.rt.control.boot_timeout
    async with trio.open_nursery() as nursery:
        await nursery.start(group.run)
        nursery.start_soon(_watch_signals, nursery.cancel_scope, out)
        try:
            t0 = time.perf_counter()
            with trio.move_on_after(FILL_TIMEOUT) as scope:
                await _wait_idle(group, CLAIM_POOL)
            if scope.cancelled_caught:
                raise BenchError(f"the pool did not fill in {FILL_TIMEOUT:g}s: {group.counts()}")
            out["pool_fill_s"] = round(time.perf_counter() - t0, 3)
            waited = 0
            t0 = time.perf_counter()
            for i in range(n):
                if _idle(group) == 0:
                    waited += 1
                    with trio.move_on_after(boot_timeout) as scope:
                        await _wait_idle(group, 1)
                    if scope.cancelled_caught:
                        raise BenchError(f"no idle VM within {boot_timeout:g}s: {group.counts()}")
                with trio.fail_after(boot_timeout):
                    start = time.perf_counter_ns()
                    child = await group.claim()
                    samples.append(time.perf_counter_ns() - start)
                group.retire(child, "bench")
                if (i + 1) % max(1, n // 10) == 0:
                    print(f"  {i + 1}/{n} claims", flush=True)
            out["wall_s"] = round(time.perf_counter() - t0, 3)
            out["claims_that_waited_for_a_boot"] = waited
            out.update(summary_ms([s / 1e6 for s in samples], digits=4))
            out["samples_ms"] = [round(s / 1e6, 4) for s in samples]
        finally:
            with trio.CancelScope(shield=True):
                t0 = time.perf_counter()
                with trio.move_on_after(STOP_TIMEOUT) as scope:
                    await group.stop_all("bench done")
                out["stop_all_s"] = round(time.perf_counter() - t0, 3)
                out["stop_all_timed_out"] = scope.cancelled_caught
            nursery.cancel_scope.cancel()


def _idle(group: RoleGroup) -> int:
    return sum(1 for c in group.pool_children() if c.state is State.IDLE)


async def _wait_idle(group: RoleGroup, n: int) -> None:
    while _idle(group) < n:
        if group.degraded:
            raise BenchError(f"role {group.name} is degraded: {group.counts()}")
        await group.wait_changed()


async def _watch_signals(scope: trio.CancelScope, out: dict[str, Any]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            out["interrupted"] = True
            scope.cancel()
            return


# ---------------------------------------------------------------- what the supervisor waits for


def role_idle(role: str, n: int) -> Callable[[dict[str, Any]], bool]:
    return lambda st: role in st["roles"] and st["roles"][role]["idle"] >= n


def pool_settled(role: str, n: int) -> Callable[[dict[str, Any]], bool]:
    """The pool is full and quiet: ``n`` idle, nothing booting, busy or draining.

    A run measured while the previous run's replacement is still booting would
    share the CPU with that boot; this is the warm pool an operator meets."""

    def settled(st: dict[str, Any]) -> bool:
        counts = st["roles"].get(role)
        return (
            counts is not None
            and counts["idle"] >= n
            and not (counts["starting"] or counts["active"] or counts["draining"])
        )

    return settled


# ---------------------------------------------------------------- 2. run -- true


def bench_runs(sup: Supervisor, role: str, n: int, out: dict[str, Any]) -> None:
    print(f"[2/3] run -- true: {n} runs through the CLI, {n} through the API", flush=True)
    out["cli_command"] = CLI_RUN_SHOWN
    cli: list[int] = []
    api: list[int] = []
    failures: list[str] = []
    t0 = time.perf_counter()
    for i in range(n):
        sup.wait_for("a settled pool", pool_settled(role, RUN_POOL), BOOT_TIMEOUT)
        took, problem = timed_cli_run(sup, timeout=120)
        cli.append(took)
        if problem is not None:
            failures.append(f"cli run {i}: {problem}")

        sup.wait_for("a settled pool", pool_settled(role, RUN_POOL), BOOT_TIMEOUT)
        took, code = timed_api_run(sup, role)
        api.append(took)
        if code != 0:
            failures.append(f"api run {i}: exit {code}")
        if (i + 1) % max(1, n // 5) == 0:
            print(f"  {i + 1}/{n} runs", flush=True)
    out["wall_s"] = round(time.perf_counter() - t0, 3)
    out.update(
        cli_and_api(
            summary_ms([s / 1e6 for s in cli], digits=4, samples=True),
            summary_ms([s / 1e6 for s in api], digits=4, samples=True),
        )
    )
    out["failures"] = failures
    if failures:
        raise BenchError(f"{len(failures)} runs did not exit 0: {failures[:3]}")


# ---------------------------------------------------------------- 3. an idle fleet


def crashes(sup: Supervisor, role: str, since: float) -> list[str]:
    """What the event log says about VMs of ``role`` that crashed after ``since``
    (among the events not read yet: all of them at the first call)."""
    return [
        f"{e['subject']} {e['kind']}: {e['detail'].get('reason')}"
        for e in sup.new_events()
        if e["kind"] in ("crashed", "failed")
        and e["at"] >= since
        and e["subject"].startswith(f"{role}-")
    ]


def _guests(sup_pid: int, role: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.Process(sup_pid).children(recursive=True):
        env = _environ(proc.pid)
        if b"FIRECLAW_TOKEN" in env and env.get(b"FIRECLAW_ROLE") == role.encode():
            found.append(proc)
    return found


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def bench_idle(sup: Supervisor, role: str, n: int, window: float, out: dict[str, Any]) -> None:
    print(f"[3/3] idle fleet: scale to {n}, {window:g} s at rest, then SIGTERM", flush=True)
    curve: list[tuple[float, int]] = []
    step = max(1, n // 10)

    def seen(st: dict[str, Any]) -> None:
        idle = st["roles"][role]["idle"]
        if not curve or idle // step > curve[-1][1] // step:
            curve.append((round(time.perf_counter() - t0, 2), idle))
            print(f"  {idle:>4} idle at {curve[-1][0]:6.1f} s", flush=True)

    t0 = time.perf_counter()
    sup.api.post("/scale", {"role": role, "n": n})
    st = sup.wait_for(f"{n} idle VMs", role_idle(role, n), FILL_TIMEOUT, seen)
    out["fill_s"] = round(time.perf_counter() - t0, 3)
    out["fill_curve_s_idle"] = curve
    out["fill_90pct_s"] = next(t for t, idle in curve if idle * 10 >= n * 9)
    out["restarts_after_fill"] = sum(a["restarts"] for a in st["agents"] if a["role"] == role)
    out["crashes_during_fill"] = crashes(sup, role, since=time.time() - out["fill_s"] - 1)
    for crash in out["crashes_during_fill"]:
        print(f"  crash: {crash}", flush=True)
    print(f"  {n} idle after {out['fill_s']:.1f} s", flush=True)

    time.sleep(SETTLE_S)
    me = psutil.Process(sup.pid)
    guests = _guests(sup.pid, role)
    cpu0 = _cpu(me)
    guest_cpu0 = {g.pid: _cpu(g) for g in guests}
    w0 = time.perf_counter()
    time.sleep(window)
    wall = time.perf_counter() - w0
    cpu1 = _cpu(me)
    guest_cpu = 0.0
    for g in guests:
        with contextlib.suppress(psutil.NoSuchProcess):
            guest_cpu += _cpu(g) - guest_cpu0[g.pid]
    rss = me.memory_info().rss
    guest_rss: list[int] = []
    guest_pss = 0
    for g in guests:
        with contextlib.suppress(psutil.NoSuchProcess):
            info = g.memory_full_info()
            guest_rss.append(info.rss)
            guest_pss += info.pss
    counts = sup.api.get("/status")["roles"][role]
    out.update(
        settle_s=SETTLE_S,
        window_s=round(wall, 3),
        idle_at_end=counts["idle"],
        supervisor_rss_mib=round(rss / 2**20, 1),
        supervisor_cpu_pct_of_one_core=round((cpu1 - cpu0) / wall * 100, 2),
        guests_found=len(guests),
        guests_alive_at_end=len(guest_rss),
        guest_rss_sum_mib=round(sum(guest_rss) / 2**20, 1),
        guest_rss_mean_mib=round(sum(guest_rss) / max(1, len(guest_rss)) / 2**20, 2),
        guest_pss_sum_mib=round(guest_pss / 2**20, 1),
        guest_cpu_pct_of_one_core=round(guest_cpu / wall * 100, 2),
    )
    print(
        f"  supervisor {out['supervisor_rss_mib']} MiB RSS,"
        f" {out['supervisor_cpu_pct_of_one_core']}% CPU;"
        f" {len(guest_rss)} guests {out['guest_rss_sum_mib']} MiB RSS",
        flush=True,
    )
    if len(guests) != n or counts["idle"] != n:
        raise BenchError(f"expected {n} idle guests, found {len(guests)} ({counts})")

    supervisor_stopped(sup, out)


def bench_supervisor(args: argparse.Namespace, workdir: Path, results: dict[str, Any]) -> None:
    role = f"bench-run-{os.getpid()}"
    root = workdir / "swarm"
    root.mkdir()
    # Default heartbeats (2 s / 10 s) and stop bounds; a long boot timeout for the fill.
    text = swarm_yaml(role, min_idle=RUN_POOL, control=f"  boot_timeout: {BOOT_TIMEOUT:g}\n")
    sup = Supervisor(root, text)
    info: dict[str, Any] = {"role": role, "pool_min_idle": RUN_POOL}
    results["supervisor"] = info
    with supervised(sup, lambda: check_role_clean(role, sup.state, info)):
        t0 = time.perf_counter()
        sup.start()
        info["ready_s"] = round(time.perf_counter() - t0, 3)
        st = sup.wait_for(f"{RUN_POOL} idle VMs", role_idle(role, RUN_POOL), FILL_TIMEOUT)
        info["first_pool_s"] = round(time.perf_counter() - t0, 3)
        info["isolation"] = st["isolation"]
        if args.runs > 0:
            results["run"] = {}
            bench_runs(sup, role, args.runs, results["run"])
        if args.idle > 0:
            results["idle"] = {"n": args.idle}
            bench_idle(sup, role, args.idle, args.window, results["idle"])


# ---------------------------------------------------------------- report


def _ms3(s: dict[str, Any], digits: int) -> str:
    return f"{s['p50_ms']:.{digits}f} / {s['p99_ms']:.{digits}f} / {s['max_ms']:.{digits}f} ms"


def table(results: dict[str, Any]) -> str:
    m = results["machine"]
    head = [
        ("command", results["command"]),
        machine_row(m),
        ("python", m["python"]),
        ("root", "yes" if m["root"] else "no"),
        isolation_row(m),
        ("date", results["date"]),
        ("bench wall time", f"{results['total_s']:.1f} s"),
    ]
    rows: list[tuple[str, str]] = []
    c = results.get("claims", {})
    if "p50_ms" in c:
        rows += [
            (f"claim latency p50 / p99 / max (n={c['n']})", _ms3(c, 4)),
            (
                "claims: total wall time",
                f"{c['wall_s']:.2f} s"
                f" ({c['n'] / c['wall_s']:.1f} claims/s; "
                f"{c['claims_that_waited_for_a_boot']} waited for a boot)",
            ),
            (
                f"claims: first fill of {c['pool_min_idle']} / stop_all",
                f"{c['pool_fill_s']:.2f} s / {c['stop_all_s']:.2f} s",
            ),
        ]
    r = results.get("run", {})
    if "cli" in r:
        rows += [
            (f"run -- true, CLI p50 / p99 / max (n={r['cli']['n']})", _ms3(r["cli"], 1)),
            (f"run -- true, API p50 / p99 / max (n={r['api']['n']})", _ms3(r["api"], 1)),
            (
                "run: CLI start-up share (p50 CLI - p50 API)",
                f"{r['cli_startup_share_p50_ms']:.1f} ms",
            ),
            ("run: exit codes", "all 0" if not r["failures"] else f"{len(r['failures'])} not 0"),
        ]
    i = results.get("idle", {})
    if "stop_s" in i or "supervisor_rss_mib" in i:
        n = i["n"]
        rows += [
            (
                f"fill from {RUN_POOL} to {n} idle VMs",
                f"{i['fill_s']:.2f} s (90% idle at {i['fill_90pct_s']:.2f} s;"
                f" {i['restarts_after_fill']} restarts)",
            ),
            (f"supervisor RSS, {n} idle VMs", f"{i['supervisor_rss_mib']:.1f} MiB"),
            (
                f"supervisor CPU, {n} idle, {i['window_s']:.0f} s window",
                f"{i['supervisor_cpu_pct_of_one_core']:.2f} % of one core",
            ),
            (
                f"guest RSS sum / mean ({i['guests_found']} guests)",
                f"{i['guest_rss_sum_mib']:.1f} MiB / {i['guest_rss_mean_mib']:.2f} MiB",
            ),
            ("guest PSS sum", f"{i['guest_pss_sum_mib']:.1f} MiB"),
            ("guest CPU, same window", f"{i['guest_cpu_pct_of_one_core']:.2f} % of one core"),
        ]
        if i["crashes_during_fill"]:
            first = i["crashes_during_fill"][0].split(": ", 1)[-1]
            rows.append(
                ("crashes during the fill", f"{len(i['crashes_during_fill'])}, e.g. {first}")
            )
        if "stop_s" in i:
            rows.append(stop_row(f"graceful stop (SIGTERM) of {n} VMs", i))
    return render_table(results, head, rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark fireclaw-swarm's process driver (see the module docstring)."
    )
    parser.add_argument("--claims", type=int, help="claims to time (default 1000)")
    parser.add_argument("--runs", type=int, help="`run -- true` to time (default 100)")
    parser.add_argument("--idle", type=int, help="idle VMs for the fleet figures (default 200)")
    parser.add_argument("--window", type=float, help="CPU window at rest, seconds (default 30)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (configs, logs) afterwards"
    )
    parser.add_argument(
        "--quick", action="store_true", help="--claims 100 --runs 20 --idle 40 --window 10"
    )
    args = parser.parse_args(argv)
    fill_defaults(
        args,
        quick={"claims": 100, "runs": 20, "idle": 40, "window": 10.0},
        full={"claims": 1000, "runs": 100, "idle": 200, "window": 30.0},
    )
    if min(args.claims, args.runs, args.idle) < 0 or args.window <= 0:
        parser.error("counts must be >= 0 and --window > 0")
    if args.idle > 1000:
        parser.error("--idle: the supervisor scales a role to at most 1000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    results = new_results(
        {k: getattr(args, k) for k in ("claims", "runs", "idle", "window", "quick")},
        machine_facts(),
    )

    def parts(workdir: Path) -> None:
        if args.claims > 0:
            results["claims"] = {}
            bench_claims(args.claims, workdir, results["claims"])
        if args.runs > 0 or args.idle > 0:
            bench_supervisor(args, workdir, results)

    status = run_parts(results, parts, prefix="fcbench-", keep=args.keep)
    return finish(
        results,
        status,
        parts=("claims", "supervisor"),
        started=started,
        path=RESULTS,
        table=table,
    )


if __name__ == "__main__":
    sys.exit(main())
