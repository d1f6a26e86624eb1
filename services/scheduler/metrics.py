"""The scheduler's Prometheus metrics, taken from the phase events every migration emits.

``MigrationRunner.emit`` hands each event here before publishing it, so the numbers are exactly
what ``ferry migrations`` and the events topic say: a start per ``planned``, an end per
``committed`` / ``rolled_back`` / ``failed`` (with the final event's detail: downtime, bytes
moved, total time). Labels are bounded sets (kind, outcome, trigger, phase), never ids.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from services.common.metrics import LATENCY_BUCKETS, SIZE_BUCKETS, MetricsServer

if TYPE_CHECKING:
    from services.scheduler.service import Scheduler

OUTCOMES = {"committed": "committed", "rolled_back": "rolled_back", "failed": "failed"}
DURATION_BUCKETS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)


class SchedulerMetrics:
    """The registry of one scheduler process (see the module docstring)."""

    def __init__(self) -> None:
        self.server = MetricsServer()
        registry = self.server.registry
        self.started = Counter(
            "ferry_migrations_started",
            "Migrations planned (every kind: migrate, upgrade, suspend, resume, recover).",
            ["kind"],
            registry=registry,
        )
        self.queued = Counter(
            "ferry_migrations_queued",
            "Migrations that waited for a node slot (scheduler.max_parallel_per_node).",
            ["kind"],
            registry=registry,
        )
        self.ended = Counter(
            "ferry_migrations_ended",
            "Migrations finished, by outcome (committed, rolled_back, failed).",
            ["kind", "outcome"],
            registry=registry,
        )
        self.downtime = Histogram(
            "ferry_migration_downtime_seconds",
            "Source paused to target serving, of committed moves (migrate, upgrade).",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "ferry_migration_duration_seconds",
            "Planned to finished, by outcome.",
            ["kind", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.bytes_moved = Counter(
            "ferry_migration_moved_bytes",
            "Checkpoint bytes carried by committed migrations.",
            ["kind"],
            registry=registry,
        )
        self.checkpoint_size = Histogram(
            "ferry_migration_checkpoint_bytes",
            "Size of each checkpoint a migration stored.",
            ["kind"],
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        self.recoveries = Counter(
            "ferry_recoveries",
            "Recoveries of lost or failed services finished, by trigger and outcome.",
            ["trigger", "outcome"],
            registry=registry,
        )
        self.phase_failures = Counter(
            "ferry_migration_phase_failures",
            "Migration phases that failed (each leads to a roll-back or roll-forward).",
            ["kind", "phase"],
            registry=registry,
        )

    def start(self, scheduler: Scheduler, host: str, port: int) -> None:
        async def read() -> list[Metric]:
            busy = GaugeMetricFamily(
                "ferry_migrations_in_flight", "Services with a migration under way."
            )
            busy.add_metric([], len(scheduler.busy))
            nodes = GaugeMetricFamily(
                "ferry_nodes", "Nodes the scheduler knows, by status.", labels=["status"]
            )
            online = sum(1 for n in scheduler.nodes if scheduler.liveness.online(n))
            nodes.add_metric(["online"], online)
            nodes.add_metric(["offline"], len(scheduler.nodes) - online)
            return [busy, nodes]

        self.server.add(read)
        self.server.start(host, port)

    def stop(self) -> None:
        self.server.stop()

    def on_event(self, event: dict[str, Any]) -> None:
        """Count one phase event (see the module docstring)."""
        kind, phase = event["kind"], event["phase"]
        detail = event.get("detail") or {}
        if phase == "planned":
            self.started.labels(kind).inc()
        elif phase == "queued":
            self.queued.labels(kind).inc()
        elif phase == "checkpoint_stored" and isinstance(detail.get("bytes"), int | float):
            self.checkpoint_size.labels(kind).observe(detail["bytes"])
        outcome = OUTCOMES.get(phase)
        if outcome is None:
            return
        self.ended.labels(kind, outcome).inc()
        if isinstance(detail.get("total_ms"), int | float):
            self.duration.labels(kind, outcome).observe(detail["total_ms"] / 1000)
        if outcome == "committed":
            if isinstance(detail.get("downtime_ms"), int | float):
                self.downtime.labels(kind).observe(detail["downtime_ms"] / 1000)
            if isinstance(detail.get("bytes_moved"), int | float):
                self.bytes_moved.labels(kind).inc(detail["bytes_moved"])
        if kind == "recover":
            self.recoveries.labels(event.get("trigger") or "unknown", outcome).inc()

    def on_phase_failed(self, kind: str, phase: str) -> None:
        self.phase_failures.labels(kind, phase).inc()
