"""The whole system on the real local stack: statestore, scheduler and two executors as processes,
driven through the CLI and the operator API, with IoT input checked per sequence number."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from services.common import topics
from services.common.bus import Bus, RemoteError, now_ms
from services.common.config import FerryConfig
from tests.conftest import ServiceProcesses, ferry, name, stack_config, start_system, wait_online
from tools.cli.operator import Operator
from tools.cli.simulate import Simulator, publish_mobility

pytestmark = pytest.mark.asyncio(loop_scope="session")

NODES = ("edge-a", "edge-b")
LIMIT = 2


@pytest.fixture(scope="module")
async def system(
    infra: FerryConfig, system_dir: Path, procs: ServiceProcesses, unikernel_builds: Path
) -> AsyncIterator[FerryConfig]:
    config, _ = stack_config(
        infra,
        system_dir,
        FERRY_SCHEDULER__MAX_PARALLEL_PER_NODE=str(LIMIT),
        FERRY_SCHEDULER__PHASE_TIMEOUT="8",
        FERRY_SCHEDULER__MOBILITY_HYSTERESIS="1.0",
    )
    await start_system(config, procs, unikernel_builds, ("counter", "aggregator"), NODES)
    yield config


async def deploy(ops: Operator, service: str, node: str = "edge-a", runtime: str = "unix") -> None:
    await ops.command("deploy", service=service, app="counter", node=node, runtime=runtime)
    await ops.wait_serving(service)


async def test_deploy_and_migrate_from_the_cli(system: FerryConfig, ops: Operator) -> None:
    service = name("cli")
    deployed = ferry(
        system, "deploy", service, "--app", "counter", "--node", "edge-a", "--runtime", "microvm"
    )
    assert deployed.returncode == 0, deployed.stderr
    assert "deployed" in deployed.stdout
    moved = ferry(system, "migrate", service, "--to", "edge-b", "--wait")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    for phase in (
        "planned",
        "target_ready",
        "source_paused",
        "checkpoint_stored",
        "target_serving",
        "source_stopped",
        "committed",
    ):
        assert phase in moved.stdout
    assert "downtime" in moved.stdout and "bytes moved" in moved.stdout
    record = await ops.query("get_service", service=service)
    assert record["node"] == "edge-b" and record["status"] == "serving" and record["epoch"] == 2
    listing = ferry(system, "migrations", "--limit", "5")
    assert service in listing.stdout and "committed" in listing.stdout
    shown = ferry(system, "checkpoint", "show", service)
    assert shown.returncode == 0 and '"watermark"' in shown.stdout
    again = ferry(system, "migrate", service, "--to", "edge-b")
    assert again.returncode == 1 and "same_node" in again.stderr
    unknown = ferry(system, "migrate", "no-such-service", "--to", "edge-a")
    assert unknown.returncode == 1 and "unknown_service" in unknown.stderr
    await ops.command("stop", service=service)


async def test_a_mobility_event_moves_the_bound_service(system: FerryConfig, ops: Operator) -> None:
    service, device = name("mob"), name("dev")
    await ops.command(
        "deploy", service=service, app="counter", node="edge-a", runtime="unix", device=device
    )
    await ops.wait_serving(service)
    seen = ops.migrations_seen()
    # a device bouncing between cells within the hysteresis moves nothing ...
    publish_mobility(system.broker, device, "edge-b")
    publish_mobility(system.broker, device, "edge-a")
    await asyncio.sleep(1.5)
    assert all(ops._service_of.get(m) != service for m in ops.migrations_seen() - seen)
    # ... one that stays does
    publish_mobility(system.broker, device, "edge-b")
    migration = await ops.next_migration(service, seen)
    final = await ops.follow(migration)
    assert final["phase"] == "committed" and final["trigger"] == "mobility"
    assert (await ops.query("get_service", service=service))["node"] == "edge-b"
    await ops.command("stop", service=service)


async def test_eight_parallel_migrations_respect_the_limit_and_all_commit(
    system: FerryConfig, ops: Operator
) -> None:
    services = [name(f"par{i}") for i in range(8)]
    for service in services:
        await deploy(ops, service)
    started = await asyncio.gather(
        *(ops.command("migrate", service=s, node="edge-b") for s in services)
    )
    events: dict[str, list[dict[str, Any]]] = {}
    finals = await asyncio.gather(
        *(
            ops.follow(m["migration"], lambda e: events.setdefault(e["migration"], []).append(e))
            for m in started
        )
    )
    assert [f["phase"] for f in finals] == ["committed"] * 8
    queued = [m for m, evs in events.items() if any(e["phase"] == "queued" for e in evs)]
    assert len(queued) >= 8 - LIMIT
    # while a migration works (pre-boot done → target serving) it holds a slot on both nodes;
    # the commit after it holds none
    spans = []
    for evs in events.values():
        times = {e["phase"]: e["time"] for e in evs}
        spans.append((times["target_ready"], times["target_serving"]))
    for start, _ in spans:
        overlapping = sum(1 for s, e in spans if s <= start < e)
        assert overlapping <= LIMIT
    for service in services:
        await ops.command("stop", service=service)


async def test_suspend_then_resume_on_the_other_node_loses_nothing(
    system: FerryConfig, ops: Operator
) -> None:
    service = name("sus")
    await deploy(ops, service, runtime="microvm")
    simulator = Simulator(system.broker, service, devices=2, rate=100)
    simulator.start()
    await asyncio.sleep(1)
    suspended = await ops.move("suspend", service)
    assert suspended["phase"] == "committed"
    record = await ops.query("get_service", service=service)
    assert record["status"] == "suspended" and record["node"] is None
    await asyncio.sleep(1)  # input keeps arriving and queues in the broker
    resumed = await ops.move("resume", service, "edge-b")
    assert resumed["phase"] == "committed", resumed
    await asyncio.sleep(1)
    report = await asyncio.to_thread(simulator.finish)
    assert report.sent > 250
    assert report.lost == [] and report.duplicated == []
    assert set(report.nodes) == {"edge-a", "edge-b"}
    await ops.command("stop", service=service)


async def test_target_killed_mid_migration_rolls_back_and_loses_nothing(
    system: FerryConfig, ops: Operator, procs: ServiceProcesses
) -> None:
    service = name("kill")
    await deploy(ops, service)
    watcher = Bus(system.broker, f"test-errors-{uuid.uuid4().hex[:6]}")
    await watcher.__aenter__()
    await watcher.subscribe(topics.ERRORS)
    simulator = Simulator(system.broker, service, devices=1, rate=100)
    simulator.start()
    await asyncio.sleep(0.5)
    started = await ops.command("migrate", service=service, node="edge-b")

    def kill_target_once_paused(event: dict[str, Any]) -> None:
        if event["phase"] == "source_paused" and "executor@edge-b" in procs.procs:
            procs.kill("executor@edge-b")

    final = await ops.follow(started["migration"], kill_target_once_paused)
    assert final["phase"] == "rolled_back", final
    assert "restore" in final["detail"]["error"] or "pre-boot" in final["detail"]["error"]
    record = await ops.query("get_service", service=service)
    assert record["node"] == "edge-a" and record["status"] == "serving"
    await asyncio.sleep(0.5)
    report = await asyncio.to_thread(simulator.finish)
    assert report.lost == [] and report.duplicated == [], report.to_dict()
    assert set(report.nodes) == {"edge-a"}
    async with asyncio.timeout(10):  # the scheduler reports the dead node to operators
        async for message in watcher.messages():
            if "edge-b went offline" in message.payload["reason"]:
                break
    await watcher.close()
    restarted = now_ms()
    procs.start("executor@edge-b", "--node", "edge-b")
    await wait_online(system, [topics.node_status("edge-b")], since=restarted)
    await ops.command("stop", service=service)


@pytest.mark.parametrize("victim", ["scheduler", "statestore"])
async def test_control_plane_restart_mid_migration_finishes_it_with_a_whole_record(
    system: FerryConfig, ops: Operator, procs: ServiceProcesses, victim: str
) -> None:
    service = name(f"re-{victim}")
    await deploy(ops, service)
    simulator = Simulator(system.broker, service, devices=1, rate=50)
    simulator.start()
    started = await ops.command("migrate", service=service, node="edge-b")

    killed = asyncio.Event()

    def kill_on_target_ready(event: dict[str, Any]) -> None:
        if event["phase"] == "target_ready" and victim in procs.procs:
            procs.kill(victim)
            killed.set()

    following = asyncio.create_task(
        ops.follow(started["migration"], kill_on_target_ready, timeout=90)
    )
    await asyncio.wait(
        [following, asyncio.create_task(killed.wait())],
        timeout=30,
        return_when=asyncio.FIRST_COMPLETED,
    )
    assert killed.is_set(), "the migration should have reached target_ready"
    restarted = now_ms()
    procs.start(victim)
    await wait_online(system, [topics.component_status(victim)], since=restarted)
    final = await following
    assert final["phase"] in ("committed", "rolled_back"), final
    await asyncio.sleep(1)
    record = await ops.query("get_migration", migration=started["migration"])
    phases = [e["phase"] for e in record["events"]]
    assert phases[0] == "planned" and phases[-1] == final["phase"]
    assert record["migration"]["outcome"] == final["phase"]
    service_record = await ops.query("get_service", service=service)
    assert service_record["status"] == "serving"
    report = await asyncio.to_thread(simulator.finish)
    assert report.lost == [] and report.duplicated == [], report.to_dict()
    await ops.command("stop", service=service)


async def test_operator_views_services_nodes_and_watch(system: FerryConfig, ops: Operator) -> None:
    service = name("view")
    await deploy(ops, service)
    watch = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tools.cli", "--config", str(system.source), "watch",
        "migrations/#", stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await asyncio.sleep(3.0)  # the subprocess starts, connects, subscribes (slow under load)
        final = await ops.move("migrate", service, "edge-b")
        assert final["phase"] == "committed"
        await asyncio.sleep(0.5)
    finally:
        watch.terminate()
        output, _ = await watch.communicate()
    streamed = output.decode()
    assert f"{service} migrate edge-a → edge-b: committed" in streamed
    services = ferry(system, "services")
    assert service in services.stdout and "edge-b" in services.stdout
    nodes = ferry(system, "nodes")
    assert "edge-a" in nodes.stdout and "online" in nodes.stdout and "tcg" in nodes.stdout
    await ops.command("stop", service=service)


async def test_a_guest_that_dies_is_recovered_from_its_checkpoint_with_nothing_lost(
    system: FerryConfig, ops: Operator
) -> None:
    """kill -9 of the guest under steady input: the scheduler restores the service from its
    latest durable checkpoint, the broker replays what the checkpoint does not cover, and the
    state is exactly as without the crash (the counter of the last input equals its seq)."""
    service = name("crash")
    await deploy(ops, service)
    record = await ops.query("get_service", service=service)
    workdir = system.stack.dir / "nodes" / "edge-a" / "instances" / record["instance"]
    pid = orjson.loads((workdir / "instance.json").read_bytes())["pid"]
    counts: dict[int, int] = {}
    async with Bus(system.broker, f"test-watch-{uuid.uuid4().hex[:6]}") as watcher:
        await watcher.subscribe(topics.ERRORS)
        await watcher.subscribe(topics.app_output(service))
        simulator = Simulator(system.broker, service, devices=1, rate=200)
        simulator.start()
        await asyncio.sleep(2.5)  # a few durable checkpoints, and input not yet covered
        os.kill(pid, signal.SIGKILL)
        reported = False
        async with asyncio.timeout(30):
            async for message in watcher.messages():
                if message.topic == topics.ERRORS:
                    reported = reported or (
                        f"{service}: " in message.payload["reason"]
                        and ("recovering it on" in message.payload["reason"])
                    )
                else:
                    counts[message.payload["seq"]] = message.payload["data"]["count"]
                if reported and message.topic != topics.ERRORS:
                    recovered = await ops.query("get_service", service=service)
                    if recovered["epoch"] == 2 and recovered["status"] == "serving":
                        break
        await asyncio.sleep(1.5)
        simulator.stop_sending()
        sent = simulator.report().sent
        async with asyncio.timeout(20):
            async for message in watcher.messages():
                if message.topic == topics.app_output(service):
                    counts[message.payload["seq"]] = message.payload["data"]["count"]
                if max(counts, default=0) >= sent:
                    break
    report = await asyncio.to_thread(simulator.finish)
    assert report.lost == [], report.to_dict()  # outputs of replayed inputs may repeat
    # every input applied exactly once: the counter of input n is n, also after the crash
    assert counts[sent] == sent
    assert all(counts[seq] == seq for seq in counts), {
        seq: c for seq, c in counts.items() if c != seq
    }
    recovered = await ops.query("get_service", service=service)
    assert recovered["instance"] == f"{service}.2"
    await ops.command("stop", service=service)


async def test_stop_purge_forgets_the_service_and_its_checkpoints_at_once(
    system: FerryConfig, ops: Operator
) -> None:
    service = name("purge")
    await deploy(ops, service)
    simulator = Simulator(system.broker, service, devices=1, rate=50)
    simulator.start()
    await asyncio.sleep(1.5)  # periodic checkpoints: one a second
    await asyncio.to_thread(simulator.finish)
    assert (await ops.query("list_checkpoints", service=service))["checkpoints"]
    stopped = ferry(system, "stop", service, "--purge")
    assert stopped.returncode == 0, stopped.stderr
    assert f"stopped {service}; purged:" in stopped.stdout and "checkpoint(s)" in stopped.stdout
    with pytest.raises(RemoteError) as unknown:
        await ops.query("get_service", service=service)
    assert unknown.value.code == "unknown_service"
    assert (await ops.query("list_checkpoints", service=service))["checkpoints"] == []
    assert service not in ferry(system, "services").stdout
