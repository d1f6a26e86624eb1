"""The statestore's Prometheus metrics: requests as they are answered, storage at scrape time.

A request's seconds run from its arrival off the wire to its reply, so they include the time it
waited behind the messages handled before it (the statestore handles one at a time): what a
caller waits. Row counts come from the database on its own thread, like every other query.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from services.common.metrics import LATENCY_BUCKETS, MetricsServer

if TYPE_CHECKING:
    from services.statestore.service import StatestoreService


class StatestoreMetrics:
    """The registry of one statestore process (see the module docstring)."""

    def __init__(self) -> None:
        self.server = MetricsServer()
        registry = self.server.registry
        self.requests = Counter(
            "ferry_statestore_requests",
            "Requests answered, by op and result (ok or the error code).",
            ["op", "result"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "ferry_statestore_request_seconds",
            "Arrival to reply of one request, by op.",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def start(self, statestore: StatestoreService, host: str, port: int) -> None:
        async def read() -> list[Metric]:
            collected = CounterMetricFamily(
                "ferry_statestore_collected",
                "What retention removed: checkpoints (records), blobs (S3 objects), finished "
                "migrations, stopped services.",
                labels=["what"],
            )
            for what, count in statestore.collected.items():
                collected.add_metric([what], count)
            families: list[Metric] = [collected]
            if statestore._db is not None:
                counts = await statestore._call(statestore._db.storage_counts)
                rows = GaugeMetricFamily(
                    "ferry_statestore_rows",
                    "Rows per table (checkpoints: those retained for recovery and moves).",
                    labels=["table"],
                )
                for table, count in counts.items():
                    rows.add_metric([table], count)
                families.append(rows)
            return families

        self.server.add(read)
        self.server.start(host, port)

    def stop(self) -> None:
        self.server.stop()

    def answered(self, op: str, result: str, seconds: float) -> None:
        self.requests.labels(op, result).inc()
        self.request_seconds.labels(op).observe(seconds)
