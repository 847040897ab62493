"""The dashboard's sans-I/O parts, without sockets: the event-fed metrics (under
trio's MockClock), the #agents ring buffer and its redaction, the usage buckets."""

from __future__ import annotations

import trio
import trio.testing
from fireclaw.supervisor.chatlog import MAX_TEXT, REDACTED, ChatLog, redact
from fireclaw.supervisor.metrics_events import MAX_PENDING, EventMetrics, follow
from fireclaw.supervisor.usage_series import bucket_edges, buckets_from_totals, usage_series
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def samples(metrics: EventMetrics) -> Samples:
    """What a scrape of ``metrics`` says, parsed back as a monitor reads it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    found: Samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            found.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return found


# --- metrics from events ---------------------------------------------------------------


async def test_claim_latency_and_task_duration_are_the_times_between_events(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = EventMetrics(models=lambda: ["smollm2"])
    send, receive = trio.open_memory_channel[tuple[str, str, dict[str, object]]](16)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow, metrics, receive)
        await send.send(("task_queued", "task-7", {"role": "worker"}))
        await trio.sleep(2.5)  # queued for 2.5 s
        await send.send(("task_claimed", "worker-0", {"task_id": 7, "role": "worker"}))
        await trio.sleep(40.0)  # ran for 40 s
        await send.send(("task_done", "worker-0", {"task_id": 7, "exit_code": 0}))
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    got = samples(metrics)
    role = (("role", "worker"),)
    assert got["fireclaw_task_claims_total"] == {role: 1.0}
    assert got["fireclaw_task_claim_latency_seconds_sum"] == {role: 2.5}
    assert got["fireclaw_task_claim_latency_seconds_bucket"][(("le", "2.5"), *role)] == 1.0
    assert got["fireclaw_task_claim_latency_seconds_bucket"][(("le", "1.0"), *role)] == 0.0
    done = (("outcome", "done"), ("role", "worker"))
    assert got["fireclaw_task_duration_seconds_sum"] == {done: 40.0}
    assert got["fireclaw_task_duration_seconds_count"] == {done: 1.0}


def test_a_requeued_task_ends_one_run_and_waits_again() -> None:
    m = EventMetrics(models=lambda: [])
    m.observe("task_queued", "task-1", {"role": "coder"}, 0.0)
    m.observe("task_claimed", "coder-0", {"task_id": 1, "role": "coder"}, 1.0)
    m.observe("task_requeued", "coder-0", {"task_id": 1, "state": "queued"}, 4.0)
    m.observe("task_claimed", "coder-1", {"task_id": 1, "role": "coder"}, 10.0)
    m.observe("task_done", "coder-1", {"task_id": 1, "exit_code": 3}, 11.0)
    # A restarted supervisor's leftover, requeued before anyone saw it queued.
    m.observe("task_requeued", "task-2", {"reason": "supervisor restarted"}, 12.0)
    m.observe("task_claimed", "coder-2", {"task_id": 2, "role": "coder"}, 13.0)
    got = samples(m)
    role = (("role", "coder"),)
    assert got["fireclaw_task_claims_total"] == {role: 3.0}
    assert got["fireclaw_task_claim_latency_seconds_count"] == {role: 3.0}
    assert got["fireclaw_task_claim_latency_seconds_sum"] == {role: 1.0 + 6.0 + 1.0}
    durations = got["fireclaw_task_duration_seconds_sum"]
    assert durations == {
        (("outcome", "requeued"), *role): 3.0,
        (("outcome", "failed"), *role): 1.0,
    }


def test_a_claim_of_a_task_never_seen_queued_counts_without_a_latency() -> None:
    m = EventMetrics(models=lambda: [])
    m.observe("task_claimed", "worker-0", {"task_id": 9, "role": "worker"}, 5.0)
    got = samples(m)
    assert got["fireclaw_task_claims_total"] == {(("role", "worker"),): 1.0}
    assert got.get("fireclaw_task_claim_latency_seconds_count", {}) == {}


def test_crashes_by_cause_and_a_cause_not_known_is_unknown() -> None:
    m = EventMetrics(models=lambda: [])
    for cause in ("failure", "failure", "fatal", "made-up", None):
        m.observe("crashed", "worker-0", {"role": "worker", "cause": cause}, 0.0)
    got = samples(m)["fireclaw_vm_crashes_total"]
    assert got == {
        (("cause", "failure"), ("role", "worker")): 2.0,
        (("cause", "fatal"), ("role", "worker")): 1.0,
        (("cause", "unknown"), ("role", "worker")): 2.0,
    }


def test_gateway_latency_labels_only_models_the_config_names() -> None:
    configured = ["smollm2"]
    m = EventMetrics(models=lambda: configured)
    call = {"role": "coder", "duration": 0.2, "outcome": "ok"}
    m.observe("model_call", "alice", {**call, "model": "smollm2"}, 0.0)
    m.observe("model_call", "alice", {**call, "model": "x" * 5000}, 0.0)
    m.observe("model_call", "alice", {**call, "model": "qwen", "outcome": "weird"}, 0.0)
    configured.append("qwen")  # a reload names it
    m.observe("model_call", "alice", {**call, "model": "qwen", "outcome": "refused"}, 0.0)
    got = samples(m)["fireclaw_gateway_latency_seconds_count"]
    assert got == {
        (("model", "smollm2"), ("outcome", "ok"), ("role", "coder")): 1.0,
        (("model", "other"), ("outcome", "ok"), ("role", "coder")): 1.0,
        (("model", "other"), ("outcome", "other"), ("role", "coder")): 1.0,
        (("model", "qwen"), ("outcome", "refused"), ("role", "coder")): 1.0,
    }


def test_queued_times_are_bounded() -> None:
    m = EventMetrics(models=lambda: [])
    for n in range(MAX_PENDING + 10):
        m.observe("task_queued", f"task-{n}", {}, float(n))
    assert len(m._queued) == MAX_PENDING
    m.observe("task_claimed", "w", {"task_id": 0, "role": "w"}, 1e6)  # forgotten: the oldest
    m.observe("task_claimed", "w", {"task_id": MAX_PENDING, "role": "w"}, 1e6)
    assert samples(m)["fireclaw_task_claim_latency_seconds_count"] == {(("role", "w"),): 1.0}


# --- #agents -----------------------------------------------------------------------------


def test_the_chat_log_keeps_the_newest_lines_numbered() -> None:
    log = ChatLog("#agents", capacity=3)
    for n in range(5):
        log.add("alice", f"line {n}", at=100.0 + n)
    assert [(line.id, line.text) for line in log.after(0)] == [
        (3, "line 2"),
        (4, "line 3"),
        (5, "line 4"),
    ]
    assert [line.id for line in log.after(4)] == [5]
    assert [line.id for line in log.after(0, limit=1)] == [5]
    assert log.after(5) == [] and log.last_id == 5


def test_a_line_is_plain_text_without_secrets() -> None:
    secret = "hunter2-is-the-password"
    log = ChatLog("#agents", secrets=lambda: [secret, "short"])
    line = log.add(
        "mal\x02lory\u202e",
        "\x0304,01red\x03 <script>alert(1)</script> pass: hun\x02ter2-is-the-password\x01 short",
        at=1.0,
    )
    assert line.nick == "mallory"
    # HTML stays as text (the page writes it with textContent); the secret is gone
    # even with a formatting code inside it; "short" is too short to be a secret.
    assert line.text == f"red <script>alert(1)</script> pass: {REDACTED} short"
    long = log.add("bob", "x" * 600 + secret, at=2.0)
    assert len(long.text) == MAX_TEXT and secret[:6] not in long.text


def test_redact_replaces_the_longest_secret_first() -> None:
    assert redact("key abcdef123456", ["abcdef", "abcdef123456"]) == f"key {REDACTED}"


# --- usage over time ---------------------------------------------------------------------


def test_bucket_edges_are_multiples_of_the_step() -> None:
    assert bucket_edges(now=1000.5, window=3600, n=30) == (1080 - 3600, 120)
    start, step = bucket_edges(now=59.0, window=60, n=7)
    assert step == 9 and (start + 7 * step) > 59 >= start + 6 * step


def test_buckets_are_differences_of_totals_since_each_edge() -> None:
    totals = [{"a": 30, "b": 5}, {"a": 30, "b": 5}, {"a": 10}, {}]
    assert buckets_from_totals(totals) == {"a": [0, 20, 10], "b": [0, 5, 0]}
    assert buckets_from_totals([{"a": 0}, {}]) == {}


async def test_usage_series_reads_the_ledger_at_each_edge() -> None:
    calls = [(1000.0, "worker", 7), (1061.0, "worker", 5), (1130.0, "coder", 11)]

    class Ledger:
        async def usage(self, by: str, since: int, key: str | None) -> dict[str, object]:
            assert by == "role" and key is None
            sums: dict[str, int] = {}
            for at, role, tokens in calls:
                if at >= since:
                    sums[role] = sums.get(role, 0) + tokens
            return {"rows": [{"key": k, "tokens": v} for k, v in sums.items()]}

    got = await usage_series(Ledger(), now=1150.0, window=180, n=3)
    assert got == {
        "start": 1020,
        "step": 60,
        "buckets": 3,
        "roles": {"coder": [0, 11, 0], "worker": [5, 0, 0]},
    }
