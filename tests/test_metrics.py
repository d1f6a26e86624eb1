"""Prometheus metrics scraped over HTTP from real statestore, scheduler and executor processes,
checked against what the test itself did: inputs sent, a committed move, a refused input."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.common import topics
from services.common.bus import Bus
from services.common.config import FerryConfig, load_config
from tests.conftest import ServiceProcesses, stack_config, start_system
from tools.cli.operator import Operator
from tools.cli.simulate import connect_paho
from tools.stack.ports import free_ports

pytestmark = pytest.mark.asyncio(loop_scope="session")

NODES = ("edge-a", "edge-b")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    names = ["statestore", "scheduler", *NODES]
    return dict(zip(names, free_ports("127.0.0.1", len(names)), strict=True))


@pytest.fixture(scope="module")
async def system(
    infra: FerryConfig,
    system_dir: Path,
    procs: ServiceProcesses,
    ports: dict[str, int],
    unikernel_builds: Path,
) -> AsyncIterator[FerryConfig]:
    # The statestore and scheduler read their port from [metrics]; each executor gets its own
    # with --metrics-port, as `ferry up` does.
    config, _ = stack_config(
        infra,
        system_dir,
        FERRY_METRICS__STATESTORE_PORT=str(ports["statestore"]),
        FERRY_METRICS__SCHEDULER_PORT=str(ports["scheduler"]),
        FERRY_EXECUTOR__CHECKPOINT_INTERVAL="0.2",
        FERRY_SCHEDULER__PHASE_TIMEOUT="3",
    )
    node_args = {node: ["--metrics-port", str(ports[node])] for node in NODES}
    await start_system(config, procs, unikernel_builds, nodes=NODES, node_args=node_args)
    yield config


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        return str(response.read().decode())


async def scrape(port: int) -> Samples:
    """Every sample of one endpoint, by (name, labels); fetched off the event loop."""
    text = await asyncio.to_thread(scrape_text, port)
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def until(
    port: int, name: str, expected: float, timeout: float = 20.0, **labels: str
) -> Samples:
    """Scrape until ``name{labels}`` reads ``expected`` (counters read at scrape time lag the
    guest by at most one step); fails naming the last value."""
    last = -1.0
    try:
        async with asyncio.timeout(timeout):
            while True:
                samples = await scrape(port)
                last = value(samples, name, **labels)
                if last == expected:
                    return samples
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"{name}{labels} is {last}, expected {expected}") from None


async def send_inputs(config: FerryConfig, service: str, producer: str, seqs: range) -> None:
    async with Bus(config.broker, f"test-in-{uuid.uuid4().hex[:6]}") as bus:
        for seq in seqs:
            body = {"producer": producer, "seq": seq, "data": {"device": producer, "value": 1.0}}
            await bus.publish(topics.app_input(service), body)


async def test_a_move_with_input_reads_the_same_in_every_components_metrics(
    system: FerryConfig, ports: dict[str, int]
) -> None:
    service = f"met-{uuid.uuid4().hex[:5]}"
    async with Operator(system) as ops:
        await ops.command("deploy", service=service, app="counter", node="edge-a", runtime="unix")
        await ops.wait_serving(service)
        await send_inputs(system, service, "dev-1", range(1, 51))
        on_a = await until(
            ports["edge-a"], "ferry_inputs_applied_total", 50, node="edge-a", service=service
        )
        assert value(on_a, "ferry_instances", node="edge-a", state="serving") == 1
        assert value(on_a, "ferry_outputs_submitted_total", node="edge-a", service=service) >= 50
        # periodic checkpoints (every 0.2 s) make all 50 safe to forget
        await until(
            ports["edge-a"], "ferry_inputs_unacknowledged", 0, node="edge-a", service=service
        )
        on_a = await scrape(ports["edge-a"])
        taken = value(
            on_a, "ferry_durable_checkpoints_total", node="edge-a", service=service, result="taken"
        )
        assert taken >= 1
        durable_uploads = value(
            on_a, "ferry_checkpoint_upload_seconds_count", node="edge-a", kind="durable"
        )
        assert durable_uploads >= taken

        final = await ops.move("migrate", service, "edge-b")
        assert final["phase"] == "committed", final
        downtime = final["detail"]["downtime_ms"] / 1000

        await send_inputs(system, service, "dev-1", range(51, 71))
        on_b = await until(
            ports["edge-b"], "ferry_inputs_applied_total", 20, node="edge-b", service=service
        )
        assert value(on_b, "ferry_instances", node="edge-b", state="serving") == 1
        on_a = await until(ports["edge-a"], "ferry_instances", 0, node="edge-a", state="serving")
        # the source's instance is gone with the move, and its series with it
        gone = ("ferry_inputs_applied_total", frozenset({("node", "edge-a"), ("service", service)}))
        assert gone not in on_a
        assert value(on_a, "ferry_checkpoint_upload_seconds_count", node="edge-a", kind="move") == 1

        sched = await scrape(ports["scheduler"])
        assert value(sched, "ferry_migrations_started_total", kind="migrate") == 1
        assert (
            value(sched, "ferry_migrations_ended_total", kind="migrate", outcome="committed") == 1
        )
        assert value(sched, "ferry_migration_downtime_seconds_count", kind="migrate") == 1
        assert value(sched, "ferry_migration_downtime_seconds_sum", kind="migrate") == (
            pytest.approx(downtime, abs=1e-6)
        )
        assert (
            value(sched, "ferry_migration_moved_bytes_total", kind="migrate")
            == (final["detail"]["bytes_moved"])
        )
        assert value(sched, "ferry_migration_checkpoint_bytes_count", kind="migrate") == 1
        assert value(sched, "ferry_migrations_in_flight") == 0
        assert value(sched, "ferry_nodes", status="online") == 2
        assert value(sched, "process_cpu_seconds_total") > 0

        store = await scrape(ports["statestore"])
        recorded = value(
            store, "ferry_statestore_requests_total", op="record_checkpoint", result="ok"
        )
        assert recorded >= taken + 1  # every durable checkpoint, and the move's
        total = sum(v for (n, _), v in store.items() if n == "ferry_statestore_requests_total")
        timed = sum(
            v for (n, _), v in store.items() if n == "ferry_statestore_request_seconds_count"
        )
        assert total == timed
        assert value(store, "ferry_statestore_rows", table="checkpoints") >= 1
        assert value(store, "ferry_statestore_requests_total", op="get_service", result="ok") >= 1
        await ops.command("stop", service=service)


async def test_a_refused_input_and_a_failed_move_are_counted(
    system: FerryConfig, ports: dict[str, int], procs: ServiceProcesses
) -> None:
    service = f"met-{uuid.uuid4().hex[:5]}"
    async with Operator(system) as ops:
        await ops.command("deploy", service=service, app="counter", node="edge-b", runtime="unix")
        await ops.wait_serving(service)
        client = connect_paho(system.broker, f"test-bad-{uuid.uuid4().hex[:6]}")
        try:
            malformed = {"producer": "dev-2", "seq": "two", "data": {}}
            client.publish(
                topics.app_input(service), orjson.dumps(malformed), qos=1
            ).wait_for_publish(10)
        finally:
            client.disconnect()
            client.loop_stop()
        await until(
            ports["edge-b"], "ferry_inputs_refused_total", 1, node="edge-b", service=service
        )
        # a target that stops answering (SIGSTOP) fails the move's first phase at its timeout;
        # the move rolls back and the source serves on
        before = await scrape(ports["scheduler"])
        os.killpg(procs.procs["executor@edge-a"].pid, signal.SIGSTOP)
        try:
            final = await ops.move("migrate", service, "edge-a")
        finally:
            os.killpg(procs.procs["executor@edge-a"].pid, signal.SIGCONT)
        assert final["phase"] == "rolled_back", final
        after = await scrape(ports["scheduler"])

        def delta(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        assert delta("ferry_migrations_started_total", kind="migrate") == 1
        assert delta("ferry_migrations_ended_total", kind="migrate", outcome="rolled_back") == 1
        assert delta("ferry_migrations_ended_total", kind="migrate", outcome="committed") == 0
        assert (
            delta("ferry_migration_phase_failures_total", kind="migrate", phase="target pre-boot")
            == 1
        )
        assert (
            delta("ferry_migration_duration_seconds_count", kind="migrate", outcome="rolled_back")
            == 1
        )
        assert delta("ferry_migration_downtime_seconds_count", kind="migrate") == 0
        on_b = await scrape(ports["edge-b"])
        assert value(on_b, "ferry_instances", node="edge-b", state="serving") == 1
        await ops.command("stop", service=service)


async def test_a_taken_metrics_port_stops_the_component_with_a_clear_error(
    system: FerryConfig, ports: dict[str, int]
) -> None:
    result = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "services.executor",
            "--config",
            str(system.source),
            "--node",
            "edge-c",
            "--metrics-port",
            str(ports["edge-a"]),  # edge-a's executor serves there
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"cannot serve metrics on 127.0.0.1:{ports['edge-a']}" in result.stderr
    assert "Traceback" not in result.stderr


async def test_ferry_up_gives_every_component_its_own_metrics_port(tmp_path: Path) -> None:
    """The whole local stack as `ferry up` starts it: each Ferry service serves /metrics on a
    port of its own, listed as Prometheus file_sd targets."""
    from tools.stack import Stack
    from tools.stack.stack import METRICS_TARGETS

    path = tmp_path / "test.toml"
    path.write_text(
        f'[stack]\ndir = "{tmp_path / "ferry"}"\nnodes = ["edge-a", "edge-b"]\n'
        '[executor]\nruntimes = ["unix"]\naccel = "tcg"\n'
    )
    stack = Stack(load_config(path, env={}))
    info = await stack.up()
    try:
        targets = orjson.loads((info.dir / METRICS_TARGETS).read_bytes())
        by_name = {
            (t["labels"]["component"], t["labels"].get("node")): t["targets"][0] for t in targets
        }
        assert set(by_name) == {
            ("statestore", None),
            ("scheduler", None),
            ("executor", "edge-a"),
            ("executor", "edge-b"),
        }
        assert len(set(by_name.values())) == 4  # no two share a port
        port = {key: int(address.rpartition(":")[2]) for key, address in by_name.items()}
        for node in ("edge-a", "edge-b"):
            samples = await scrape(port[("executor", node)])
            assert value(samples, "ferry_node_capacity", node=node) == 32
            assert value(samples, "ferry_instances", node=node, state="serving") == 0
        await until(port[("scheduler", None)], "ferry_nodes", 2, status="online")
        store = await scrape(port[("statestore", None)])
        assert value(store, "ferry_statestore_rows", table="nodes") == 2
    finally:
        await stack.down()


async def test_the_grafana_dashboard_reads_only_metrics_that_exist() -> None:
    """A renamed metric must not leave deploy/'s dashboard showing "no data"."""
    repo = Path(__file__).resolve().parents[1]
    dashboard = orjson.loads((repo / "deploy" / "grafana" / "ferry-dashboard.json").read_bytes())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(ferry_[a-z_]+)", e)}
    sources = "".join(p.read_text() for p in (repo / "services").rglob("metrics.py"))
    declared = set(re.findall(r'"(ferry_[a-z_]+)"', sources))
    suffixes = ("_bucket", "_count", "_sum", "_total")
    for metric in sorted(used):
        base = next((metric[: -len(s)] for s in suffixes if metric.endswith(s)), metric)
        assert metric in declared or base in declared, f"{metric} is not a Ferry metric"
    assert len(used) >= 15
