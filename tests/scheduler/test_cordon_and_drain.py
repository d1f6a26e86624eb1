"""Cordon and drain on the real local stack: a cordoned node gets no new placements (and stays
cordoned through a scheduler restart); `ferry drain` moves every service off a node within the
other nodes' capacity, losing nothing, and says clearly what it could not move."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.common import topics
from services.common.bus import now_ms
from services.common.config import FerryConfig
from tests.conftest import ServiceProcesses, ferry, name, stack_config, start_system, wait_online
from tools.cli.operator import Operator
from tools.cli.simulate import Simulator

pytestmark = pytest.mark.asyncio(loop_scope="session")

CAPACITY = 3  # instances per node: the drain must respect it


@pytest.fixture(scope="module")
async def system(
    infra: FerryConfig, system_dir: Path, procs: ServiceProcesses, unikernel_builds: Path
) -> AsyncIterator[FerryConfig]:
    config, _ = stack_config(
        infra,
        system_dir,
        FERRY_EXECUTOR__CAPACITY=str(CAPACITY),
        FERRY_SCHEDULER__PHASE_TIMEOUT="15",
    )
    await start_system(config, procs, unikernel_builds)
    yield config


async def deploy(ops: Operator, service: str, node: str) -> None:
    await ops.command("deploy", service=service, app="counter", node=node, runtime="unix")
    await ops.wait_serving(service)


async def node_doc(ops: Operator, node: str) -> dict[str, object]:
    nodes = (await ops.query("list_nodes"))["nodes"]
    return next(doc for doc in nodes if doc["node"] == node)


async def until_instances(ops: Operator, node: str, count: int) -> None:
    """Wait until the statestore's view of ``node`` lists ``count`` instances."""
    async with asyncio.timeout(20):
        while True:
            instances = (await node_doc(ops, node)).get("instances", [])
            if len(instances) == count:  # type: ignore[arg-type]
                return
            await asyncio.sleep(0.2)


async def test_a_cordoned_node_gets_no_new_service_even_after_a_scheduler_restart(
    system: FerryConfig, ops: Operator, procs: ServiceProcesses
) -> None:
    cordoned = ferry(system, "cordon", "edge-b", "--reason", "new disk")
    assert cordoned.returncode == 0, cordoned.stderr
    try:
        nodes = ferry(system, "nodes")
        assert "yes: new disk" in nodes.stdout
        assert (await node_doc(ops, "edge-b")).get("cordon", {})["reason"] == "new disk"  # type: ignore[union-attr]
        service = name("cord")
        refused = ferry(system, "deploy", service, "--app", "counter", "--node", "edge-b",
                        "--runtime", "unix")  # fmt: skip
        assert refused.returncode == 1 and "node_cordoned" in refused.stderr
        assert "ferry uncordon edge-b" in refused.stderr and "Traceback" not in refused.stderr
        # the cordon is the scheduler's retained word: a restarted scheduler keeps it
        procs.kill("scheduler")
        since = now_ms()
        procs.start("scheduler")
        await wait_online(system, [topics.component_status("scheduler")], since=since)
        await deploy(ops, service, "edge-a")
        again = ferry(system, "migrate", service, "--to", "edge-b")
        assert again.returncode == 1 and "node_cordoned" in again.stderr
    finally:
        uncordoned = ferry(system, "uncordon", "edge-b")
        assert uncordoned.returncode == 0, uncordoned.stderr
    assert "cordon" not in await node_doc(ops, "edge-b")
    moved = ferry(system, "migrate", service, "--to", "edge-b", "--wait")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    await ops.command("stop", service=service)
    unknown = ferry(system, "cordon", "edge-zz")
    assert unknown.returncode == 1 and "unknown_node" in unknown.stderr


async def test_drain_moves_every_service_off_the_node_and_loses_nothing(
    system: FerryConfig, ops: Operator
) -> None:
    services = [name(f"drn{i}") for i in range(CAPACITY)]
    for service in services:
        await deploy(ops, service, "edge-a")
    await until_instances(ops, "edge-b", 0)
    simulators = [Simulator(system.broker, s, devices=1, rate=50) for s in services[:2]]
    for simulator in simulators:
        simulator.start()
    await asyncio.sleep(1)
    try:
        drained = await asyncio.to_thread(ferry, system, "drain", "edge-a", "--reason", "upgrade")
        assert drained.returncode == 0, drained.stdout + drained.stderr
        assert f"drained edge-a: {CAPACITY} moved, 0 not" in drained.stdout
        assert drained.stdout.count("committed") == CAPACITY
        for service in services:
            record = await ops.query("get_service", service=service)
            assert record["node"] == "edge-b" and record["status"] == "serving"
        migrations = (await ops.query("list_migrations", limit=CAPACITY))["migrations"]
        assert {m["service"] for m in migrations} == set(services)
        assert {m["trigger"] for m in migrations} == {"drain"}
        await asyncio.sleep(1)
        for simulator in simulators:
            report = await asyncio.to_thread(simulator.finish)
            assert report.sent > 50
            assert report.lost == [] and report.duplicated == []
        assert (await node_doc(ops, "edge-a")).get("cordon", {})["reason"] == "upgrade"  # type: ignore[union-attr]
    finally:
        ferry(system, "uncordon", "edge-a")
        for service in services:
            await ops.command("stop", service=service)


async def test_drain_with_no_room_elsewhere_moves_nothing_and_fails_clearly(
    system: FerryConfig, ops: Operator, procs: ServiceProcesses
) -> None:
    full = [name(f"full{i}") for i in range(CAPACITY)]
    stuck = [name(f"stay{i}") for i in range(2)]
    for service in full:
        await deploy(ops, service, "edge-b")
    for service in stuck:
        await deploy(ops, service, "edge-a")
    await until_instances(ops, "edge-b", CAPACITY)
    # A scheduler started now gets edge-b's retained full status, older than these instances
    # (their changes went by before it subscribed): it must ask edge-b for the present.
    procs.kill("scheduler")
    since = now_ms()
    procs.start("scheduler")
    await wait_online(system, [topics.component_status("scheduler")], since=since)
    try:
        drained = ferry(system, "drain", "edge-a")
        assert drained.returncode == 1, drained.stdout + drained.stderr
        assert "drained edge-a: 0 moved, 2 not" in drained.stdout
        assert drained.stdout.count("no online, uncordoned node with room offers unix") == 2
        assert "Traceback" not in drained.stdout + drained.stderr
        for service in stuck:  # still where they were, still serving
            record = await ops.query("get_service", service=service)
            assert record["node"] == "edge-a" and record["status"] == "serving"
    finally:
        ferry(system, "uncordon", "edge-a")
        for service in full + stuck:
            await ops.command("stop", service=service)
