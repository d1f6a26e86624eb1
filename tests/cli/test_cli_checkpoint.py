"""``ferry checkpoint show SERVICE --fresh`` against the real stack (statestore, scheduler and an
executor as processes): the serving node takes a checkpoint on request, and it holds every input
applied so far, while periodic checkpoints are set an hour apart so none could. The fresh one is
recorded like a periodic one (the recovery point) and acknowledges its inputs: after a crash the
service recovers from it with nothing applied twice. Refusals (unknown, stopped, suspended, a
whole-image runtime) are one clear line and exit code 1."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from services.common import topics
from services.common.bus import Bus
from services.common.config import FerryConfig
from tests.conftest import ServiceProcesses, ferry, name, stack_config, start_system
from tools.cli.operator import Operator

pytestmark = pytest.mark.asyncio(loop_scope="session")

NODE = "edge-a"
INPUTS = 25
PHASE_TIMEOUT = 6


@pytest.fixture(scope="module")
async def system(
    infra: FerryConfig, system_dir: Path, procs: ServiceProcesses, unikernel_builds: Path
) -> AsyncIterator[FerryConfig]:
    # No periodic checkpoint within a test: only --fresh can show the inputs applied.
    config, _ = stack_config(
        infra,
        system_dir,
        FERRY_EXECUTOR__CHECKPOINT_INTERVAL="3600",
        FERRY_EXECUTOR__CHECKPOINT_INPUTS="100000",
        FERRY_SCHEDULER__RECOVERY_GRACE="0.5",
        FERRY_SCHEDULER__PHASE_TIMEOUT=str(PHASE_TIMEOUT),
        # Counters (checkpoints taken, input unacknowledged) come with the full status only.
        FERRY_EXECUTOR__STATUS_INTERVAL="1.0",
    )
    await start_system(config, procs, unikernel_builds, nodes=(NODE,))
    yield config


def shown_document(stdout: str) -> dict[str, Any]:
    """The decoded checkpoint `checkpoint show` prints after its one-line header."""
    document: dict[str, Any] = orjson.loads(stdout[stdout.index("{") : stdout.rindex("}") + 1])
    return document


async def send(config: FerryConfig, service: str, producer: str, seqs: range) -> list[int]:
    """Publish inputs and wait for the counter's answer to each; returns their ``total``s."""
    async with Bus(config.broker, f"test-fresh-{uuid.uuid4().hex[:6]}") as bus:
        await bus.subscribe(topics.app_output(service))
        for seq in seqs:
            await bus.publish(
                topics.app_input(service),
                {"producer": producer, "seq": seq, "data": {"value": float(seq)}},
            )
        totals: list[int] = []
        async with asyncio.timeout(20):
            async for message in bus.messages():
                if message.payload["producer"] == producer:
                    totals.append(message.payload["data"]["total"])
                    if len(totals) == len(seqs):
                        return totals
    raise AssertionError("unreachable")


async def test_fresh_shows_every_input_applied_while_the_latest_durable_one_cannot(
    system: FerryConfig, ops: Operator
) -> None:
    service = name("fresh")
    await ops.command("deploy", service=service, app="counter", node=NODE, runtime="unix")
    record = await ops.wait_serving(service)
    assert await send(system, service, "dev-1", range(1, INPUTS + 1)) == list(range(1, INPUTS + 1))
    latest = ferry(system, "checkpoint", "show", service)
    assert latest.returncode == 1 and "no checkpoint yet" in latest.stderr, latest.stderr
    assert "--fresh" in latest.stderr

    fresh = ferry(system, "checkpoint", "show", service, "--fresh")
    assert fresh.returncode == 0, fresh.stderr
    assert f"fresh, taken now on {NODE} by {record['instance']}" in fresh.stdout
    document = shown_document(fresh.stdout)
    assert document["watermark"] == {"dev-1": INPUTS}
    store = document["vars"]  # the app's typed store
    assert store["total"] == {"type": "int64", "value": INPUTS}, store
    assert store["count/dev-1"] == {"type": "int64", "value": INPUTS}, store

    # It acknowledged what it covers: the node reports nothing waiting for a checkpoint.
    summary = await instance_summary(ops, record["instance"], lambda i: i["checkpoints"] >= 1)
    assert summary["checkpoints"] == 1 and summary["unacknowledged"] == 0, summary
    # Recorded like a periodic one: now it is the latest durable checkpoint too ...
    again = ferry(system, "checkpoint", "show", service)
    assert again.returncode == 0, again.stderr
    assert shown_document(again.stdout)["watermark"] == {"dev-1": INPUTS}
    # ... the recovery point: the guest dies, the service recovers from it, and the next
    # input counts on from INPUTS (none applied twice, none lost).
    await kill_guest_and_wait_recovered(system, ops, service, record["instance"])
    assert await send(system, service, "dev-1", range(INPUTS + 1, INPUTS + 3)) == [
        INPUTS + 1,
        INPUTS + 2,
    ]
    assert ferry(system, "stop", service).returncode == 0
    assert ferry(system, "rm", service).returncode == 0


async def instance_summary(
    ops: Operator, instance: str, ready: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The statestore's view of ``instance`` once ``ready`` holds (its counters come with the
    node's full status, every ``executor.status_interval``)."""
    async with asyncio.timeout(10):
        while True:
            for node in (await ops.query("list_nodes"))["nodes"]:
                for entry in node.get("instances", []):
                    if entry["instance"] == instance and ready(entry):
                        summary: dict[str, Any] = entry
                        return summary
            await asyncio.sleep(0.1)


def guest_pid(system: FerryConfig, instance: str) -> int:
    workdir = system.stack.dir / "nodes" / NODE / "instances" / instance
    pid: int = orjson.loads((workdir / "instance.json").read_bytes())["pid"]
    return pid


async def kill_guest_and_wait_recovered(
    system: FerryConfig, ops: Operator, service: str, instance: str
) -> None:
    os.kill(guest_pid(system, instance), signal.SIGKILL)
    async with asyncio.timeout(30):
        while True:
            record = await ops.query("get_service", service=service)
            if record["instance"] != instance and record["status"] == "serving":
                return
            await asyncio.sleep(0.2)


async def test_fresh_refuses_a_service_that_does_not_serve(
    system: FerryConfig, ops: Operator
) -> None:
    unknown = ferry(system, "checkpoint", "show", "no-such-service", "--fresh")
    assert unknown.returncode == 1
    assert "unknown_service" in unknown.stderr and "no-such-service" in unknown.stderr

    service = name("idle")
    await ops.command("deploy", service=service, app="counter", node=NODE, runtime="unix")
    await ops.wait_serving(service)
    await send(system, service, "dev-2", range(1, 4))
    assert (await ops.move("suspend", service))["phase"] == "committed"
    suspended = ferry(system, "checkpoint", "show", service, "--fresh")
    assert suspended.returncode == 1, suspended.stdout
    assert f"not_serving: {service} is suspended, not serving" in suspended.stderr
    assert f"ferry checkpoint show {service}`" in suspended.stderr  # where its state is
    kept = ferry(system, "checkpoint", "show", service)  # the suspend's checkpoint, still there
    assert kept.returncode == 0 and shown_document(kept.stdout)["vars"]["total"]["value"] == 3

    await ops.move("resume", service, NODE)
    assert ferry(system, "stop", service).returncode == 0
    stopped = ferry(system, "checkpoint", "show", service, "--fresh")
    assert stopped.returncode == 1
    assert f"not_serving: {service} is stopped, not serving" in stopped.stderr
    assert ferry(system, "rm", service).returncode == 0


async def test_fresh_refuses_a_whole_image_runtime_and_it_keeps_serving(
    system: FerryConfig, ops: Operator
) -> None:
    nodes = {n["node"]: n for n in (await ops.query("list_nodes"))["nodes"]}
    if "microvm-snapshot" not in nodes[NODE].get("runtimes", []):
        pytest.skip(f"{NODE} offers no microvm-snapshot runtime here")
    service = name("snap")
    await ops.command(
        "deploy", service=service, app="counter", node=NODE, runtime="microvm-snapshot"
    )
    await ops.wait_serving(service, timeout=60)
    refused = ferry(system, "checkpoint", "show", service, "--fresh")
    assert refused.returncode == 1
    assert "whole_image_runtime" in refused.stderr and "microvm-snapshot" in refused.stderr
    assert await send(system, service, "dev-3", range(1, 3)) == [1, 2]  # undisturbed
    assert ferry(system, "stop", service).returncode == 0
    assert ferry(system, "rm", service).returncode == 0


async def test_a_guest_that_cannot_checkpoint_gives_a_clear_error_then_serves_on(
    system: FerryConfig, ops: Operator
) -> None:
    service = name("stuck")
    await ops.command("deploy", service=service, app="counter", node=NODE, runtime="unix")
    record = await ops.wait_serving(service)
    await send(system, service, "dev-4", range(1, 6))
    pid = guest_pid(system, record["instance"])
    os.kill(pid, signal.SIGSTOP)  # a guest that never reaches its next step boundary
    try:
        stuck = await asyncio.to_thread(ferry, system, "checkpoint", "show", service, "--fresh")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert stuck.returncode == 1, stuck.stdout
    assert "checkpoint_timeout" in stuck.stderr and f"within {PHASE_TIMEOUT} s" in stuck.stderr
    # Thawed, it answers the pending request and serves on; a fresh one then has everything.
    assert await send(system, service, "dev-4", range(6, 8)) == [6, 7]
    fresh = ferry(system, "checkpoint", "show", service, "--fresh")
    assert fresh.returncode == 0, fresh.stderr
    assert shown_document(fresh.stdout)["watermark"] == {"dev-4": 7}
    assert ferry(system, "stop", service).returncode == 0
    assert ferry(system, "rm", service).returncode == 0
