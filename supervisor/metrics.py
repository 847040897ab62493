"""``/metrics``: the fleet in Prometheus' text format, read at scrape time.

Nothing is counted twice: ``scrape`` asks the controller for the same status
and ledger that ``status --json`` and ``usage`` show, and ``FleetCollector``
turns that one snapshot into metric families. Labels are bounded: roles and
models come from swarm.yaml, states and kinds from fixed sets; no VM, agent or
task names, no prompts.

Families::

    fireclaw_vms{role,state}                  VMs now, by pool state
    fireclaw_role_degraded{role}              1 while a role is degraded
    fireclaw_role_target_vms{role}            the pool's target size
    fireclaw_vm_restarts{role}                restarts of the VMs now alive
    fireclaw_vm_ready_seconds{role,start}     gauge histogram: how long the VMs now
                                              alive took to be ready (snapshot restore
                                              or cold boot)
    fireclaw_tasks{state}                     tasks by state
    fireclaw_role_model_calls_total{role}     model calls metered by the gateway
    fireclaw_role_model_tokens_total{role,kind}
    fireclaw_model_calls_total{model}
    fireclaw_model_tokens_total{model,kind}
    fireclaw_budget_limit_tokens{scope}, fireclaw_budget_spent_tokens{scope},
    fireclaw_budget_remaining_tokens{scope}, fireclaw_budget_exhausted{scope}
    fireclaw_irc_enabled, fireclaw_irc_connected, fireclaw_ircd_up
    fireclaw_state_writable                   0 while the state disk refuses writes
    fireclaw_supervisor_resident_memory_bytes
    fireclaw_event_loop_lag_seconds, fireclaw_event_loop_lag_max_seconds

and those of supervisor/metrics_events.py (claims, claim latency, task
duration, crashes by cause, gateway latency), counted as events happen.
A ``model`` label is a model the config names or ``other``: a guest may ask
its gateway for any name, and a label must not grow with what it asks.

The event-loop lag comes from ``LoopLag``, a probe the listener runs beside
the app: how late the loop wakes a sleeper is how busy it is.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

import psutil
import trio
from fireclaw.supervisor.metrics_events import OTHER_MODEL
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from fireclaw.config import Config
    from fireclaw.supervisor.web_views import Fleet

__all__ = [
    "CONTENT_TYPE",
    "POOL_STATES",
    "FleetCollector",
    "LoopLag",
    "Snapshot",
    "config_models",
    "scrape",
]

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
#: The pool states ``fireclaw_vms`` reports, as ``status`` counts them per role.
POOL_STATES: Final = ("idle", "active", "starting", "backoff", "failed", "draining")
#: Buckets of ``fireclaw_vm_ready_seconds``: a snapshot restore takes well under
#: a second, a cold boot under TCG tens of seconds.
READY_BUCKETS: Final = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class LoopLag:
    """How late the event loop wakes a sleeper: a measure of how busy it is."""

    INTERVAL: Final = 0.5

    def __init__(self) -> None:
        self.last = 0.0
        self.worst = 0.0

    async def run(self) -> None:
        while True:
            start = trio.current_time()
            await trio.sleep(self.INTERVAL)
            self.last = max(0.0, trio.current_time() - start - self.INTERVAL)
            self.worst = max(self.worst, self.last)


class Snapshot:
    """What one scrape reads: status, the ledger per role and per model, and the process."""

    def __init__(
        self,
        status: Mapping[str, Any],
        by_role: Mapping[str, Any],
        by_model: Mapping[str, Any],
        *,
        rss: int,
        lag: float,
        lag_max: float,
        irc_connected: bool | None,
        models: frozenset[str] = frozenset(),
    ) -> None:
        self.status = status
        self.by_role = by_role
        self.by_model = by_model
        self.rss = rss
        self.lag = lag
        self.lag_max = lag_max
        self.irc_connected = irc_connected
        self.models = models


class FleetCollector(Collector):
    """Metric families from one ``Snapshot``; no state of its own."""

    def __init__(self, snap: Snapshot, events: Collector | None = None) -> None:
        self.snap = snap
        self.events = events

    def collect(self) -> Iterator[Metric]:
        status = self.snap.status
        roles: Mapping[str, Mapping[str, Any]] = status.get("roles") or {}

        vms = GaugeMetricFamily(
            "fireclaw_vms", "VMs by role and pool state", labels=["role", "state"]
        )
        degraded = GaugeMetricFamily(
            "fireclaw_role_degraded", "1 while the role cannot keep its pool", labels=["role"]
        )
        target = GaugeMetricFamily(
            "fireclaw_role_target_vms", "The pool size the role is kept at", labels=["role"]
        )
        for role, counts in roles.items():
            for state in POOL_STATES:
                vms.add_metric([role, state], float(counts.get(state, 0)))
            degraded.add_metric([role], 1.0 if counts.get("degraded") else 0.0)
            target.add_metric([role], float(counts.get("target") or 0))
        yield vms
        yield degraded
        yield target

        agents: list[Mapping[str, Any]] = list(status.get("agents") or [])
        restarts = GaugeMetricFamily(
            "fireclaw_vm_restarts", "Restarts of the VMs now alive, by role", labels=["role"]
        )
        restart_sum: dict[str, int] = dict.fromkeys(roles, 0)
        ready: dict[tuple[str, str], list[float]] = {}
        for a in agents:
            role = str(a.get("role"))
            if role not in restart_sum:
                continue  # a role being removed; its VMs are draining
            restart_sum[role] += int(a.get("restarts") or 0)
            seconds = a.get("ready_seconds")
            if seconds is not None:
                ready.setdefault((role, str(a.get("started_as") or "boot")), []).append(
                    float(seconds)
                )
        for role, n in restart_sum.items():
            restarts.add_metric([role], float(n))
        yield restarts

        hist = GaugeHistogramMetricFamily(
            "fireclaw_vm_ready_seconds",
            "How long the VMs now alive took from start to ready, by role and how they started",
            labels=["role", "start"],
        )
        for (role, start), values in sorted(ready.items()):
            buckets = [(_le(b), float(sum(1 for v in values if v <= b))) for b in READY_BUCKETS]
            buckets.append(("+Inf", float(len(values))))
            hist.add_metric([role, start], buckets, gsum_value=sum(values))
        yield hist

        tasks = GaugeMetricFamily("fireclaw_tasks", "Tasks by state", labels=["state"])
        for state, n in sorted((status.get("tasks") or {}).items()):
            tasks.add_metric([state], float(n))
        yield tasks

        yield from _ledger("role", self.snap.by_role)
        yield from _ledger("model", _known_models(self.snap.by_model, self.snap.models))
        yield from _budget(status)

        irc = status.get("irc") or {}
        yield _gauge("fireclaw_irc_enabled", "1 when the swarm is on IRC", irc.get("enabled"))
        if self.snap.irc_connected is not None:
            yield _gauge(
                "fireclaw_irc_connected",
                "1 while the overseer is registered on the IRC server",
                self.snap.irc_connected,
            )
        managed = irc.get("managed")
        if isinstance(managed, Mapping):
            yield _gauge(
                "fireclaw_ircd_up",
                "1 while the managed IRC server runs",
                managed.get("state") == "running",
            )
        disk = status.get("state") or {}
        yield _gauge(
            "fireclaw_state_writable",
            "0 while the state disk refuses writes",
            not isinstance(disk, Mapping) or disk.get("writable", True),
        )
        yield _gauge(
            "fireclaw_supervisor_resident_memory_bytes",
            "Resident memory of the supervisor process",
            self.snap.rss,
        )
        yield _gauge(
            "fireclaw_event_loop_lag_seconds",
            "How late the supervisor's event loop last woke a sleeper",
            self.snap.lag,
        )
        yield _gauge(
            "fireclaw_event_loop_lag_max_seconds",
            "The worst event loop lag since the listener started",
            self.snap.lag_max,
        )
        if self.events is not None:
            yield from self.events.collect()


def _le(bound: float) -> str:
    return repr(float(bound))


def _gauge(name: str, doc: str, value: object) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))  # type: ignore[arg-type]


def _ledger(by: str, usage: Mapping[str, Any]) -> Iterator[Metric]:
    prefix = "fireclaw_role_model" if by == "role" else "fireclaw_model"
    calls = CounterMetricFamily(
        f"{prefix}_calls", f"Model calls metered by the gateway, by {by}", labels=[by]
    )
    tokens = CounterMetricFamily(
        f"{prefix}_tokens", f"Tokens of metered model calls, by {by} and kind", labels=[by, "kind"]
    )
    for row in usage.get("rows") or []:
        key = row.get("key")
        if key is None:
            continue
        calls.add_metric([str(key)], float(row.get("calls") or 0))
        tokens.add_metric([str(key), "prompt"], float(row.get("prompt_tokens") or 0))
        tokens.add_metric([str(key), "completion"], float(row.get("completion_tokens") or 0))
    yield calls
    yield tokens


def _known_models(usage: Mapping[str, Any], models: frozenset[str]) -> dict[str, Any]:
    """``usage`` by model with every model not in ``models`` summed as ``other``."""
    rows: dict[str, dict[str, int]] = {}
    for row in usage.get("rows") or []:
        key = row.get("key")
        name = key if key in models else OTHER_MODEL
        into = rows.setdefault(name, {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0})
        for field in into:
            into[field] += int(row.get(field) or 0)
    return {"rows": [{"key": k, **v} for k, v in rows.items()]}


def config_models(config: Config) -> frozenset[str]:
    """The model names the config uses: the roles' and the managed server's."""
    names = {role.model for role in config.roles.values() if role.model}
    if config.models is not None and config.models.is_managed:
        names.add(config.models.managed.name)
    return frozenset(names)


def _budget(status: Mapping[str, Any]) -> Iterator[Metric]:
    models = status.get("models")
    budget = models.get("budget") if isinstance(models, Mapping) else None
    scopes: Mapping[str, Mapping[str, Any]] = (
        budget.get("scopes") or {} if isinstance(budget, Mapping) else {}
    )
    limit = GaugeMetricFamily("fireclaw_budget_limit_tokens", "Token budget", labels=["scope"])
    spent = GaugeMetricFamily(
        "fireclaw_budget_spent_tokens", "Tokens spent this budget period", labels=["scope"]
    )
    remaining = GaugeMetricFamily(
        "fireclaw_budget_remaining_tokens", "Tokens left this budget period", labels=["scope"]
    )
    exhausted = GaugeMetricFamily(
        "fireclaw_budget_exhausted", "1 while the budget is exhausted", labels=["scope"]
    )
    for scope, s in sorted(scopes.items()):
        lim, sp = int(s.get("limit") or 0), int(s.get("spent") or 0)
        limit.add_metric([scope], float(lim))
        spent.add_metric([scope], float(sp))
        remaining.add_metric([scope], float(max(0, lim - sp)))
        exhausted.add_metric([scope], 1.0 if s.get("exhausted") else 0.0)
    yield from (limit, spent, remaining, exhausted)


def _rss() -> int:
    return int(psutil.Process(os.getpid()).memory_info().rss)


async def scrape(fleet: Fleet, lag: LoopLag, events: Collector | None = None) -> bytes:
    """The fleet now, with ``events`` (supervisor/metrics_events.py), in the
    Prometheus text format."""
    status = await fleet.status()
    by_role = await fleet.usage("role", 0, None)
    by_model = await fleet.usage("model", 0, None)
    rss = await trio.to_thread.run_sync(_rss)
    overseer = fleet.overseer
    connected = None if overseer is None else overseer.client.registered
    snap = Snapshot(
        status,
        by_role,
        by_model,
        rss=rss,
        lag=lag.last,
        lag_max=lag.worst,
        irc_connected=connected,
        models=config_models(fleet.config),
    )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(snap, events))
    return generate_latest(registry)
