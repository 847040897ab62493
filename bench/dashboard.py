"""What an open dashboard costs the supervisor, in one run.

A real ``fireclaw-swarm up`` (process driver) with the HTTP listener is scaled
to N idle VMs (200 by default) and left to settle. Then windows of the same
length, back to back: the fleet at rest with no dashboard, then two
dashboards open in headless Chromium (Debian's, driven by Playwright: each
loads the page and keeps its live stream); the fleet busy (a task every
second, each claiming a VM that is then replaced) with the two dashboards,
then without; and, once settled again, at rest with none. For each window: the supervisor's CPU
(user + system, % of one core) and RSS at its end, and how many live views the
two pages drew. The windows without a dashboard are the floor the others are
read against on this machine, at this moment.

    .venv/bin/python bench/dashboard.py                 # 200 idle VMs, 30 s windows
    .venv/bin/python bench/dashboard.py --quick         # 40 idle VMs, 10 s windows

Results land in bench/results/dashboard.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from common import (
    Supervisor,
    fill_defaults,
    finish,
    isolation_row,
    machine_facts,
    machine_row,
    new_results,
    render_table,
    run_parts,
    supervised,
    supervisor_stopped,
)
from process_driver import BOOT_TIMEOUT, FILL_TIMEOUT, SETTLE_S, check_role_clean, role_idle
from process_driver import swarm_yaml as role_swarm_yaml

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "dashboard.json"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PAGES = 2
WINDOWS = ("none_before", "two_dashboards", "busy_two_dashboards", "busy_none", "none_after")


def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def window(
    sup: Supervisor, seconds: float, views: Any = None, *, busy: str | None = None
) -> dict[str, Any]:
    """The supervisor's CPU over ``seconds`` and its RSS at the end; with ``views``
    (a callable giving the live views the pages drew so far), those too; with
    ``busy`` (a role), a task for it every second meanwhile."""
    me = psutil.Process(sup.pid)
    seen0 = views() if views else 0
    cpu0, t0 = _cpu_s(me), time.perf_counter()
    next_task = t0
    tasks = 0
    while time.perf_counter() - t0 < seconds:
        if busy and time.perf_counter() >= next_task:
            sup.api.post("/tasks", {"role": busy, "prompt": "busy"})
            tasks += 1
            next_task += 1.0
        if views:
            views()  # the pages' event loop runs while Playwright is called
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    out = {
        "window_s": round(wall, 2),
        "supervisor_cpu_pct_of_one_core": round((_cpu_s(me) - cpu0) / wall * 100, 2),
        "supervisor_rss_mib": round(me.memory_info().rss / 2**20, 1),
    }
    if views:
        out["views_received"] = views() - seen0
    if busy:
        out["tasks_submitted"] = tasks
    return out


def bench(args: argparse.Namespace, workdir: Path, results: dict[str, Any]) -> None:
    from playwright.sync_api import sync_playwright

    role = f"bench-dash-{os.getpid()}"
    root = workdir / "swarm"
    root.mkdir()
    text = role_swarm_yaml(role, min_idle=args.idle, control=f"  boot_timeout: {BOOT_TIMEOUT:g}\n")
    text += 'http: {listen: "127.0.0.1:0"}\n'
    sup = Supervisor(root, text)
    out: dict[str, Any] = {"n": args.idle, "pages": PAGES}
    results["dashboard"] = out
    with supervised(sup, lambda: check_role_clean(role, sup.state, out)):
        sup.start()
        t0 = time.perf_counter()
        print(f"[1/6] filling to {args.idle} idle VMs", flush=True)
        sup.wait_for(f"{args.idle} idle VMs", role_idle(role, args.idle), FILL_TIMEOUT)
        out["fill_s"] = round(time.perf_counter() - t0, 2)
        time.sleep(SETTLE_S)
        url = sup.status()["http"]
        token = (sup.state / "secrets" / "http-token").read_text().strip()

        print(f"[2/6] {args.window:g} s at rest, no dashboard", flush=True)
        out["none_before"] = window(sup, args.window)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM,
                headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
            try:
                pages = []
                for _ in range(PAGES):
                    page = browser.new_page()
                    page.goto(f"{url}/login")
                    page.fill("#token", token)
                    page.click("button[type=submit]")
                    page.wait_for_url(f"{url}/")
                    page.locator(f"#agents tbody tr >> nth={args.idle - 1}").wait_for()
                    pages.append(page)

                def views() -> int:
                    # The page counts the live views it has drawn in <body data-views>.
                    return sum(int(p.evaluate("document.body.dataset.views")) for p in pages)

                print(f"[3/6] {args.window:g} s at rest, {PAGES} dashboards open", flush=True)
                out["two_dashboards"] = window(sup, args.window, views)
                print(f"[4/6] {args.window:g} s busy, {PAGES} dashboards open", flush=True)
                out["busy_two_dashboards"] = window(sup, args.window, views, busy=role)
            finally:
                browser.close()
        print(f"[5/6] {args.window:g} s busy, no dashboard", flush=True)
        out["busy_none"] = window(sup, args.window, busy=role)
        sup.wait_for(f"{args.idle} idle VMs again", role_idle(role, args.idle), FILL_TIMEOUT)
        time.sleep(SETTLE_S)
        print(f"[6/6] {args.window:g} s at rest, no dashboard again", flush=True)
        out["none_after"] = window(sup, args.window)
        for key in WINDOWS:
            print(f"  {key}: {out[key]}", flush=True)
        supervisor_stopped(sup, out)


def table(results: dict[str, Any]) -> str:
    m = results["machine"]
    head = [
        ("command", results["command"]),
        machine_row(m),
        isolation_row(m),
        ("date", results["date"]),
        ("bench wall time", f"{results['total_s']:.1f} s"),
    ]
    rows: list[tuple[str, str]] = []
    d = results.get("dashboard", {})
    if "none_after" in d:
        n = d["n"]
        rows.append((f"fill to {n} idle VMs", f"{d['fill_s']:.1f} s"))
        for key, label in [
            ("none_before", "at rest, no dashboard"),
            ("two_dashboards", f"at rest, {d['pages']} dashboards open"),
            ("none_after", "at rest, no dashboard again"),
            ("busy_two_dashboards", f"busy, {d['pages']} dashboards open"),
            ("busy_none", "busy, no dashboard"),
        ]:
            w = d[key]
            extra = f", {w['views_received']} live views" if "views_received" in w else ""
            if "tasks_submitted" in w:
                extra += f", {w['tasks_submitted']} tasks"
            rows.append(
                (
                    f"supervisor, {n} idle VMs, {label} ({w['window_s']:.0f} s)",
                    f"{w['supervisor_cpu_pct_of_one_core']:.2f} % of one core,"
                    f" {w['supervisor_rss_mib']:.1f} MiB RSS{extra}",
                )
            )
    return render_table(results, head, rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="What an open dashboard costs the supervisor.")
    parser.add_argument("--idle", type=int, help="idle VMs (default 200)")
    parser.add_argument("--window", type=float, help="seconds per window (default 30)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--quick", action="store_true", help="--idle 40 --window 10")
    args = parser.parse_args(argv)
    fill_defaults(args, quick={"idle": 40, "window": 10.0}, full={"idle": 200, "window": 30.0})
    if not 1 <= args.idle <= 1000 or args.window <= 0:
        parser.error("--idle must be 1..1000 and --window > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    results = new_results(
        {k: getattr(args, k) for k in ("idle", "window", "quick")}, machine_facts()
    )
    status = run_parts(
        results, lambda workdir: bench(args, workdir, results), prefix="fcdash-", keep=args.keep
    )
    return finish(results, status, parts=("dashboard",), started=started, path=RESULTS, table=table)


if __name__ == "__main__":
    sys.exit(main())
