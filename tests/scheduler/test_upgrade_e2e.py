"""Upgrades on the real local stack: counter 1.0.0 (apps/counter.c) is moved into counter 2.0.0
(apps/counter_v2.c) under steady input, on its own node and onto another, with every input applied
once and the state transformed by the upgrade hook; an upgrade the hook refuses rolls back and
1.0.0 serves on; a downgrade is refused before anything moves."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.common import images, topics
from services.common.blobstore import BlobStore
from services.common.bus import Bus, RemoteError
from services.common.config import FerryConfig
from tests.conftest import ServiceProcesses, ferry, stack_config, start_system
from tools.cli.operator import Operator
from tools.cli.simulate import Simulator, reading_value

pytestmark = pytest.mark.asyncio(loop_scope="session")

NODES = ("edge-a", "edge-b")
BUILDS = Path(__file__).resolve().parents[2] / "unikernel" / "build"


@pytest.fixture(scope="module")
async def system(
    infra: FerryConfig, system_dir: Path, procs: ServiceProcesses, unikernel_builds: Path
) -> AsyncIterator[FerryConfig]:
    config, _ = stack_config(infra, system_dir, FERRY_SCHEDULER__PHASE_TIMEOUT="15")
    store = BlobStore(config.s3)
    await images.push(store, "counter", unikernel_builds, "counter_v2")  # 2.0.0 is pushed …
    # … and 1.0.0 is the latest
    await start_system(config, procs, unikernel_builds, apps=("counter",), nodes=NODES)
    yield config


async def deploy_v1(ops: Operator, system: FerryConfig, service: str, runtime: str) -> None:
    """Deploy counter 1.0.0 (pushed again as the latest: a test may have pushed 2.0.0)."""
    await images.push(BlobStore(system.s3), "counter", BUILDS)
    await ops.command("deploy", service=service, app="counter", node="edge-a", runtime=runtime)
    record = await ops.wait_serving(service)
    assert record["version"] == "1.0.0"


async def outputs_of(system: FerryConfig, service: str, into: list[dict[str, Any]]) -> None:
    async with Bus(system.broker, f"test-out-{uuid.uuid4().hex[:6]}") as bus:
        await bus.subscribe(topics.app_output(service))
        async for message in bus.messages():
            into.append(message.payload)


@pytest.mark.parametrize(("runtime", "target"), [("unix", None), ("microvm", "edge-b")])
async def test_an_upgrade_under_steady_input_transforms_the_state_and_loses_nothing(
    system: FerryConfig, ops: Operator, runtime: str, target: str | None
) -> None:
    service = f"up-{runtime}-{uuid.uuid4().hex[:4]}"
    await deploy_v1(ops, system, service, runtime)
    before = await ops.query("get_service", service=service)
    seen: list[dict[str, Any]] = []
    listener = asyncio.create_task(outputs_of(system, service, seen))
    simulator = Simulator(system.broker, service, devices=2, rate=100)
    simulator.start()
    await asyncio.sleep(1.5)
    started = await ops.command("upgrade", service=service, node=target, version="2.0.0")
    assert (started["from_version"], started["to_version"]) == ("1.0.0", "2.0.0")
    final = await ops.follow(started["migration"])
    assert final["phase"] == "committed", final
    assert final["kind"] == "upgrade"
    assert final["detail"]["from_version"] == "1.0.0" and final["detail"]["to_version"] == "2.0.0"
    await asyncio.sleep(1.5)
    report = await asyncio.to_thread(simulator.finish)
    await asyncio.sleep(0.3)
    listener.cancel()
    assert report.sent > 250 and report.lost == [] and report.duplicated == [], report.to_dict()

    record = await ops.query("get_service", service=service)
    assert record["version"] == "2.0.0" and record["status"] == "serving"
    assert record["node"] == (target or "edge-a") and record["epoch"] == before["epoch"] + 1
    assert record["image"] != before["image"]
    # every input applied once, and the upgrade hook's sums carried on by 2.0.0
    last: dict[str, dict[str, Any]] = {}
    for output in seen:
        last[output["producer"]] = output
    upgraded = [o for o in seen if "sum" in o["data"]]
    assert upgraded and all(o["data"]["count"] == o["seq"] for o in seen)
    for producer, output in last.items():
        data = output["data"]
        assert data["count"] == output["seq"] == simulator._sent[producer]
        exact = sum(reading_value(producer, seq) for seq in range(1, data["count"] + 1))
        assert data["sum"] == pytest.approx(exact, rel=1e-9)
    migration = await ops.query("get_migration", migration=started["migration"])
    assert migration["migration"]["kind"] == "upgrade"
    assert migration["migration"]["from_version"] == "1.0.0"
    assert migration["migration"]["to_version"] == "2.0.0"
    listing = ferry(system, "services")
    assert service in listing.stdout and "2.0.0" in listing.stdout
    shown = ferry(system, "migrations", "--limit", "5")
    assert "1.0.0 → 2.0.0" in shown.stdout
    await ops.command("stop", service=service)


async def test_an_upgrade_the_hook_refuses_rolls_back_and_1_0_0_serves_on(
    system: FerryConfig, ops: Operator
) -> None:
    service = f"refuse-{uuid.uuid4().hex[:4]}"
    await deploy_v1(ops, system, service, "unix")
    before = await ops.query("get_service", service=service)
    async with Bus(system.broker, f"test-big-{uuid.uuid4().hex[:6]}") as bus:
        for seq in (1, 2):  # a finite mean whose sum (mean x count) is beyond a float64
            reading = {"producer": "big", "seq": seq, "data": {"device": "big", "value": 1e308}}
            await bus.publish(topics.app_input(service), reading)
    seen: list[dict[str, Any]] = []
    listener = asyncio.create_task(outputs_of(system, service, seen))
    simulator = Simulator(system.broker, service, devices=1, rate=100)
    simulator.start()
    await asyncio.sleep(1.0)
    started = await ops.command("upgrade", service=service, version="2.0.0")
    final = await ops.follow(started["migration"])
    assert final["phase"] == "rolled_back", final
    error = final["detail"]["error"]
    # the guest's own words, whether its refusal or its exit reached the scheduler first
    assert "counter 2.0.0 refuses the state of 1.0.0" in error and "beyond a float64" in error
    await asyncio.sleep(1.0)
    report = await asyncio.to_thread(simulator.finish)
    await asyncio.sleep(0.3)
    listener.cancel()
    assert report.lost == [] and report.duplicated == [], report.to_dict()
    record = await ops.query("get_service", service=service)
    assert record["status"] == "serving" and record["version"] == "1.0.0"
    assert (record["instance"], record["image"]) == (before["instance"], before["image"])
    late = [o for o in seen if o["producer"] == "dev-1"][-20:]
    assert late and all("sum" not in o["data"] for o in late)  # 1.0.0 answered to the end
    await ops.command("stop", service=service)


async def test_a_downgrade_is_refused_before_anything_moves(
    system: FerryConfig, ops: Operator
) -> None:
    service = f"down-{uuid.uuid4().hex[:4]}"
    await deploy_v1(ops, system, service, "unix")
    same = ferry(system, "upgrade", service)
    assert same.returncode == 1 and "same_version" in same.stderr, same.stderr
    pushed = ferry(system, "image", "push", "counter", "--build", "counter_v2")
    assert pushed.returncode == 0, pushed.stderr
    assert f"ferry upgrade {service} --version 2.0.0" in pushed.stdout  # how to roll it out
    wrong = ferry(system, "image", "push", "counter_v2")
    assert wrong.returncode == 1 and "ferry image push counter --build counter_v2" in wrong.stderr
    upgraded = ferry(system, "upgrade", service, "--wait")
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert "1.0.0 → 2.0.0" in upgraded.stdout and "committed" in upgraded.stdout
    up = await ops.query("get_service", service=service)
    assert up["version"] == "2.0.0"
    down = ferry(system, "upgrade", service, "--version", "1.0.0")
    assert down.returncode == 1
    assert "upgrade_refused" in down.stderr and "a downgrade" in down.stderr, down.stderr
    assert "counter 1.0.0 does not restore the state of counter 2.0.0" in down.stderr
    with pytest.raises(RemoteError) as unknown:
        await ops.command("upgrade", service=service, version="9.9.9")
    assert unknown.value.code == "unknown_image"
    after = await ops.query("get_service", service=service)
    assert (after["version"], after["epoch"], after["instance"]) == (
        "2.0.0",
        up["epoch"],
        up["instance"],
    )
    await ops.command("stop", service=service)
