"""The executor's Prometheus metrics: what its instances already count, read at scrape time.

Labels are ``node`` and ``service`` (never the instance id or producer, which would grow without
bound); two instances of one service on a node (an upgrade in place) are summed. An instance's
counters start from zero when it starts, so a move reads as a counter reset here and a new
series on the target node: ``rate()`` and ``increase()`` handle both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from services.common.metrics import LATENCY_BUCKETS, MetricsServer
from services.common.states import InstanceState

if TYPE_CHECKING:
    from services.executor.instance import Instance
    from services.executor.service import Executor

STATES = tuple(state.value for state in InstanceState)

#: Per-service counters: metric name, help, and how to read it from an instance.
_PER_SERVICE_COUNTERS: tuple[tuple[str, str, Callable[[Instance], float]], ...] = (
    ("ferry_inputs_applied", "Inputs the guest applied.", lambda i: i.applied),
    ("ferry_inputs_dropped", "Inputs the guest dropped as already applied.", lambda i: i.dropped),
    ("ferry_inputs_refused", "Inputs refused and dead-lettered.", lambda i: i.refused),
    ("ferry_outputs_submitted", "Outputs the guest produced.", lambda i: i.outputs.submitted),
    ("ferry_outputs_confirmed", "Outputs the broker accepted.", lambda i: i.outputs.confirmed),
    ("ferry_outputs_dropped", "Outputs dropped as unsendable.", lambda i: i.outputs.dropped),
    (
        "ferry_output_publish_failures",
        "Output batches the broker did not accept (sent again).",
        lambda i: i.outputs.failures,
    ),
)


class ExecutorMetrics:
    """The registry of one executor process (see the module docstring)."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.server = MetricsServer()
        registry = self.server.registry
        self.upload_seconds = Histogram(
            "ferry_checkpoint_upload_seconds",
            "Time to store one checkpoint in S3 (move: the service is down meanwhile).",
            ["node", "kind"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.guest_failures = Counter(
            "ferry_guest_failures",
            "Guests that ended on their own (crash, app failure).",
            ["node"],
            registry=registry,
        )

    def start(self, host: str, port: int) -> None:
        self.server.add(self._read)
        self.server.start(host, port)

    def stop(self) -> None:
        self.server.stop()

    def observe_upload(self, kind: str, seconds: float) -> None:
        self.upload_seconds.labels(self.executor.node, kind).observe(seconds)

    async def _read(self) -> list[Metric]:
        executor = self.executor
        node = executor.node
        instances = list(executor.instances.values())
        by_state = dict.fromkeys(STATES, 0)
        for instance in instances:
            by_state[instance.state] = by_state.get(instance.state, 0) + 1
        running = {i.service for i in instances}
        by_state["lost"] += sum(1 for service in executor.lost if service not in running)
        states = GaugeMetricFamily(
            "ferry_instances", "Instances on this node by state.", labels=["node", "state"]
        )
        for state, count in by_state.items():
            states.add_metric([node, state], count)
        capacity = GaugeMetricFamily(
            "ferry_node_capacity", "Instances this node accepts.", labels=["node"]
        )
        capacity.add_metric([node], executor.config.executor.capacity)
        cleaned = GaugeMetricFamily(
            "ferry_executor_cleaned_up_instances",
            "Guests of an earlier executor process ended at start-up (its restart lost them).",
            labels=["node"],
        )
        cleaned.add_metric([node], len(executor.cleaned_up))
        families: list[Metric] = [states, capacity, cleaned]

        labels = ["node", "service"]
        for name, doc, read in _PER_SERVICE_COUNTERS:
            family = CounterMetricFamily(name, doc, labels=labels)
            for service, value in _summed(instances, read).items():
                family.add_metric([node, service], value)
            families.append(family)
        unacked = GaugeMetricFamily(
            "ferry_inputs_unacknowledged",
            "Inputs received but not yet safe to forget (the broker redelivers them on a crash).",
            labels=labels,
        )
        pending = GaugeMetricFamily(
            "ferry_outputs_pending", "Outputs not yet accepted by the broker.", labels=labels
        )
        checkpoints = CounterMetricFamily(
            "ferry_durable_checkpoints",
            "Periodic durable checkpoints, by result.",
            labels=[*labels, "result"],
        )
        summaries = {id(i): i.summary() for i in instances}
        for service, value in _summed(
            instances, lambda i: summaries[id(i)]["unacknowledged"]
        ).items():
            unacked.add_metric([node, service], value)
        for service, value in _summed(
            instances, lambda i: i.outputs.submitted - i.outputs.confirmed
        ).items():
            pending.add_metric([node, service], value)
        for service, value in _summed(instances, lambda i: summaries[id(i)]["checkpoints"]).items():
            checkpoints.add_metric([node, service, "taken"], value)
        for service, value in _summed(instances, lambda i: i.durable_failures).items():
            checkpoints.add_metric([node, service, "failed"], value)
        families += [unacked, pending, checkpoints]
        return families


def _summed(instances: list[Instance], read: Callable[[Instance], float]) -> dict[str, float]:
    """``read(instance)`` summed per service."""
    totals: dict[str, float] = {}
    for instance in instances:
        totals[instance.service] = totals.get(instance.service, 0) + read(instance)
    return totals
