"""Metrics of what happens, not of what is: claims, task durations, crashes, model calls.

``/metrics`` reads the fleet's state at each scrape (supervisor/metrics.py); a
latency or a crash is gone from that state by the time a monitor asks. So
``EventMetrics`` counts from the supervisor's event feed as events happen, and
the scrape adds its families to the snapshot's. It is sans-I/O: events and the
time they were seen go in (``observe``), metric families come out
(``collect``); ``follow`` is the thin loop that feeds it.

Families::

    fireclaw_task_claims_total{role}                  tasks claimed by a VM
    fireclaw_task_claim_latency_seconds{role}         histogram: queued (or requeued) to claimed
    fireclaw_task_duration_seconds{role,outcome}      histogram: claimed to done, failed or requeued
    fireclaw_vm_crashes_total{role,cause}             crashes, by exit class (clean, failure, fatal)
    fireclaw_gateway_latency_seconds{role,model,outcome}
                                                      histogram: a model call through a VM's gateway

Counted since this supervisor started, as Prometheus counters are. A task
queued before the listener saw it (requeued by a restarted supervisor) counts
as a claim but has no claim latency. Labels stay bounded: roles come from
swarm.yaml, a model the config does not name (a guest may ask for any) is
``other``, outcomes and causes are fixed sets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Final

import trio
from prometheus_client import Counter, Histogram
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

__all__ = ["CAUSES", "OTHER_MODEL", "EventMetrics", "follow"]

#: How a VM's end is classified (pool/backoff.py ``ExitClass``), and
#: ``unknown`` for an event that does not say.
CAUSES: Final = ("clean", "failure", "fatal", "unknown")
#: The ``model`` label of a call for a model the config does not name.
OTHER_MODEL: Final = "other"
#: Outcomes of a model call as the ledger records them (supervisor/state.py ``CallRecord``).
CALL_OUTCOMES: Final = ("ok", "refused", "upstream_error", "cancelled")
#: A claim waits from milliseconds (a warm VM free) to minutes (a busy role).
CLAIM_BUCKETS: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
#: A task runs from a command's milliseconds to a model's many minutes.
TASK_BUCKETS: Final = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
#: A model call: a refusal takes milliseconds, a long completion on a CPU minutes.
CALL_BUCKETS: Final = (0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
#: Queued tasks whose queueing time is remembered; past this the oldest are
#: forgotten (their claims then have no latency) so a flood cannot grow memory.
MAX_PENDING: Final = 100_000


class EventMetrics(Collector):
    """Counters and histograms fed from events; ``collect`` yields their families.

    ``models`` says which model names are labels of their own (the config's);
    any other is ``other``. Times passed to ``observe`` are seconds on one clock.
    """

    def __init__(self, models: Callable[[], Iterable[str]]) -> None:
        self._models = models
        self._queued: dict[int, float] = {}  # task id -> when it was (re)queued
        self._running: dict[int, tuple[str, float]] = {}  # task id -> role, when claimed
        self.claims = Counter(
            "fireclaw_task_claims", "Tasks claimed by a VM", ["role"], registry=None
        )
        self.claim_latency = Histogram(
            "fireclaw_task_claim_latency_seconds",
            "How long a task waited in the queue before a VM claimed it",
            ["role"],
            buckets=CLAIM_BUCKETS,
            registry=None,
        )
        self.task_duration = Histogram(
            "fireclaw_task_duration_seconds",
            "How long a claimed task ran, by how it ended (done, failed, requeued)",
            ["role", "outcome"],
            buckets=TASK_BUCKETS,
            registry=None,
        )
        self.crashes = Counter(
            "fireclaw_vm_crashes", "VM crashes by exit class", ["role", "cause"], registry=None
        )
        self.gateway_latency = Histogram(
            "fireclaw_gateway_latency_seconds",
            "How long a model call through a VM's gateway took",
            ["role", "model", "outcome"],
            buckets=CALL_BUCKETS,
            registry=None,
        )

    def observe(self, kind: str, subject: str, detail: Mapping[str, object], now: float) -> None:
        """Count one event of the supervisor's feed, seen at ``now``."""
        match kind:
            case "task_queued":
                queued_id = _task_id(subject)
                if queued_id is not None:
                    self._remember_queued(queued_id, now)
            case "task_claimed":
                claimed_id, role = detail.get("task_id"), str(detail.get("role"))
                if not isinstance(claimed_id, int):
                    return
                self.claims.labels(role).inc()
                queued = self._queued.pop(claimed_id, None)
                if queued is not None:
                    self.claim_latency.labels(role).observe(max(0.0, now - queued))
                self._running[claimed_id] = (role, now)
            case "task_done":
                code = detail.get("exit_code")
                self._ended(detail.get("task_id"), "done" if code == 0 else "failed", now)
            case "task_requeued":
                # A restarted supervisor's leftover says only its subject, task-N.
                task_id = detail.get("task_id", _task_id(subject))
                state = detail.get("state", "queued")
                self._ended(task_id, "failed" if state == "failed" else "requeued", now)
                if isinstance(task_id, int) and state == "queued":
                    self._remember_queued(task_id, now)
            case "crashed":
                cause = detail.get("cause")
                self.crashes.labels(
                    str(detail.get("role")), cause if cause in CAUSES else "unknown"
                ).inc()
            case "model_call":
                duration = detail.get("duration")
                if not isinstance(duration, int | float):
                    return
                model = detail.get("model")
                known = model if isinstance(model, str) and model in set(self._models()) else None
                outcome = detail.get("outcome")
                self.gateway_latency.labels(
                    str(detail.get("role")),
                    known or OTHER_MODEL,
                    outcome if outcome in CALL_OUTCOMES else "other",
                ).observe(max(0.0, float(duration)))

    def _remember_queued(self, task_id: int, now: float) -> None:
        self._queued.pop(task_id, None)
        self._queued[task_id] = now
        while len(self._queued) > MAX_PENDING:
            del self._queued[next(iter(self._queued))]

    def _ended(self, task_id: object, outcome: str, now: float) -> None:
        if not isinstance(task_id, int):
            return
        running = self._running.pop(task_id, None)
        if running is not None:
            role, claimed = running
            self.task_duration.labels(role, outcome).observe(max(0.0, now - claimed))

    def collect(self) -> Iterator[Metric]:
        for metric in (
            self.claims,
            self.claim_latency,
            self.task_duration,
            self.crashes,
            self.gateway_latency,
        ):
            yield from metric.collect()


def _task_id(subject: str) -> int | None:
    """``task-12`` -> 12: the subject of a task's own events."""
    head, _, number = subject.partition("-")
    return int(number) if head == "task" and number.isascii() and number.isdigit() else None


async def follow(
    metrics: EventMetrics,
    feed: trio.MemoryReceiveChannel[tuple[str, str, dict[str, object]]],
    clock: Callable[[], float] = trio.current_time,
) -> None:
    """Feed ``metrics`` from the supervisor's event feed until cancelled."""
    async with feed:
        async for kind, subject, detail in feed:
            metrics.observe(kind, subject, detail, clock())
