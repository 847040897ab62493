"""Benchmark of fireclaw-swarm on the ``qemu`` driver: boots, restores, runs, memory.

Everything runs against a real ``fireclaw-swarm up`` subprocess with
``backend: qemu`` (readiness by sd_notify ``READY=1``, state changes awaited
with the status long-poll), under a role name of its own
(``bench-qemu-<pid>``) with the default resources (1 vCPU, 256 MiB), IRC off,
``heartbeat_timeout: 20`` and ``boot_timeout: 120`` (TCG on a few shared
cores). The accelerator QEMU uses (KVM or TCG) and the reason for it are
taken from the supervisor's status. What it measures, on this machine:

1. Cold boot to guest-connected. (a) The role's snapshot template: a VM
   cold-booted alone, with nothing else running, to *parked* (its guest said
   Hello, took the Welcome and sent its first heartbeat): ``boot_seconds`` of
   the ``template_made`` event, with the snapshot's size and time. (b) With
   ``--cold N``, a second supervisor whose templates cannot be made (its
   ``templates`` folder is a file, as in the tests) cold-boots the role's VMs
   one after another: ``ready_seconds`` of each VM whose status says
   ``started_as: booted`` (QEMU's start to the guest's Hello accepted). N VMs
   means the first pool VM, then N - 1 replacements, each forced by a
   ``run -- true`` once the previous one is idle.
2. Snapshot restore to guest-connected. The role keeps ``min_idle: --idle``
   clones. Once that pool is full and settled, each of ``--restores`` steps
   consumes one clone with ``run -- true`` (through the API, untimed) and waits
   until the pool is full and settled again; the ``seconds`` of the
   ``restored`` event of the replacement (QEMU's start with ``-incoming``,
   the state read, the host's Attach on the control port and the guest's
   Hello) is one sample. The restores of the first fill (several at once) and
   those that overlap the timed runs of part 3 are reported apart; the first
   fill also gives the refill rate (clones restored per second, from the
   template made to the last of them ready).
   The bare floor, in the same run: after each step, the pool settled again,
   one restore of the same snapshot that no supervisor takes part in (it runs
   in the bench's own process): the driver's restore (QEMU with
   ``-incoming``, the state loaded over QMP from the file QEMU inherits,
   ``cont``), Attach on the port, until the guest's Hello on it. Each in a
   fresh namespace (QEMU makes the tap) on a fresh overlay, both made before
   the clock starts. Interleaved, so that both run beside the same idle
   clones and under the same moment's load from the rest of the host (on a
   shared machine that load moves a lot within minutes). Printed with the
   ratio of restore-to-connected p50 to the floor's p50, and the p50 of the
   ratios of each restore to the floor sample right after it.
   Where the time goes: each ``restored`` event carries the marks its
   incarnation said on the way (``fireclaw.pool.steps``: the boot slot, the
   namespace, cgroup and overlay made, QEMU spawned, QMP answering, the state
   loaded, running, the cgroup joined, Attach said, the listeners open,
   Hello), and the floor says the same marks from the driver's restore on;
   the time between marks (p50 and max) goes into the results, and with
   ``--trace`` is printed, the supervised restore's beside the floor's.
3. ``run -- true`` from a warm pool. Before each run the bench waits, untimed,
   until the pool is full and settled (``--idle`` idle clones, nothing
   starting, nothing draining), then times
   ``fireclaw-swarm --state-dir S run -- true`` from spawn to exit (the CLI's
   Python start-up included); interleaved with those, the same number of runs
   through ``ApiClient.stream("/run")``, timed until the stream is consumed.
   Every run must exit 0. Each run consumes a clone, so the pool restores a
   replacement while the run ends: that restore competes for the CPU.
4. Memory per idle VM. With ``--idle`` idle clones and a 5 s settle: RSS,
   PSS and USS of each clone's QEMU process (psutil; QEMU runs under
   ``nsenter``, which execs it, so the VM's pid is QEMU's), their means, and
   the supervisor's RSS and PSS. A clone's RAM is its template's memory file
   mapped privately: pages it has not written are the page cache's, shared
   by every clone of that template (PSS counts them split), and only what it
   wrote is its own (USS). Finally SIGTERM, and the time the supervisor
   takes to stop.

Percentiles are nearest-rank (with 20 samples p99 is the largest). The image
is found or built in the image cache the tests use
(``~/.cache/fireclaw/test-images``, or ``--images DIR``): the state dir's
``images`` folder is a link there, so it is built once (about 40 s, included
in the first supervisor's time to READY=1) and not again. The state dirs
themselves are fresh each run, so the template is made, not reused.

After each supervisor has stopped the bench checks that nothing of its
instance (``instance_id`` of its state dir) is left: no QEMU process whose
command line names its state dir, no ``/run/netns/fireclaw-<instance>-*``
namespace, no cgroup ``<instance>-*``, no VM run directory and no API socket.
Anything left is reported and removed, and the exit status is 1. Every exit
path (an error, Ctrl-C, SIGTERM) stops the supervisor (SIGTERM, then SIGKILL
if it does not stop in time) and sweeps what it left.

Results are printed (a table at the end, with the command line, machine
facts and the accelerator) and written to ``bench/results/qemu_driver.json``.

Run (from the repository root, as root: VMs run in network namespaces)::

    .venv/bin/python bench/qemu_driver.py
    .venv/bin/python bench/qemu_driver.py --quick
    .venv/bin/python bench/qemu_driver.py --restores 50 --runs 50 --idle 8 --cold 5

Defaults: ``--restores 20 --runs 20 --idle 4 --cold 3``; ``--quick`` means
``--restores 5 --runs 5 --idle 2 --cold 1``; flags given explicitly win.
``--cold 0`` skips the second supervisor. ``--keep`` keeps the work directory
(configs, the supervisors' and the guests' logs). ``--trace`` prints each
restore's steps (above).

Exit status: 0 when every figure was measured, every run exited 0 and nothing
was left behind; 1 otherwise; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from common import (
    CLI_RUN_SHOWN,
    BenchError,
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
    one_line,
    percentile,
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
from fireclaw.pool import disks, network
from fireclaw.pool.runtime import instance_id
from fireclaw.supervisor import leftovers as stale

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "qemu_driver.json"
QEMU = "qemu-system-x86_64"
TEST_CACHE = Path.home() / ".cache" / "fireclaw" / "test-images"

MAX_ACTIVE = 64
MEMORY_MIB = 256
# A first image build (about a minute on a loaded host) happens before READY=1.
START_TIMEOUT = 900.0
# TCG on a few shared cores: one boot alone takes tens of seconds.
BOOT_TIMEOUT = 120.0
CONTROL = "  heartbeat_interval: 2\n  heartbeat_timeout: 20\n  boot_timeout: 120\n"
# The template's boot and the first restores, all under TCG.
POOL_TIMEOUT = 900.0
SETTLE_S = 5.0
RUN_TIMEOUT = 300.0


def swarm_yaml(role: str, *, min_idle: int, subnet: str) -> str:
    return (
        "version: 1\nbackend: qemu\n"
        "irc:\n  enabled: false\n"
        f"network:\n  subnet: {subnet}\n"
        f"control:\n{CONTROL}"
        "roles:\n"
        f"  {role}:\n"
        "    template: worker\n"
        f"    pool: {{min_idle: {min_idle}, max_active: {MAX_ACTIVE}}}\n"
        f"    resources: {{vcpus: 1, memory_mib: {MEMORY_MIB}}}\n"
        # The shipped worker asks a model; what is measured here is the VMs, so the
        # role's tasks echo, as the worker did before it thought.
        "    harness: {kind: command, command: [sh, -c, 'echo \"$FIRECLAW_PROMPT\"']}\n"
    )


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "unknown"


def qemu_machine_facts() -> dict[str, Any]:
    """The common machine facts, QEMU's version, /dev/kvm, KSM, THP and the load."""
    try:
        qemu_version = subprocess.run(
            [QEMU, "--version"], capture_output=True, text=True, timeout=30
        ).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError) as exc:
        qemu_version = f"unknown ({one_line(exc)})"
    ksm = _read("/sys/kernel/mm/ksm/run")
    return machine_facts() | {
        "qemu": qemu_version,
        "kvm_device": os.path.exists("/dev/kvm"),
        "ksm_run": ksm,
        "ksm": {"0": "off", "1": "on", "2": "off (unmerged)"}.get(ksm, ksm),
        "thp": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# ---------------------------------------------------------------- what a swarm leaves behind


def qemu_pids(state: Path) -> list[int]:
    """QEMU processes whose command line names ``state`` (their console log is there)."""
    marks = {str(state).encode(), str(state.resolve()).encode()}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"qemu-system") and any(m in cmdline for m in marks):
            found.append(int(entry))
    return found


def _run_dirs(state: Path) -> list[Path]:
    mine = instance_id(state)
    found = list((state / "logs" / "run").glob("*"))
    return found + list(Path(tempfile.gettempdir()).glob(f"fireclaw-{mine}-*"))


def leftovers(state: Path) -> dict[str, list[str]]:
    """QEMU processes, namespaces, links, nft tables, cgroups, overlays, run
    directories and sockets of ``state``'s instance that exist now."""
    mine = instance_id(state)
    found = {
        "qemu_processes": [str(p) for p in qemu_pids(state)],
        **isolation_leftovers(mine),
        "links": network.host_links(mine),
        "nft": [t for t in network.tables() if t.endswith(f"_{mine}")],
        "disks": [p.name for p in disks.leftovers(state / "disks")],
        "run_dirs": [str(p) for p in _run_dirs(state)],
        "sockets": sorted(p.name for p in state.glob("*.sock")),
    }
    return {k: v for k, v in found.items() if v}


def sweep(state: Path) -> None:
    """Remove whatever ``state``'s instance left: kill its QEMUs, drop its namespaces,
    cgroups and run directories."""
    mine = instance_id(state)
    for pid in qemu_pids(state):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while qemu_pids(state) and time.monotonic() < deadline:
        time.sleep(0.1)
    remove_isolation(mine)
    for removal in stale.remove(stale.find(state)):  # links, tables, overlays: as gc does
        print(f"  {removal}", flush=True)
    for path in _run_dirs(state):
        shutil.rmtree(path, ignore_errors=True)
    for path in state.glob("*.sock"):
        path.unlink(missing_ok=True)


def check_state_clean(state: Path, out: dict[str, Any]) -> None:
    if check_clean(str(state), lambda: leftovers(state), lambda: sweep(state), out):
        still = leftovers(state)
        if still:
            print(f"  STILL THERE after the sweep: {still}", flush=True)
            out["leftovers_after_sweep"] = still


# ---------------------------------------------------------------- a real supervisor


class QemuSupervisor(Supervisor):
    """``fireclaw-swarm up`` with ``backend: qemu`` in a subprocess, ready at READY=1.

    Its state dir's ``images`` folder is a link to ``images``; with
    ``no_templates`` its ``templates`` folder is a file, so no template can be made."""

    def __init__(
        self, root: Path, config_text: str, images: Path, *, no_templates: bool = False
    ) -> None:
        root.mkdir(parents=True)
        super().__init__(root, config_text)
        self.state.mkdir()
        images.mkdir(parents=True, exist_ok=True)
        (self.state / "images").symlink_to(images, target_is_directory=True)
        if no_templates:
            (self.state / "templates").write_text("a file where the folder should be\n")


def settled(role: str, n: int) -> Callable[[dict[str, Any]], bool]:
    """At least ``n`` idle VMs of ``role``, and none starting, busy or draining."""

    def pred(st: dict[str, Any]) -> bool:
        r = st["roles"].get(role)
        if r is None:
            return False
        if r["degraded"] or r["failed"]:
            raise BenchError(f"role {role} is degraded: {r}")
        return bool(
            r["idle"] >= n and r["starting"] == 0 and r["active"] == 0 and r["draining"] == 0
        )

    return pred


TROUBLE = frozenset({"crashed", "failed", "template_dropped", "template_failed"})


def trouble(events: list[dict[str, Any]], role: str, kinds: frozenset[str] = TROUBLE) -> list[str]:
    """Crashes, failures and templates dropped or not made, among ``events``."""
    return [
        f"{e['subject']} {e['kind']}: {e['detail'].get('reason')}"
        for e in events
        if e["kind"] in kinds
        and (e["subject"].startswith(f"{role}-") or e["subject"].startswith("template-"))
    ]


def restored_seconds(
    events: list[dict[str, Any]], role: str, field: str = "seconds"
) -> list[float]:
    """Of each ``restored`` event of ``role``: ``seconds`` (to connected) or
    ``vmm_seconds`` (of them, until QEMU ran with the state loaded)."""
    return [
        float(e["detail"][field])
        for e in events
        if e["kind"] == "restored" and e["detail"].get("role") == role
    ]


def restore_steps(events: list[dict[str, Any]], role: str) -> list[dict[str, float]]:
    """The ``steps`` of each ``restored`` event of ``role``: ms from the start of
    its incarnation to each mark (``fireclaw.pool.steps``)."""
    return [
        dict(e["detail"].get("steps") or {})
        for e in events
        if e["kind"] == "restored" and e["detail"].get("role") == role
    ]


def step_deltas(traces: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per mark, the p50 and max of the time since the mark before it (in the same
    trace), in ms, in the order the marks were said."""
    order: list[str] = []
    deltas: dict[str, list[float]] = {}
    for trace in traces:
        before = 0.0
        for name, at in trace.items():
            if name not in deltas:
                order.append(name)
                deltas[name] = []
            deltas[name].append(at - before)
            before = at
    return {
        name: {
            "p50_ms": round(percentile(deltas[name], 50), 1),
            "max_ms": round(max(deltas[name]), 1),
            "n": len(deltas[name]),
        }
        for name in order
    }


def print_steps(title: str, deltas: dict[str, dict[str, float]]) -> None:
    print(f"  {title}: time since the mark before, p50 (max) ms", flush=True)
    for name, d in deltas.items():
        print(f"    {name:<16} {d['p50_ms']:8.1f}  ({d['max_ms']:.1f}, n={d['n']})", flush=True)


def backend_facts(st: dict[str, Any]) -> dict[str, Any]:
    """The backend line of status, and the accelerator and its reason parsed from it."""
    backend = str(st["backend"])
    out: dict[str, Any] = {"backend": backend}
    inner = backend.removeprefix("auto: ")
    if inner.startswith("qemu (") and inner.endswith(")"):
        accel, _, reason = inner[len("qemu (") : -1].partition(": ")
        out["accel"], out["accel_reason"] = accel, reason
    return out


# ---------------------------------------------------------------- the warm pool


def bench_pool(args: argparse.Namespace, workdir: Path, results: dict[str, Any]) -> None:
    role = f"bench-qemu-{os.getpid()}"
    n_idle = args.idle
    config = swarm_yaml(role, min_idle=n_idle, subnet="10.246.1.0/24")
    sup = QemuSupervisor(workdir / "pool", config, args.images)
    info: dict[str, Any] = {"role": role, "pool_min_idle": n_idle, "memory_mib": MEMORY_MIB}
    results["pool"] = info
    with supervised(sup, lambda: check_state_clean(sup.state, info), hold_signals=True):
        print(f"[1/4] supervisor with a pool of {n_idle} clones: start, template, fill", flush=True)
        images_before = {p.name for p in args.images.iterdir() if p.is_dir()}
        t0 = time.perf_counter()
        sup.start(START_TIMEOUT)
        info["ready_s"] = round(time.perf_counter() - t0, 3)
        built = sorted({p.name for p in args.images.iterdir() if p.is_dir()} - images_before)
        info["image_built"] = built
        st = sup.status()
        info.update(backend_facts(st))
        info["isolation"] = st["isolation"]
        print(f"  READY=1 after {info['ready_s']:.1f} s; backend {info['backend']}", flush=True)
        if built:
            print(f"  (the image {built[0]} was built first)", flush=True)
        if not info["backend"].startswith("qemu ("):
            raise BenchError(f"the backend is not qemu: {info['backend']}")
        st = sup.wait_for(f"{n_idle} idle clones", settled(role, n_idle), POOL_TIMEOUT)
        info["first_pool_s"] = round(time.perf_counter() - t0, 3)
        info["start_line"] = st["roles"][role]["start"]
        events = sup.new_events()
        made = [e for e in events if e["kind"] == "template_made"]
        if len(made) != 1:
            raise BenchError(
                f"expected one template_made event, found {len(made)}: {info['start_line']};"
                f" {trouble(events, role)}"
            )
        detail = made[0]["detail"]
        results["template"] = {
            "subject": made[0]["subject"],
            "boot_to_parked_s": detail["boot_seconds"],
            "snapshot_s": detail["snapshot_seconds"],
            "total_s": detail["seconds"],
            "snapshot_mib": round(detail["size"] / 2**20, 1),
        }
        fill = restored_seconds(events, role)
        info["fill_restores_s"] = fill
        # Refill rate: the first fill, all at once from the moment the template is made.
        ends = [
            e["at"] for e in events if e["kind"] == "restored" and e["detail"].get("role") == role
        ]
        if ends and max(ends) > made[0]["at"]:
            info["refill_per_s"] = round(len(ends) / (max(ends) - made[0]["at"]), 2)
        info["fill_trouble"] = trouble(events, role)
        print(
            f"  template: cold boot to parked {detail['boot_seconds']:.2f} s, snapshot"
            f" {detail['size'] / 2**20:.1f} MiB in {detail['snapshot_seconds']:.2f} s;"
            f" {n_idle} clones idle after {info['first_pool_s']:.1f} s",
            flush=True,
        )
        if args.restores > 0:
            results["restore"] = {}
            floor = Floor(workdir, args.images)
            try:
                bench_restores(
                    sup, role, n_idle, args.restores, results["restore"], floor, trace=args.trace
                )
            finally:
                if floor.samples:
                    print(f"[+] bare floor: {len(floor.samples)} restores", flush=True)
                    results["floor"] = floor.report(results["restore"], trace=args.trace)
        if args.runs > 0:
            results["run"] = {}
            bench_runs(sup, role, n_idle, args.runs, results["run"])
        results["memory"] = {}
        bench_memory(sup, role, n_idle, results["memory"])
        supervisor_stopped(sup, info)


def bench_restores(
    sup: Supervisor,
    role: str,
    n_idle: int,
    n: int,
    out: dict[str, Any],
    floor: Floor,
    *,
    trace: bool,
) -> None:
    print(
        f"[2/4] restore to connected: {n} restores, one at a time, each followed by"
        " one of the bare floor",
        flush=True,
    )
    samples: list[float] = []
    vmm: list[float] = []
    traces: list[dict[str, float]] = []
    problems: list[str] = []
    t0 = time.perf_counter()
    for i in range(n):
        sup.wait_for("a full pool", settled(role, n_idle), POOL_TIMEOUT)
        sup.new_events()
        code = sup.run_true(role)
        if code != 0:
            problems.append(f"run {i} to consume a clone: exit {code}")
        sup.wait_for("a full pool", settled(role, n_idle), POOL_TIMEOUT)
        events = sup.new_events()
        found = restored_seconds(events, role)
        problems += trouble(events, role)
        if len(found) != 1:
            problems.append(f"step {i}: {len(found)} restored events")
        samples += found
        vmm += restored_seconds(events, role, "vmm_seconds")
        traces += restore_steps(events, role)
        floor.sample()  # the pool settled, as before this step's restore
        if (i + 1) % max(1, n // 5) == 0:
            print(f"  {i + 1}/{n} restores", flush=True)
    out["wall_s"] = round(time.perf_counter() - t0, 3)
    out["problems"] = problems
    if not samples:
        raise BenchError(f"no restore was seen: {problems[:3]}")
    out.update(summary_ms([s * 1000 for s in samples], samples=True))
    out["qemu_part"] = summary_ms([s * 1000 for s in vmm], samples=True)
    if traces:
        out["steps"] = step_deltas(traces)
        if trace:
            print_steps("supervised restore, from the incarnation's start", out["steps"])
    if problems:
        raise BenchError(f"{len(problems)} problems during the restores: {problems[:3]}")


def bench_runs(sup: Supervisor, role: str, n_idle: int, n: int, out: dict[str, Any]) -> None:
    print(f"[3/4] run -- true: {n} runs through the CLI, {n} through the API", flush=True)
    out["cli_command"] = CLI_RUN_SHOWN
    out["waited_for"] = f"{n_idle} idle, nothing starting, busy or draining"
    cli: list[float] = []
    api: list[float] = []
    failures: list[str] = []
    overlapped: list[float] = []
    t0 = time.perf_counter()
    for i in range(n):
        sup.wait_for("a full pool", settled(role, n_idle), POOL_TIMEOUT)
        overlapped += restored_seconds(sup.new_events(), role)
        took, problem = timed_cli_run(sup, timeout=RUN_TIMEOUT)
        cli.append(took / 1e6)
        if problem is not None:
            failures.append(f"cli run {i}: {problem}")

        sup.wait_for("a full pool", settled(role, n_idle), POOL_TIMEOUT)
        overlapped += restored_seconds(sup.new_events(), role)
        took, code = timed_api_run(sup, role)
        api.append(took / 1e6)
        if code != 0:
            failures.append(f"api run {i}: exit {code}")
        if (i + 1) % max(1, n // 5) == 0:
            print(f"  {i + 1}/{n} runs", flush=True)
    sup.wait_for("a full pool", settled(role, n_idle), POOL_TIMEOUT)
    overlapped += restored_seconds(sup.new_events(), role)
    out["wall_s"] = round(time.perf_counter() - t0, 3)
    out.update(cli_and_api(summary_ms(cli, samples=True), summary_ms(api, samples=True)))
    if overlapped:
        out["restores_during_runs"] = summary_ms([s * 1000 for s in overlapped], samples=True)
    out["failures"] = failures
    if failures:
        raise BenchError(f"{len(failures)} runs did not exit 0: {failures[:3]}")


def _mib(n: float) -> float:
    return round(n / 2**20, 1)


def bench_memory(sup: Supervisor, role: str, n_idle: int, out: dict[str, Any]) -> None:
    print(f"[4/4] memory: {n_idle} idle clones, {SETTLE_S:g} s settle, then SIGTERM", flush=True)
    sup.wait_for("a full pool", settled(role, n_idle), POOL_TIMEOUT)
    time.sleep(SETTLE_S)
    st = sup.wait_for("a full pool", settled(role, n_idle), POOL_TIMEOUT)
    agents = [a for a in st["agents"] if a["role"] == role and a["state"] == "idle"]
    per_vm: list[dict[str, Any]] = []
    for a in agents:
        try:
            proc = psutil.Process(a["pid"])
            name = proc.name()
            info = proc.memory_full_info()
        except psutil.Error as exc:
            raise BenchError(f"{a['name']} (pid {a['pid']}): {one_line(exc)}") from exc
        if not name.startswith("qemu-system"):
            raise BenchError(f"{a['name']}: pid {a['pid']} is {name}, not QEMU")
        per_vm.append(
            {
                "name": a["name"],
                "pid": a["pid"],
                "started_as": a["started_as"],
                "ready_seconds": a["ready_seconds"],
                "rss_mib": _mib(info.rss),
                "pss_mib": _mib(info.pss),
                "uss_mib": _mib(info.uss),
                "shared_mib": _mib(info.shared),
            }
        )
    if len(per_vm) != n_idle:
        raise BenchError(f"expected {n_idle} idle clones, found {len(per_vm)}")
    not_clones = [v["name"] for v in per_vm if not v["started_as"].startswith("restored ")]
    me = psutil.Process(sup.pid).memory_full_info()

    def mean(key: str) -> float:
        return round(float(sum(v[key] for v in per_vm)) / len(per_vm), 1)

    out.update(
        n=len(per_vm),
        per_vm=per_vm,
        not_restored=not_clones,
        rss_mean_mib=mean("rss_mib"),
        pss_mean_mib=mean("pss_mib"),
        uss_mean_mib=mean("uss_mib"),
        rss_sum_mib=round(sum(v["rss_mib"] for v in per_vm), 1),
        pss_sum_mib=round(sum(v["pss_mib"] for v in per_vm), 1),
        supervisor_rss_mib=_mib(me.rss),
        supervisor_pss_mib=_mib(me.pss),
    )
    out["rss_minus_pss_mean_mib"] = round(out["rss_mean_mib"] - out["pss_mean_mib"], 1)
    for v in per_vm:
        print(
            f"  {v['name']:<24} pid {v['pid']:>7}  RSS {v['rss_mib']:7.1f}  PSS"
            f" {v['pss_mib']:7.1f}  USS {v['uss_mib']:7.1f} MiB  ({v['started_as']})",
            flush=True,
        )
    print(
        f"  mean RSS {out['rss_mean_mib']} / PSS {out['pss_mean_mib']} / USS"
        f" {out['uss_mean_mib']} MiB per VM; supervisor RSS {out['supervisor_rss_mib']} MiB",
        flush=True,
    )
    if not_clones:
        raise BenchError(f"idle VMs that were not restored from the template: {not_clones}")


# ---------------------------------------------------------------- cold boots without a template


def bench_cold(args: argparse.Namespace, workdir: Path, results: dict[str, Any]) -> None:
    role = f"bench-cold-{os.getpid()}"
    n = args.cold
    config = swarm_yaml(role, min_idle=1, subnet="10.246.2.0/24")
    sup = QemuSupervisor(workdir / "cold", config, args.images, no_templates=True)
    out: dict[str, Any] = {"role": role, "pool_min_idle": 1}
    results["cold"] = out
    print(f"[+] cold boots: {n} VMs of a role whose template cannot be made", flush=True)
    samples: list[float] = []
    problems: list[str] = []
    with supervised(sup, lambda: check_state_clean(sup.state, out), hold_signals=True):
        sup.start(START_TIMEOUT)
        out.update(backend_facts(sup.status()))
        seen: set[tuple[str, int]] = set()
        t0 = time.perf_counter()
        for i in range(n):
            st = sup.wait_for("an idle VM", settled(role, 1), POOL_TIMEOUT)
            out["start_line"] = st["roles"][role]["start"]
            for a in st["agents"]:
                if a["role"] != role or a["state"] != "idle" or (a["name"], a["pid"]) in seen:
                    continue
                seen.add((a["name"], a["pid"]))
                if a["started_as"] != "booted":
                    problems.append(f"{a['name']} started as {a['started_as']!r}")
                elif a["ready_seconds"] is not None:
                    samples.append(float(a["ready_seconds"]))
            if i + 1 < n:
                code = sup.run_true(role)
                if code != 0:
                    problems.append(f"run {i} to consume a VM: exit {code}")
            print(f"  {i + 1}/{n} cold boots", flush=True)
        out["wall_s"] = round(time.perf_counter() - t0, 3)
        events = sup.new_events()
        out["template_failed"] = trouble(events, role, frozenset({"template_failed"}))
        problems += trouble(events, role, TROUBLE - {"template_failed"})
        if not out["start_line"].startswith("cold boot"):
            problems.append(f"the role does not cold-boot: {out['start_line']}")
        out["problems"] = problems
        if samples:
            out.update(summary_ms([s * 1000 for s in samples], samples=True))
        if problems or len(samples) != n:
            raise BenchError(f"{len(samples)} of {n} cold boots measured; {problems[:3]}")
        supervisor_stopped(sup, out, say=False)


# ---------------------------------------------------------------- the bare floor


async def _floor_once(
    driver: Any, snap: Path, template_disk: Path, workdir: Path, i: int
) -> tuple[float, float, dict[str, float]]:
    """One bare restore of ``snap``, no supervisor: QEMU with ``-incoming`` in a fresh
    namespace (QEMU makes the tap itself), the state loaded over QMP, ``cont``, the
    host on the control port saying Attach; seconds until the guest's Hello on
    the port (frames before it, left from the template's host, passed over as
    the supervisor does), and of them until the driver's restore returned
    (QEMU's part: the rest is the guest's), and the marks said on the way
    (``pool.steps``, from the driver's restore on, as the supervisor's ``vmm
    start``). The namespace and the overlay are made before the clock starts."""
    import trio
    from fireclaw.guest_daemon import protocol as gp
    from fireclaw.guest_daemon.channel import ChannelClosed, FramedChannel
    from fireclaw.pool import netns, steps
    from fireclaw.pool.drivers.base import VmSpec
    from fireclaw.pool.network import TAP

    ns_name = f"{netns.PREFIX}floor-{os.getpid()}-{i}"
    overlay = workdir / "floor" / f"floor-{i}{disks.SUFFIX}"
    await netns.create(ns_name)
    vm = None
    try:
        await disks.create_overlay(overlay, template_disk, "qcow2")
        spec = VmSpec(
            vm_id=f"floor-{i}",
            name=f"floor-{i}",
            role="floor",
            vcpus=1,
            memory_mib=MEMORY_MIB,
            control_url="",
            token="floor-token-0123456789",
            netns=ns_name,
            cgroup=None,
            log_path=workdir / "floor" / f"floor-{i}.log",
            tap=TAP,
            disk=overlay,
        )
        with trio.fail_after(BOOT_TIMEOUT), steps.tracing() as traced:
            t0 = time.perf_counter()
            vm = await driver.restore(spec, snap)
            running = time.perf_counter() - t0
            channel = FramedChannel(await vm.open_channel(), gp.MAX_FRAME_BYTES)
            await channel.send_message(gp.encode(gp.Attach(entropy=os.urandom(64))))
            steps.mark("attach said")
            try:
                while not isinstance(gp.decode_guest(await channel.get_message()), gp.Hello):
                    pass
            except ChannelClosed as exc:
                raise BenchError(f"floor {i}: the control port closed: {exc.reason}") from None
            took = time.perf_counter() - t0
            steps.mark("hello")
            await channel.aclose()
        return took, running, traced.as_ms()
    finally:
        with trio.CancelScope(shield=True):
            if vm is not None:
                await vm.kill()
            await netns.remove(ns_name)
            disks.remove(overlay)


class Floor:
    """Bare restores of the pool's own template (see ``_floor_once``), one sample
    at a time, taken between the supervised restores: both then run beside the
    same idle clones under the same moment's load from the rest of the host."""

    def __init__(self, workdir: Path, images: Path) -> None:
        from fireclaw.pool.accel import Accel
        from fireclaw.pool.drivers.qemu import QemuDriver
        from fireclaw.pool.drivers.qemu_migration import load_snapshot_info
        from fireclaw.pool.image import load_image

        templates = workdir / "pool" / "state" / "templates"
        snaps = sorted(templates.glob("*.snap"))
        if len(snaps) != 1:
            raise BenchError(f"expected the pool's one template in {templates}, found {snaps}")
        self.snap = snaps[0]
        info = load_snapshot_info(self.snap)
        image = next(
            (
                img
                for d in sorted(images.iterdir())
                if (img := load_image(d)) is not None and img.key == info.image_key
            ),
            None,
        )
        if image is None:
            raise BenchError(
                f"the image {info.image_key[:16]} of {self.snap.name} is not in {images}"
            )
        self.driver = QemuDriver(image, Accel(info.accel, "as the template was taken"), qemu=QEMU)
        self.disk = self.snap.with_suffix(disks.SUFFIX)
        self.workdir = workdir
        self.samples: list[float] = []
        self.qemu_part: list[float] = []
        self.traces: list[dict[str, float]] = []

    def sample(self) -> None:
        import trio

        i = len(self.samples)
        took, running, marks = trio.run(
            _floor_once, self.driver, self.snap, self.disk, self.workdir, i
        )
        self.samples.append(took)
        self.qemu_part.append(running)
        self.traces.append(marks)

    def report(self, restore: dict[str, Any], *, trace: bool) -> dict[str, Any]:
        """The floor's figures, and the ratios of ``restore`` (its samples paired
        with these, in order) to them."""
        out: dict[str, Any] = summary_ms([s * 1000 for s in self.samples], samples=True)
        out["qemu_part"] = summary_ms([s * 1000 for s in self.qemu_part], samples=True)
        out["steps"] = step_deltas(self.traces)
        if trace:
            print_steps("bare floor, from the driver's restore", out["steps"])
        if "p50_ms" in restore:
            out["ratio_p50"] = round(restore["p50_ms"] / out["p50_ms"], 2)
            pairs = [r / f for r, f in zip(restore["samples_ms"], out["samples_ms"], strict=False)]
            out["ratio_pairs_p50"] = round(percentile(pairs, 50), 2)
        print(
            f"  floor p50 {out['p50_ms'] / 1000:.3f} s"
            + (
                f"; restore to connected is {out['ratio_p50']}x that"
                f" ({out['ratio_pairs_p50']}x, p50 of the pairs)"
                if "ratio_p50" in out
                else ""
            ),
            flush=True,
        )
        return out


# ---------------------------------------------------------------- report


def _s3(s: dict[str, Any]) -> str:
    return (
        f"{s['p50_ms'] / 1000:.3f} / {s['p99_ms'] / 1000:.3f} / {s['max_ms'] / 1000:.3f} s"
        f"  (min {s['min_ms'] / 1000:.3f}, mean {s['mean_ms'] / 1000:.3f})"
    )


def _ms3(s: dict[str, Any]) -> str:
    return (
        f"{s['p50_ms']:.1f} / {s['p99_ms']:.1f} / {s['max_ms']:.1f} ms"
        f"  (min {s['min_ms']:.1f}, mean {s['mean_ms']:.1f})"
    )


def table(results: dict[str, Any]) -> str:
    m = results["machine"]
    pool = results.get("pool", {})
    head = [
        ("command", results["command"]),
        machine_row(m),
        ("load average at start", " ".join(str(x) for x in m["loadavg_at_start"])),
        ("qemu", m["qemu"]),
        (
            "accelerator",
            f"{pool['accel']} ({pool['accel_reason']})" if "accel" in pool else "unknown",
        ),
        ("python / root", f"{m['python']} / {'yes' if m['root'] else 'no'}"),
        isolation_row(m),
        ("KSM / THP", f"{m['ksm']} / {m['thp']}"),
        ("date", results["date"]),
        ("bench wall time", f"{results['total_s']:.1f} s"),
    ]
    rows: list[tuple[str, str]] = []
    if "ready_s" in pool:
        built = f", image {pool['image_built'][0]} built first" if pool.get("image_built") else ""
        rows.append(("supervisor start to READY=1", f"{pool['ready_s']:.2f} s{built}"))
    t = results.get("template", {})
    if t:
        rows += [
            ("cold boot to parked (template VM, alone)", f"{t['boot_to_parked_s']:.3f} s"),
            (
                "template snapshot: size / time / all",
                f"{t['snapshot_mib']:.1f} MiB / {t['snapshot_s']:.3f} s / {t['total_s']:.3f} s",
            ),
        ]
    if "first_pool_s" in pool:
        fill = pool.get("fill_restores_s", [])
        rows.append(
            (
                f"start to {pool['pool_min_idle']} idle clones",
                f"{pool['first_pool_s']:.2f} s (fill restores, concurrent:"
                f" {', '.join(f'{x:.2f}' for x in fill)} s)",
            )
        )
    c = results.get("cold", {})
    if "p50_ms" in c:
        rows.append((f"cold boot to connected, no template (n={c['n']}) p50 / p99 / max", _s3(c)))
    r = results.get("restore", {})
    if "p50_ms" in r:
        rows.append((f"restore to connected, one at a time (n={r['n']}) p50/p99/max", _s3(r)))
        if "qemu_part" in r:
            rows.append(
                ("  of which QEMU up with the state loaded and running", _s3(r["qemu_part"]))
            )
    f = results.get("floor", {})
    if "p50_ms" in f:
        rows.append((f"bare floor: QEMU -incoming to Hello (n={f['n']}) p50/p99/max", _s3(f)))
        rows.append(("  of which QEMU up with the state loaded and running", _s3(f["qemu_part"])))
        if "ratio_p50" in f:
            rows.append(
                (
                    "restore to connected / bare floor: of the p50s; p50 of the pairs",
                    f"{f['ratio_p50']:.2f}x; {f['ratio_pairs_p50']:.2f}x",
                )
            )
    if "refill_per_s" in pool:
        rows.append(
            (
                f"pool refill, first fill of {pool['pool_min_idle']} from the template",
                f"{pool['refill_per_s']:.2f} VMs restored/s",
            )
        )
    run = results.get("run", {})
    if "cli" in run:
        rows += [
            (f"run -- true, CLI p50 / p99 / max (n={run['cli']['n']})", _ms3(run["cli"])),
            (f"run -- true, API p50 / p99 / max (n={run['api']['n']})", _ms3(run["api"])),
            (
                "run: CLI start-up share (p50 CLI - p50 API)",
                f"{run['cli_startup_share_p50_ms']:.1f} ms",
            ),
            (
                "run: exit codes",
                "all 0" if not run["failures"] else f"{len(run['failures'])} not 0",
            ),
        ]
        if "restores_during_runs" in run:
            o = run["restores_during_runs"]
            rows.append((f"restore to connected, during the runs (n={o['n']})", _s3(o)))
    mem = results.get("memory", {})
    if "rss_mean_mib" in mem:
        rows += [
            (
                f"QEMU per idle clone, mean of {mem['n']}: RSS / PSS / USS",
                f"{mem['rss_mean_mib']:.1f} / {mem['pss_mean_mib']:.1f} /"
                f" {mem['uss_mean_mib']:.1f} MiB (guest RAM {pool.get('memory_mib')} MiB)",
            ),
            (
                "QEMU per clone: RSS each",
                ", ".join(f"{v['rss_mib']:.1f}" for v in mem["per_vm"]) + " MiB",
            ),
            (
                "QEMU per clone: PSS each",
                ", ".join(f"{v['pss_mib']:.1f}" for v in mem["per_vm"]) + " MiB",
            ),
            (
                "shared per clone (RSS - PSS, mean)",
                f"{mem['rss_minus_pss_mean_mib']:.1f} MiB",
            ),
            (
                f"supervisor RSS / PSS, {mem['n']} idle VMs",
                f"{mem['supervisor_rss_mib']:.1f} / {mem['supervisor_pss_mib']:.1f} MiB",
            ),
        ]
    if "stop_s" in pool:
        rows.append(stop_row(f"graceful stop (SIGTERM) of {pool['pool_min_idle']} VMs", pool))
    if "stop_s" in c:
        rows.append(stop_row("graceful stop (SIGTERM), cold-boot supervisor", c))
    return render_table(results, head, rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark fireclaw-swarm's qemu driver (see the module docstring)."
    )
    parser.add_argument("--restores", type=int, help="restores to time (default 20)")
    parser.add_argument("--runs", type=int, help="`run -- true` to time, CLI and API (default 20)")
    parser.add_argument("--idle", type=int, help="the pool's idle clones (default 4)")
    parser.add_argument("--cold", type=int, help="cold boots without a template (default 3)")
    parser.add_argument(
        "--images",
        type=Path,
        default=TEST_CACHE,
        help=f"the guest image cache, linked as <state>/images (default {TEST_CACHE})",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (configs, logs) afterwards"
    )
    parser.add_argument(
        "--quick", action="store_true", help="--restores 5 --runs 5 --idle 2 --cold 1"
    )
    parser.add_argument(
        "--trace",
        action="store_true",
        help="print where each restore's time goes, step by step, beside the floor's",
    )
    args = parser.parse_args(argv)
    fill_defaults(
        args,
        quick={"restores": 5, "runs": 5, "idle": 2, "cold": 1},
        full={"restores": 20, "runs": 20, "idle": 4, "cold": 3},
    )
    if min(args.restores, args.runs, args.cold) < 0:
        parser.error("counts must be >= 0")
    if not 1 <= args.idle <= MAX_ACTIVE:
        parser.error(f"--idle must be 1 to {MAX_ACTIVE}")
    args.images = args.images.expanduser().resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    results = new_results(
        {k: getattr(args, k) for k in ("restores", "runs", "idle", "cold", "quick")}
        | {"images": str(args.images)},
        qemu_machine_facts(),
    )

    def parts(workdir: Path) -> None:
        if os.geteuid() != 0:
            raise BenchError("VMs run in network namespaces: run as root")
        bench_pool(args, workdir, results)
        if args.cold > 0:
            bench_cold(args, workdir, results)

    status = run_parts(results, parts, prefix="fcbench-qemu-", keep=args.keep, hold_signals=True)
    return finish(
        results,
        status,
        parts=("pool", "floor", "cold"),
        started=started,
        path=RESULTS,
        table=table,
    )


if __name__ == "__main__":
    sys.exit(main())
