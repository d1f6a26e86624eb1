"""Two real executor processes on the real broker and S3 store: start, feed input, checkpoint on
one, restore on the other, continue — with outputs compared against an uninterrupted run, steady
input checked per sequence number, and the failure cases that must leave the source resumable."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from services.common import checkpoint_blob, contract, images, node_view, topics
from services.common.blobstore import BlobRef, BlobStore
from services.common.bus import Bus, RemoteError, now_ms
from services.common.config import FerryConfig
from services.executor.runtimes import REGISTRY
from services.executor.service import instance_dir
from tests.conftest import ServiceProcesses, stack_config, wait_online
from tools.cli.simulate import Simulator

RUNTIMES = ["unix", "microvm"]
WHOLE_IMAGE = ["microvm-snapshot", "podman"]


class Node:
    """Commands to one executor, the way the scheduler sends them."""

    def __init__(self, bus: Bus, name: str) -> None:
        self.bus = bus
        self.name = name

    async def __call__(self, command: str, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
        payload = {"command": command, "request_id": uuid.uuid4().hex, **args}
        return await self.bus.request(topics.node_commands(self.name), payload, timeout)

    async def instances(self) -> dict[str, str]:
        status = await self("status")
        return {i["instance"]: i["state"] for i in status["instances"]}


@pytest.fixture
async def cluster(
    infra: FerryConfig, tmp_path: Path, processes: ServiceProcesses, unikernel_builds: Path
) -> AsyncIterator[tuple[FerryConfig, Node, Node, dict[str, Any]]]:
    config, _ = stack_config(infra, tmp_path)
    processes.start("executor@edge-a", "--node", "edge-a")
    processes.start("executor@edge-b", "--node", "edge-b")
    store = BlobStore(config.s3)
    manifests = {
        app: await images.push(store, app, unikernel_builds) for app in ("counter", "procedural")
    }
    await wait_online(config, [topics.node_status("edge-a"), topics.node_status("edge-b")])
    async with Bus(config.broker, f"test-sched-{uuid.uuid4().hex[:6]}") as bus:
        yield config, Node(bus, "edge-a"), Node(bus, "edge-b"), manifests


def start_args(
    service: str, instance: str, runtime: str, manifests: dict[str, Any], app: str = "counter"
) -> dict[str, Any]:
    target = REGISTRY[runtime].image_target
    return {
        "service": service,
        "instance": instance,
        "app": app,
        "runtime": runtime,
        "image": manifests[app][target].to_dict(),
    }


async def collect_outputs(config: FerryConfig, service: str) -> tuple[Bus, list[dict[str, Any]]]:
    bus = Bus(config.broker, f"test-out-{uuid.uuid4().hex[:6]}")
    await bus.__aenter__()
    await bus.subscribe(topics.app_output(service))
    outputs: list[dict[str, Any]] = []

    async def pump() -> None:
        async for message in bus.messages():
            outputs.append(message.payload)

    bus._pump = asyncio.create_task(pump())  # type: ignore[attr-defined]
    return bus, outputs


async def wait_for(predicate: Any, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - polls state another task fills
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_migration_equals_an_uninterrupted_run(cluster: Any, runtime: str) -> None:
    config, edge_a, edge_b, manifests = cluster
    service = f"cnt-{runtime}-{uuid.uuid4().hex[:4]}"
    reference = f"ref-{runtime}-{uuid.uuid4().hex[:4]}"
    out_bus, outputs = await collect_outputs(config, service)
    ref_bus, ref_outputs = await collect_outputs(config, reference)
    await edge_a("start", mode="fresh", **start_args(service, f"{service}.1", runtime, manifests))
    await edge_b(
        "start", mode="fresh", **start_args(reference, f"{reference}.1", runtime, manifests)
    )

    feeder = Simulator(config.broker, service, devices=2, rate=0)
    feeder_ref = Simulator(config.broker, reference, devices=2, rate=0)
    feeder.start()
    feeder_ref.start()
    # the simulator's readings depend only on (producer, seq): both services see the same
    feeder.send(30)
    feeder_ref.send(30)
    await wait_for(lambda: len(outputs) == 30 and len(ref_outputs) == 30)

    await edge_b("start", mode="wait", **start_args(service, f"{service}.2", runtime, manifests))
    checkpoint = await edge_a("checkpoint", service=service, instance=f"{service}.1")
    assert checkpoint["watermark"] == {"dev-1": 15, "dev-2": 15}
    assert 0 < checkpoint["checkpoint"]["size"] < 16 * 1024
    feeder.send(10)  # arrives while nobody serves: queued in the service's session
    restored = await edge_b(
        "restore", service=service, instance=f"{service}.2", checkpoint=checkpoint["checkpoint"]
    )
    assert restored["resumed_at"] >= checkpoint["paused_at"]
    await edge_a("stop", service=service, instance=f"{service}.1")
    feeder.send(20)
    feeder_ref.send(30)
    await wait_for(lambda: len(outputs) >= 60 and len(ref_outputs) >= 60)
    await asyncio.sleep(0.5)

    def answers(rows: list[dict[str, Any]]) -> list[tuple[str, int, Any]]:
        return sorted((o["producer"], o["seq"], o["data"]["count"]) for o in rows)

    assert len(outputs) == 60, "every input answered exactly once"
    assert answers(outputs) == answers(ref_outputs)
    assert {o["node"] for o in outputs[:30]} == {"edge-a"}
    assert {o["node"] for o in outputs[30:]} == {"edge-b"}
    for bus in (out_bus, ref_bus):
        await bus.close()
    feeder.finish(0)
    feeder_ref.finish(0)


@pytest.mark.parametrize("runtime", RUNTIMES + WHOLE_IMAGE)
async def test_steady_input_during_migration_loses_and_duplicates_nothing(
    cluster: Any, runtime: str
) -> None:
    config, edge_a, edge_b, manifests = cluster
    status = await edge_a("status")
    if runtime not in status["runtimes"]:
        pytest.skip(f"{runtime} unavailable on this machine: {status['unavailable'][runtime]}")
    service = f"steady-{runtime}-{uuid.uuid4().hex[:4]}"
    await edge_a("start", mode="fresh", **start_args(service, f"{service}.1", runtime, manifests))
    simulator = Simulator(config.broker, service, devices=4, rate=250)
    simulator.start()
    await asyncio.sleep(1.5)
    await edge_b("start", mode="wait", **start_args(service, f"{service}.2", runtime, manifests))
    checkpoint = await edge_a("checkpoint", service=service, instance=f"{service}.1")
    await edge_b(
        "restore", service=service, instance=f"{service}.2", checkpoint=checkpoint["checkpoint"]
    )
    await edge_a("stop", service=service, instance=f"{service}.1")
    await asyncio.sleep(1.5)
    report = await asyncio.to_thread(simulator.finish)
    assert report.sent >= 500
    assert report.lost == [] and report.duplicated == []
    assert set(report.nodes) == {"edge-a", "edge-b"}
    # What S3 holds is sealed, a whole image (podman, microvm-snapshot) as much as a document.
    stored = await BlobStore(config.s3).get_bytes(BlobRef.from_dict(checkpoint["checkpoint"]))
    assert stored.startswith(checkpoint_blob.SEAL_MAGIC)
    assert b"dev-1" not in stored


async def test_corrupt_or_missing_blob_and_unknown_instance_leave_the_source_resumable(
    cluster: Any,
) -> None:
    config, edge_a, edge_b, manifests = cluster
    service = f"bad-{uuid.uuid4().hex[:4]}"
    await edge_a("start", mode="fresh", **start_args(service, f"{service}.1", "unix", manifests))
    simulator = Simulator(config.broker, service, devices=1, rate=0)
    simulator.start()
    simulator.send(5)
    await edge_b("start", mode="wait", **start_args(service, f"{service}.2", "unix", manifests))
    checkpoint = await edge_a("checkpoint", service=service, instance=f"{service}.1")
    ref = BlobRef.from_dict(checkpoint["checkpoint"])

    store = BlobStore(config.s3)
    await store.put_bytes(ref.key, b'{"format": 1, "tampered": true}')
    with pytest.raises(RemoteError) as corrupt:
        await edge_b("restore", service=service, instance=f"{service}.2", checkpoint=ref.to_dict())
    assert corrupt.value.code == "blob_corrupt"

    missing = {**ref.to_dict(), "key": f"checkpoints/{service}/nope.json"}
    with pytest.raises(RemoteError) as absent:
        await edge_b("restore", service=service, instance=f"{service}.2", checkpoint=missing)
    assert absent.value.code == "blob_unavailable"

    with pytest.raises(RemoteError) as unknown:
        await edge_b("restore", service=service, instance="nobody.9", checkpoint=ref.to_dict())
    assert unknown.value.code == "unknown_instance"

    # the source resumes and serves every input, including those sent while it was paused
    simulator.send(5)
    await edge_a("resume", service=service, instance=f"{service}.1")
    simulator.send(5)
    report = await asyncio.to_thread(simulator.finish)
    assert report.sent == 15 and report.lost == [] and report.duplicated == []
    assert report.nodes == {"edge-a": 15}
    await edge_b("stop", service=service, instance=f"{service}.2")


async def test_a_document_for_another_app_is_refused_by_the_guest(cluster: Any) -> None:
    config, _, edge_b, manifests = cluster
    service = f"wrong-{uuid.uuid4().hex[:4]}"
    await edge_b("start", mode="wait", **start_args(service, f"{service}.2", "unix", manifests))
    example = orjson.loads((contract.SCHEMA_DIR / "checkpoint.schema.json").read_bytes())
    foreign = {**example["examples"][0], "app": {"name": "aggregator", "version": "1.0.0"}}
    key = f"checkpoints/{service}/foreign.json"
    keyring = checkpoint_blob.Keyring.configured(config.executor.checkpoint_key_file)
    assert keyring is not None  # the stack seals checkpoints by default
    # Sealed for this service, so it is the guest (not the seal) that refuses it.
    blob = checkpoint_blob.pack(
        orjson.dumps(foreign), keyring=keyring, service=service, object_key=key
    )
    ref = await BlobStore(config.s3).put_bytes(key, blob)
    with pytest.raises(RemoteError) as refused:
        await edge_b("restore", service=service, instance=f"{service}.2", checkpoint=ref.to_dict())
    assert refused.value.code == "guest_refused"
    assert "app" in refused.value.message


async def test_executor_restart_ends_and_reports_the_instances_it_ran(
    cluster: Any, processes: ServiceProcesses
) -> None:
    config, edge_a, _, manifests = cluster
    service = f"orphan-{uuid.uuid4().hex[:4]}"
    await edge_a("start", mode="fresh", **start_args(service, f"{service}.1", "unix", manifests))
    status = await edge_a("status")
    [instance] = [i for i in status["instances"] if i["service"] == service]
    record = orjson.loads(
        (
            config.stack.dir / "nodes" / "edge-a" / "instances" / f"{service}.1" / "instance.json"
        ).read_bytes()
    )
    processes.kill("executor@edge-a")
    restarted_at = now_ms()
    processes.start("executor@edge-a", "--node", "edge-a")
    await wait_online(config, [topics.node_status("edge-a")], since=restarted_at)
    status = await edge_a("status")
    assert f"{service}.1" in status["cleaned_up"]
    # Reported, not hidden: the scheduler recovers the service from its latest checkpoint.
    [lost] = [i for i in status["instances"] if i["service"] == service]
    assert lost["state"] == "lost" and lost["instance"] == f"{service}.1"
    assert "executor process ended" in lost["reason"]
    assert not Path(f"/proc/{record['pid']}").exists() or _is_zombie(record["pid"])
    assert instance["state"] == "serving"


async def test_commands_publish_each_instance_change_not_the_full_status(
    cluster: Any, processes: ServiceProcesses
) -> None:
    """Three starts, then fifty commands at once: no full status goes out (that is for a
    (re)connect and every status_interval), each instance's change of state goes out once,
    numbered without a gap, and those changes alone give a consumer the node's current view;
    a stopped executor's offline status is the last word."""
    config, edge_a, _, manifests = cluster
    names = [f"burst-{uuid.uuid4().hex[:4]}-{i}" for i in range(3)]
    commands = 50
    statuses: list[dict[str, Any]] = []
    changes: list[dict[str, Any]] = []
    async with Bus(config.broker, f"test-status-{uuid.uuid4().hex[:6]}") as watcher:
        await watcher.subscribe(topics.node_status("edge-a"))
        await watcher.subscribe(topics.node_changes("edge-a"))

        async def collect() -> None:
            async for message in watcher.messages():
                kind = changes if message.topic.endswith("/changes") else statuses
                kind.append(message.payload)

        collecting = asyncio.create_task(collect())
        await asyncio.sleep(0.5)  # the retained status first
        [retained] = statuses
        statuses.clear()
        for name in names:
            await edge_a("start", mode="fresh", **start_args(name, f"{name}.1", "unix", manifests))
        await asyncio.gather(
            *(edge_a("stop", service="nobody", instance=f"nobody.{i}") for i in range(commands))
        )
        await asyncio.sleep(1.0)
        full_statuses = len(statuses)
        view = retained
        for change in changes:
            view, missed = node_view.apply_change(view, change)
            assert view is not None and not missed, change
        processes.kill("executor@edge-a", signal.SIGTERM)
        await asyncio.sleep(1.0)
        collecting.cancel()
    assert full_statuses == 0
    mine = [c for c in changes if c["instance"]["service"] in names]
    assert len(mine) == len(names), [
        (c["instance"]["instance"], c["instance"]["state"]) for c in mine
    ]
    assert [c["seq"] for c in changes] == list(range(retained["seq"] + 1, view["seq"] + 1))
    serving = {i["service"] for i in view["instances"] if i["state"] == "serving"}
    assert set(names) <= serving
    assert statuses[-1]["status"] == "offline" and statuses[-1]["boot"] == retained["boot"]


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_a_procedural_app_continues_at_the_right_step_on_the_target(
    cluster: Any, runtime: str
) -> None:
    config, edge_a, edge_b, manifests = cluster
    moved, reference = (f"{p}-{runtime}-{uuid.uuid4().hex[:4]}" for p in ("proc", "pref"))
    params = {"rounds": 12, "step_delay_ms": 15}
    out_bus, outputs = await collect_outputs(config, moved)
    ref_bus, ref_outputs = await collect_outputs(config, reference)
    for node, service in ((edge_a, moved), (edge_b, reference)):
        args = start_args(service, f"{service}.1", runtime, manifests, app="procedural")
        await node("start", mode="fresh", params=params, **args)
    await wait_for(lambda: len(outputs) >= 10)
    await edge_b(
        "start", mode="wait", **start_args(moved, f"{moved}.2", runtime, manifests, "procedural")
    )
    checkpoint = await edge_a("checkpoint", service=moved, instance=f"{moved}.1")
    await edge_a("stop", service=moved, instance=f"{moved}.1")
    await edge_b(
        "restore", service=moved, instance=f"{moved}.2", checkpoint=checkpoint["checkpoint"]
    )

    def finished(rows: list[dict[str, Any]]) -> bool:
        return any(r["data"].get("step") == "finish" for r in rows)

    await wait_for(lambda: finished(outputs) and finished(ref_outputs), timeout=60)
    steps = [(o["data"]["step"], o["data"]["round"]) for o in outputs]
    assert steps == [(o["data"]["step"], o["data"]["round"]) for o in ref_outputs]
    assert [o["data"] for o in outputs] == [o["data"] for o in ref_outputs]
    assert {o["node"] for o in outputs} == {"edge-a", "edge-b"}
    for bus in (out_bus, ref_bus):
        await bus.close()


async def test_a_full_image_cache_disk_is_a_clear_error_and_the_executor_keeps_serving(
    cluster: Any, processes: ServiceProcesses, tiny_disk: Path
) -> None:
    config, _, _, manifests = cluster
    processes.start(
        "executor@edge-full",
        "--node",
        "edge-full",
        env={"FERRY_EXECUTOR__CACHE_DIR": str(tiny_disk)},
    )
    await wait_online(config, [topics.node_status("edge-full")])
    async with Bus(config.broker, f"test-full-{uuid.uuid4().hex[:6]}") as bus:
        full = Node(bus, "edge-full")
        service = f"full-{uuid.uuid4().hex[:5]}"
        with pytest.raises(RemoteError) as refused:
            await full(
                "start", mode="fresh", **start_args(service, f"{service}.1", "unix", manifests)
            )
        assert refused.value.code == "node_storage"
        assert "No space left on device" in refused.value.message
        assert str(tiny_disk) in refused.value.message
        assert await full.instances() in ({}, {f"{service}.1": "failed"})
        assert list(tiny_disk.iterdir()) == []


@pytest.mark.parametrize("instance", ["..", ".", ".hidden"])
async def test_a_forged_instance_id_that_would_leave_the_instances_dir_is_refused(
    cluster: Any, instance: str
) -> None:
    """A raw MQTT start (no client-side validation) naming ``..``: the executor's own directory
    (``instances/..``, with its image cache) would be the instance's and be removed with it."""
    config, edge_a, _, manifests = cluster
    node_root = config.stack.dir / "nodes" / "edge-a"
    forged = {
        "command": "start",
        "request_id": uuid.uuid4().hex,
        "mode": "fresh",
        **start_args("victim", instance, "unix", manifests),
    }
    props = Properties(PacketTypes.PUBLISH)
    reply_topic = topics.replies("anonymous", f"forger-{uuid.uuid4().hex[:6]}")
    props.ResponseTopic = reply_topic
    props.CorrelationData = b"forged"
    async with aiomqtt.Client(
        config.broker.host, config.broker.port, protocol=aiomqtt.ProtocolVersion.V5
    ) as raw:
        await raw.subscribe(reply_topic, qos=1)
        await raw.publish(
            topics.node_commands("edge-a"), orjson.dumps(forged), qos=1, properties=props
        )
        async with asyncio.timeout(20):
            reply = orjson.loads((await anext(aiter(raw.messages))).payload)
    assert reply["ok"] is False and reply["error"]["code"] == "invalid_message"
    assert (node_root / "instances").is_dir()
    assert all(i["service"] != "victim" for i in (await edge_a("status"))["instances"])


@pytest.mark.parametrize("instance", ["..", ".", "", "a/b", "../edge-b", "/etc"])
def test_the_executor_builds_no_instance_path_outside_its_instances_dir(
    tmp_path: Path, instance: str
) -> None:
    """The second lock behind the schema: whatever id reaches it, no path outside the dir."""
    with pytest.raises(RemoteError) as refused:
        instance_dir(tmp_path, instance)
    assert refused.value.code == "invalid_name"
    assert instance_dir(tmp_path, "svc-1.2") == tmp_path / "svc-1.2"
