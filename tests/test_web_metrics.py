"""``/metrics`` scraped during a real run, parsed with prometheus_client's own parser,
against what ``fireclaw-swarm status --json`` says at the same moment."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families
from swarmctl import NOTHING, idle, pids, role_yaml
from test_web import READ, TIMEOUT, bearer, start_web, url_of

#: Prometheus' naming rules: snake case with the project's prefix.
NAME = re.compile(r"fireclaw_[a-z][a-z0-9_]*")


def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample by metric name, then by its sorted labels."""
    answer = requests.get(f"{url}/metrics", headers=bearer(READ), timeout=TIMEOUT)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(answer.text):
        assert NAME.fullmatch(family.name), family.name
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def test_metrics_match_status_json_during_a_run(tmp_path: Path) -> None:
    harness = 'harness: {kind: command, command: ["sh", "-c", "echo did: $FIRECLAW_PROMPT"]}\n'
    swarm = start_web(
        tmp_path,
        role_yaml("worker", min_idle=2, max_active=3, extra=harness)
        + role_yaml("coder", min_idle=1, max_active=2),
    )
    try:
        url = url_of(swarm)
        swarm.wait_for(
            "2 idle workers, 1 idle coder", lambda s: idle("worker", 2)(s) and idle("coder", 1)(s)
        )
        # Something to count: a finished task and a crash, restarted.
        at_rest = scrape(url)
        sent = time.monotonic()
        task = swarm.api.post("/tasks", {"role": "worker", "prompt": "count me"})
        swarm.wait_for("the task done", lambda s: (s["tasks"] or {}).get("done") == 1)
        took = time.monotonic() - sent
        after_task = scrape(url)
        before = pids(swarm, "coder")
        os.kill(before["coder-0"], signal.SIGKILL)
        swarm.wait_for(
            "coder-0 back",
            lambda s: any(
                a["name"] == "coder-0" and a["state"] == "idle" and a["pid"] != before["coder-0"]
                for a in s["agents"]
            ),
        )
        # A finished VM stops once its replacement is up: wait for it to be gone too.
        swarm.wait_for(
            "2 idle workers again, and no other",
            lambda s: idle("worker", 2)(s)
            and sum(a["role"] == "worker" for a in s["agents"]) == 2,
        )
        # The fleet is quiet now: one status, then one scrape.
        out = swarm.cli("status", "--json")
        assert out.returncode == 0, out.stderr
        status = json.loads(out.stdout)
        metrics = scrape(url)
        assert swarm.status()["version"] == status["version"]  # nothing moved in between
    finally:
        swarm.close()
    assert swarm.leftovers() == NOTHING

    vms = metrics["fireclaw_vms"]
    for role, counts in status["roles"].items():
        for state in ("idle", "active", "starting", "backoff", "failed", "draining"):
            assert vms[(("role", role), ("state", state))] == counts[state], (role, state)
        assert metrics["fireclaw_role_target_vms"][(("role", role),)] == counts["target"]
        assert metrics["fireclaw_role_degraded"][(("role", role),)] == float(counts["degraded"])
        restarts = sum(a["restarts"] for a in status["agents"] if a["role"] == role)
        assert metrics["fireclaw_vm_restarts"][(("role", role),)] == restarts
    assert metrics["fireclaw_vm_restarts"][(("role", "coder"),)] >= 1
    for state, n in status["tasks"].items():
        assert metrics["fireclaw_tasks"][(("state", state),)] == n
    assert metrics["fireclaw_tasks"][(("state", "done"),)] == 1 and task["id"] == 1

    # What happened moved the event-fed series: one claim, its wait and its run, one crash.
    worker = (("role", "worker"),)
    done = (("outcome", "done"), *worker)
    assert "fireclaw_task_claims_total" not in at_rest  # nothing claimed yet: no series
    assert after_task["fireclaw_task_claims_total"] == {worker: 1.0}
    assert after_task["fireclaw_task_claim_latency_seconds_count"] == {worker: 1.0}
    assert 0 <= after_task["fireclaw_task_claim_latency_seconds_sum"][worker] <= took
    assert after_task["fireclaw_task_duration_seconds_count"] == {done: 1.0}
    assert 0 < after_task["fireclaw_task_duration_seconds_sum"][done] <= took
    assert after_task["fireclaw_task_duration_seconds_bucket"][(("le", "+Inf"), *done)] == 1.0
    assert "fireclaw_vm_crashes_total" not in after_task
    # SIGKILL: no exit code a guest chose, so the exit class is a failure.
    crashes = metrics["fireclaw_vm_crashes_total"]
    assert crashes == {(("cause", "failure"), ("role", "coder")): 1.0}
    assert metrics["fireclaw_task_claims_total"] == {worker: 1.0}  # a crash claims nothing

    # The gauge histogram holds one observation per live VM that says how fast it was ready.
    ready = [a for a in status["agents"] if a["ready_seconds"] is not None]
    counts = metrics["fireclaw_vm_ready_seconds_gcount"]
    assert sum(counts.values()) == len(ready) > 0
    total = metrics["fireclaw_vm_ready_seconds_gsum"]
    assert abs(sum(total.values()) - sum(a["ready_seconds"] for a in ready)) < 1e-6

    assert metrics["fireclaw_irc_enabled"][()] == 0.0
    assert metrics["fireclaw_state_writable"][()] == 1.0
    rss = metrics["fireclaw_supervisor_resident_memory_bytes"][()]
    assert 10 << 20 < rss < 2 << 30
    assert (
        0
        <= metrics["fireclaw_event_loop_lag_seconds"][()]
        <= (metrics["fireclaw_event_loop_lag_max_seconds"][()])
    )
    # Bounded labels: no VM, agent or task names anywhere in the label values.
    for name, samples in metrics.items():
        for labels in samples:
            for key, value in labels:
                assert key in {
                    "role",
                    "state",
                    "start",
                    "le",
                    "model",
                    "kind",
                    "scope",
                    "cause",
                    "outcome",
                }, name
                assert not re.fullmatch(r"(worker|coder)-\d+", value), (name, value)
