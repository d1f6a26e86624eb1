"""The CLI against the real stack (statestore, scheduler and an executor as processes): declared
parameters typed and checked at deploy, ``image show``, ``simulate`` on an app that answers only
some inputs, ``rm``, a ready ``mosquitto_pub`` line from ``ferry env``, and a dead guest's report
carrying the last lines of its console."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from services.common import images, topics
from services.common.blobstore import BlobStore
from services.common.bus import Bus, RemoteError
from services.common.config import FerryConfig
from tests.conftest import ServiceProcesses, ferry, name, stack_config, wait_online
from tools.cli.operator import Operator

pytestmark = pytest.mark.asyncio(loop_scope="session")

NODE = "edge-a"


@pytest.fixture(scope="module")
async def system(
    infra: FerryConfig, system_dir: Path, procs: ServiceProcesses, unikernel_builds: Path
) -> AsyncIterator[FerryConfig]:
    config, _ = stack_config(infra, system_dir)
    store = BlobStore(config.s3)
    for app in ("counter", "aggregator", "threshold"):
        await images.push(store, app, unikernel_builds)
    procs.start("statestore")
    procs.start("scheduler")
    procs.start(f"executor@{NODE}", "--node", NODE)
    await wait_online(
        config,
        [
            topics.component_status("statestore"),
            topics.component_status("scheduler"),
            topics.node_status(NODE),
        ],
    )
    yield config


async def test_image_show_lists_the_declared_parameters(system: FerryConfig) -> None:
    shown = ferry(system, "image", "show", "aggregator")
    assert shown.returncode == 0, shown.stderr
    for word in ("aggregator 1.0.0", "window", "int64", "64", "threshold", "float64", "history"):
        assert word in shown.stdout
    assert "parameters: none" in ferry(system, "image", "show", "counter").stdout
    missing = ferry(system, "image", "show", "no-such-app")
    assert missing.returncode == 1 and "ferry image push no-such-app" in missing.stderr


async def test_deploy_types_params_by_the_declaration_and_refuses_bad_ones(
    system: FerryConfig, ops: Operator
) -> None:
    service = name("agg")
    base = ("deploy", service, "--app", "aggregator", "--node", NODE, "--runtime", "unix")
    typo = ferry(system, *base, "--param", "windw=8")
    assert typo.returncode == 2
    assert "no parameter 'windw'" in typo.stderr and "window, threshold" in typo.stderr
    wrong = ferry(system, *base, "--param", "window=8.5")
    assert wrong.returncode == 2 and "'window' is int64" in wrong.stderr
    with pytest.raises(RemoteError) as absent:  # nothing was made
        await ops.query("get_service", service=service)
    assert absent.value.code == "unknown_service"
    with pytest.raises(RemoteError) as refused:  # the scheduler checks whoever deploys
        await ops.command(
            "deploy",
            service=service,
            app="aggregator",
            node=NODE,
            runtime="unix",
            params={"window": "8"},
        )
    assert refused.value.code == "bad_params"
    deployed = ferry(system, *base, "--param", "window=8", "--param", "threshold=30")
    assert deployed.returncode == 0, deployed.stderr
    record = await ops.wait_serving(service)
    assert record["params"] == {"window": 8, "threshold": 30.0}
    assert isinstance(record["params"]["threshold"], float)
    assert ferry(system, "stop", service).returncode == 0
    assert ferry(system, "rm", service).returncode == 0


async def test_simulate_judges_an_alerting_app_by_what_was_applied(
    system: FerryConfig, ops: Operator
) -> None:
    service = name("alert")
    await ops.command("deploy", service=service, app="threshold", node=NODE, runtime="unix")
    await ops.wait_serving(service)
    run = ferry(system, "simulate", service, "--rate", "40", "--duration", "2")
    assert run.returncode == 0, run.stdout + run.stderr
    report = orjson.loads(run.stdout[run.stdout.index("{") : run.stdout.rindex("}") + 1])
    assert report["judged_by"] == "applied" and report["lost"] == 0
    assert report["applied"] == report["sent"] > 0
    assert 0 < report["outputs"] < report["sent"]  # only readings above 25 raise an alert
    assert "nothing lost" in run.stdout
    # the per-input judgement of an app that answers everything calls the silent inputs lost
    strict = ferry(
        system, "simulate", service, "--rate", "40", "--duration", "1", "--expect-outputs"
    )
    assert strict.returncode == 1 and '"judged_by": "outputs"' in strict.stdout
    await ops.command("stop", service=service)


async def test_simulate_after_a_guest_crash_sees_the_service_recovered_with_nothing_lost(
    system: FerryConfig, ops: Operator
) -> None:
    """The guest is killed before any input: the scheduler recovers the service (fresh, since
    it has no checkpoint yet, and nothing was acknowledged), and simulate, judging by the
    executor's count of applied inputs, finds every input applied."""
    service = name("dead")
    await ops.command("deploy", service=service, app="threshold", node=NODE, runtime="unix")
    record = await ops.wait_serving(service)
    os.kill(guest_pid(system, record["instance"]), signal.SIGKILL)
    async with asyncio.timeout(20):
        while (await ops.query("get_service", service=service)).get("epoch") != 2:  # noqa: ASYNC110 (polling the registry)
            await asyncio.sleep(0.2)
    await ops.wait_serving(service)
    run = ferry(system, "simulate", service, "--rate", "40", "--duration", "1")
    assert run.returncode == 0, run.stdout + run.stderr
    report = orjson.loads(run.stdout[run.stdout.index("{") : run.stdout.rindex("}") + 1])
    assert report["judged_by"] == "applied" and report["applied"] == report["sent"] > 0
    assert report["lost"] == 0
    await ops.command("stop", service=service)
    assert ferry(system, "rm", service).returncode == 0


def guest_pid(system: FerryConfig, instance: str) -> int:
    workdir = system.stack.dir / "nodes" / NODE / "instances" / instance
    pid: int = orjson.loads((workdir / "instance.json").read_bytes())["pid"]
    return pid


async def test_rm_removes_only_stopped_or_failed_services(
    system: FerryConfig, ops: Operator
) -> None:
    service = name("rm")
    await ops.command("deploy", service=service, app="counter", node=NODE, runtime="unix")
    await ops.wait_serving(service)
    live = ferry(system, "rm", service)
    assert live.returncode == 1 and "stop it first" in live.stderr
    assert service in ferry(system, "services").stdout
    assert ferry(system, "stop", service).returncode == 0
    assert service in ferry(system, "services").stdout  # stopped: still listed ...
    removed = ferry(system, "rm", service)
    assert removed.returncode == 0 and f"removed {service}" in removed.stdout
    assert service not in ferry(system, "services").stdout  # ... until removed
    again = ferry(system, "rm", service)
    assert again.returncode == 1 and "unknown_service" in again.stderr


async def test_a_dead_guests_report_carries_its_last_console_lines(
    system: FerryConfig, ops: Operator
) -> None:
    service = name("crash")
    await ops.command("deploy", service=service, app="counter", node=NODE, runtime="unix")
    record = await ops.wait_serving(service)
    workdir = system.stack.dir / "nodes" / NODE / "instances" / record["instance"]
    # What the microvm trap handler prints before the guest ends, here on the unix guest's console
    # (its stderr, which the guest holds open), so the report must come from the file's tail.
    with (workdir / "guest.log").open("a") as console:
        console.write("ferry: fault: #UD rip=0x1001af [/not markup]\n")
    async with Bus(system.broker, f"test-errors-{uuid.uuid4().hex[:6]}") as watcher:
        await watcher.subscribe(topics.ERRORS)
        os.kill(guest_pid(system, record["instance"]), signal.SIGKILL)
        async with asyncio.timeout(15):
            async for message in watcher.messages():
                if (
                    f"{service}: " in message.payload["reason"]
                    and "recovering" in (message.payload["reason"])
                ):
                    reason = message.payload["reason"]
                    break
    assert "#UD rip=0x1001af" in reason and "guest.log" in reason
    async with asyncio.timeout(20):  # and the service serves again, recovered
        while True:
            record = await ops.query("get_service", service=service)
            if record["epoch"] == 2 and record["status"] == "serving":
                break
            await asyncio.sleep(0.2)
    await ops.command("stop", service=service)
    removed = ferry(system, "rm", service)
    assert removed.returncode == 0, removed.stderr


async def test_the_mosquitto_pub_line_of_ferry_env_reaches_a_service(
    system: FerryConfig, ops: Operator
) -> None:
    service = name("env")
    await ops.command("deploy", service=service, app="counter", node=NODE, runtime="unix")
    await ops.wait_serving(service)
    env = ferry(system, "env")
    line = next(x for x in env.stdout.splitlines() if "mosquitto_pub" in x)
    command = shlex.split(line.lstrip("# ").replace("SERVICE", service))
    async with Bus(system.broker, f"test-out-{uuid.uuid4().hex[:6]}") as reader:
        await reader.subscribe(topics.app_output(service))
        await asyncio.to_thread(subprocess.run, command, check=True, timeout=30)
        async with asyncio.timeout(15):
            async for message in reader.messages():
                assert message.payload["producer"] == "dev-1" and message.payload["seq"] == 1
                assert message.payload["data"]["count"] == 1
                break
    await ops.command("stop", service=service)
    await ops.command("rm", service=service)


async def test_ferry_publish_reaches_a_service_and_refuses_a_bad_input(
    system: FerryConfig, ops: Operator
) -> None:
    service = name("pub")
    await ops.command("deploy", service=service, app="counter", node=NODE, runtime="unix")
    await ops.wait_serving(service)
    async with Bus(system.broker, f"test-out-{uuid.uuid4().hex[:6]}") as reader:
        await reader.subscribe(topics.app_output(service))
        bad = await asyncio.to_thread(
            ferry, system, "publish", service, '{"producer": "dev-9", "seq": 0, "data": {}}'
        )
        assert bad.returncode == 2 and "seq" in bad.stderr, bad.stderr
        broken = await asyncio.to_thread(ferry, system, "publish", service, "{nope")
        assert broken.returncode == 2 and "not JSON" in broken.stderr
        reading = '{"producer": "dev-7", "seq": 1, "data": {"value": 20.0}}'
        done = await asyncio.to_thread(ferry, system, "publish", service, reading)
        assert done.returncode == 0, done.stderr
        assert "acknowledged" in done.stdout
        async with asyncio.timeout(15):
            async for message in reader.messages():
                # the refused inputs were never sent: the first answer is dev-7's
                assert message.payload["producer"] == "dev-7" and message.payload["seq"] == 1
                assert message.payload["data"]["total"] == 1
                break
    await ops.command("stop", service=service)
    await ops.command("rm", service=service)
