"""The statestore over MQTT against a real Mosquitto: requests, events, retained state, restart.

Each test runs its own statestore (own client id, own database) in-process and talks to it the way
the scheduler and the CLI do, through a ``Bus``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from services.common import topics
from services.common.bus import Bus, Inbound, RemoteError, now_ms
from services.common.config import FerryConfig
from services.common.contract import ContractError
from services.statestore import StatestoreService
from services.statestore.db import BUSY_TIMEOUT_S

SHA = "0f" * 32
WAIT = 10.0


class Running:
    """A statestore that a test can stop and start again on the same session and database."""

    def __init__(self, config: FerryConfig, database: Path) -> None:
        self.config = config
        self.database = database
        self.client_id = f"ferry-statestore-test-{uuid.uuid4().hex[:8]}"
        self.service: StatestoreService | None = None
        self.task: asyncio.Task[None] | None = None
        self.stop_event = asyncio.Event()

    async def start(self) -> None:
        self.stop_event = asyncio.Event()
        self.service = StatestoreService(
            self.config, client_id=self.client_id, database=self.database
        )
        self.task = asyncio.create_task(self.service.run(self.stop_event))
        ready = asyncio.create_task(self.service.ready.wait())
        await asyncio.wait({ready, self.task}, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
        if self.task.done():
            self.task.result()
        assert ready.done(), "statestore did not become ready"

    async def stop(self) -> None:
        self.stop_event.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, WAIT)


@pytest.fixture
async def statestore(infra: FerryConfig, tmp_path: Path) -> AsyncIterator[Running]:
    running = Running(infra, tmp_path / "statestore.db")
    await running.start()
    yield running
    await running.stop()


@pytest.fixture
async def client(infra: FerryConfig) -> AsyncIterator[Bus]:
    async with Bus(infra.broker, f"test-client-{uuid.uuid4().hex[:8]}") as bus:
        yield bus


def name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def ask(bus: Bus, op: str, **arguments: Any) -> dict[str, Any]:
    return await bus.request(topics.STATESTORE_REQUESTS, {"op": op, **arguments}, timeout=WAIT)


async def eventually(probe: Callable[[], Awaitable[Any]], what: str) -> Any:
    """Poll ``probe`` until it returns something truthy (events are stored asynchronously)."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while True:
        with contextlib.suppress(RemoteError):
            value = await probe()
            if value:
                return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def next_message(bus: Bus, timeout: float = WAIT) -> Inbound:
    messages = bus.messages()
    return await asyncio.wait_for(anext(messages), timeout)


def service_record(service: str, epoch: int = 1, status: str = "serving") -> dict[str, Any]:
    return {
        "service": service,
        "app": "counter",
        "runtime": "unix",
        "node": "edge-a",
        "instance": f"{service}.{epoch}",
        "epoch": epoch,
        "status": status,
        "device": "dev-1",
        "params": {"step": 2},
        "image": {"bucket": "ferry", "key": "images/counter", "sha256": SHA, "size": 10},
    }


def migration_event(migration: str, service: str, phase: str, time: int, **extra: Any) -> dict:
    return {
        "migration": migration,
        "service": service,
        "kind": "migrate",
        "phase": phase,
        "time": time,
        "actor": "scheduler",
        "source": "edge-a",
        "target": "edge-b",
        "trigger": "operator",
        **extra,
    }


async def publish_migration(bus: Bus, migration: str, service: str, start: int) -> None:
    phases = ["planned", "target_ready", "source_paused", "checkpoint_stored", "target_serving"]
    for offset, phase in enumerate(phases):
        event = migration_event(migration, service, phase, start + offset)
        await bus.publish(topics.migration_events(migration), event)
    detail = {"downtime_ms": 18.5, "bytes_moved": 1834, "total_ms": 312.0}
    done = migration_event(migration, service, "committed", start + 10, detail=detail)
    await bus.publish(topics.migration_events(migration), done)


async def test_component_status_online_then_offline(
    infra: FerryConfig, tmp_path: Path, client: Bus
) -> None:
    running = Running(infra, tmp_path / "s.db")
    await running.start()
    await client.subscribe(topics.component_status("statestore"))
    status = await next_message(client)
    assert status.payload["status"] == "online"
    assert status.payload["version"] == "0.1.0"
    await running.stop()
    assert (await next_message(client)).payload["status"] == "offline"


async def test_put_get_list_delete_service(statestore: Running, client: Bus) -> None:
    service = name("svc")
    stored = await ask(client, "put_service", record=service_record(service))
    assert stored["time"] > 0
    assert stored["params"] == {"step": 2}
    assert await ask(client, "get_service", service=service) == stored
    listed = (await ask(client, "list_services"))["services"]
    assert stored in listed

    async with Bus(client.broker, f"watcher-{uuid.uuid4().hex[:8]}") as watcher:
        await watcher.subscribe(topics.service_state(service))
        retained = await next_message(watcher)
        assert retained.retain and retained.payload == stored

    deleted = await ask(client, "delete_service", service=service)
    assert deleted == {"service": service, "deleted": True}
    with pytest.raises(RemoteError) as info:
        await ask(client, "get_service", service=service)
    assert info.value.code == "unknown_service"
    async with Bus(client.broker, f"watcher-{uuid.uuid4().hex[:8]}") as watcher:
        await watcher.subscribe(topics.service_state(service))
        with pytest.raises(TimeoutError):
            await next_message(watcher, timeout=0.5)  # the retained state is gone


async def test_bad_records_are_answered_with_errors(statestore: Running, client: Bus) -> None:
    service = name("svc")
    with pytest.raises(RemoteError) as info:
        await ask(client, "get_service", service=service)
    assert info.value.code == "unknown_service"

    bad = {**service_record(service), "status": "dancing"}
    with pytest.raises(RemoteError) as info:
        await ask(client, "put_service", record=bad)
    assert info.value.code == "invalid_record"
    assert "status" in info.value.message

    await ask(client, "put_service", record=service_record(service, epoch=3))
    with pytest.raises(RemoteError) as info:
        await ask(client, "put_service", record=service_record(service, epoch=2))
    assert info.value.code == "stale_epoch"
    assert info.value.details == {"stored_epoch": 3}

    with pytest.raises(RemoteError) as info:
        await ask(client, "get_migration", migration=name("m"))
    assert info.value.code == "unknown_migration"
    # Record shapes are part of the contract: a well-behaved client cannot even send these ...
    with pytest.raises(ContractError, match="teleport"):
        await ask(client, "put_migration", record={"id": name("m"), "kind": "teleport"})
    record = {"service": service, "bucket": "b", "key": "k", "sha256": "nothex", "size": 1}
    with pytest.raises(ContractError, match="nothex"):
        await ask(client, "record_checkpoint", record={**record, "watermark": {}})
    # ... and a raw one gets invalid_message (see the schema-invalid request test).
    with pytest.raises(RemoteError) as info:
        await ask(client, "put_migration", record={"id": name("m")})
    assert info.value.code == "invalid_record"  # a new migration needs its service
    # Still serving after all that.
    assert (await ask(client, "get_service", service=service))["epoch"] == 3


async def test_schema_invalid_request_is_rejected_and_reported(
    statestore: Running, infra: FerryConfig
) -> None:
    reply_topic = topics.replies("anonymous", name("raw"))
    async with aiomqtt.Client(
        infra.broker.host,
        infra.broker.port,
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as raw:
        await raw.subscribe(reply_topic, qos=1)
        await raw.subscribe(topics.ERRORS, qos=1)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_topic
        props.CorrelationData = b"c-1"
        body = orjson.dumps({"op": "get_service"})  # service is required
        await raw.publish(topics.STATESTORE_REQUESTS, body, qos=1, properties=props)
        seen: dict[str, Any] = {}
        async with asyncio.timeout(WAIT):
            async for message in raw.messages:
                payload = orjson.loads(message.payload)
                if message.topic.value == reply_topic:
                    assert message.properties is not None
                    assert message.properties.CorrelationData == b"c-1"
                    seen["reply"] = payload
                elif payload.get("source") == statestore.client_id:
                    seen["report"] = payload
                if len(seen) == 2:
                    break
    assert seen["reply"]["ok"] is False
    assert seen["reply"]["error"]["code"] == "invalid_message"
    assert seen["report"]["topic"] == topics.STATESTORE_REQUESTS


async def test_node_status_is_recorded(statestore: Running, client: Bus) -> None:
    node = name("edge")
    status = {"node": node, "status": "online", "time": now_ms(), "runtimes": ["unix"]}
    await client.publish(topics.node_status(node), status, retain=True)

    async def listed() -> list[dict[str, Any]]:
        nodes = (await ask(client, "list_nodes"))["nodes"]
        return [n for n in nodes if n["node"] == node]

    assert await eventually(listed, "the node") == [status]
    await client.publish(topics.node_status(node), None, retain=True)


async def test_migration_events_make_the_record(statestore: Running, client: Bus) -> None:
    service, migration = name("svc"), name("m")
    start = now_ms()
    planned = await ask(
        client,
        "put_migration",
        record={
            "id": migration,
            "service": service,
            "kind": "migrate",
            "trigger": "operator",
            "source": "edge-a",
            "target": "edge-b",
            "started": start,
        },
    )
    assert planned["outcome"] is None and planned["phase"] is None
    opened = (await ask(client, "open_migrations"))["migrations"]
    assert migration in [m["id"] for m in opened]

    await publish_migration(client, migration, service, start)
    # The committed event, delivered a second time, must be stored once.
    detail = {"downtime_ms": 18.5, "bytes_moved": 1834, "total_ms": 312.0}
    again = migration_event(migration, service, "committed", start + 10, detail=detail)
    await client.publish(topics.migration_events(migration), again)

    async def committed() -> dict[str, Any] | None:
        record = await ask(client, "get_migration", migration=migration)
        return record if record["migration"]["outcome"] else None

    record = await eventually(committed, "the committed migration")
    await asyncio.sleep(0.2)  # let the duplicate arrive too
    record = await ask(client, "get_migration", migration=migration)
    row = record["migration"]
    assert row["phase"] == "committed" and row["outcome"] == "committed"
    assert (row["started"], row["finished"]) == (start, start + 10)
    assert (row["downtime_ms"], row["bytes_moved"], row["total_ms"]) == (18.5, 1834, 312.0)
    phases = [e["phase"] for e in record["events"]]
    assert phases == [
        "planned",
        "target_ready",
        "source_paused",
        "checkpoint_stored",
        "target_serving",
        "committed",
    ]
    assert record["events"][-1] == again
    opened = (await ask(client, "open_migrations"))["migrations"]
    assert migration not in [m["id"] for m in opened]
    newest = (await ask(client, "list_migrations", limit=5, service=service))["migrations"]
    assert [m["id"] for m in newest] == [migration]


async def test_event_before_put_migration_and_rollback(statestore: Running, client: Bus) -> None:
    service, migration = name("svc"), name("m")
    start = now_ms()
    failed = migration_event(
        migration,
        service,
        "rolled_back",
        start + 5,
        detail={"error": "restore timed out", "total_ms": 30000.0},
    )
    await client.publish(topics.migration_events(migration), failed)

    async def stored() -> dict[str, Any]:
        return (await ask(client, "get_migration", migration=migration))["migration"]

    row = await eventually(stored, "the migration made from its event")
    assert row["outcome"] == "rolled_back" and row["error"] == "restore timed out"
    row = await ask(client, "put_migration", record={"id": migration, "trigger": "mobility"})
    # A field the record names is written; what it leaves out (the outcome) is kept.
    assert row["outcome"] == "rolled_back" and row["trigger"] == "mobility"
    assert row["total_ms"] == 30000.0


async def test_checkpoints(statestore: Running, client: Bus) -> None:
    service = name("svc")
    with pytest.raises(RemoteError) as info:
        await ask(client, "latest_checkpoint", service=service)
    assert info.value.code == "no_checkpoint"
    blob = {"bucket": "ferry", "key": f"checkpoints/{service}/1.json", "sha256": SHA, "size": 77}
    first = await ask(
        client,
        "record_checkpoint",
        record={"service": service, **blob, "watermark": {"p1": 4}, "time": 100},
    )
    assert first["checkpoint"] == blob and first["watermark"] == {"p1": 4}
    second_blob = {**blob, "key": f"checkpoints/{service}/2.json"}
    second = await ask(
        client,
        "record_checkpoint",
        record={"service": service, **second_blob, "watermark": {"p1": 9}, "time": 200,
                "migration": "m-9"},
    )  # fmt: skip
    assert second["migration"] == "m-9"
    assert await ask(client, "latest_checkpoint", service=service) == second
    listed = (await ask(client, "list_checkpoints", service=service))["checkpoints"]
    assert listed == [second, first]
    limited = (await ask(client, "list_checkpoints", service=service, limit=1))["checkpoints"]
    assert limited == [second]


async def test_restart_loses_nothing(infra: FerryConfig, tmp_path: Path, client: Bus) -> None:
    running = Running(infra, tmp_path / "s.db")
    await running.start()
    service, migration = name("svc"), name("m")
    stored = await ask(client, "put_service", record=service_record(service, status="migrating"))
    start = now_ms()
    await ask(client, "put_migration", record={"id": migration, "service": service})
    await running.stop()

    # Published while the statestore is down: the broker keeps them in its session.
    await publish_migration(client, migration, service, start)

    await running.start()

    async def committed() -> dict[str, Any] | None:
        row = (await ask(client, "get_migration", migration=migration))["migration"]
        return row if row["outcome"] == "committed" else None

    row = await eventually(committed, "events published while the statestore was down")
    assert row["downtime_ms"] == 18.5 and row["trigger"] == "operator"
    events = (await ask(client, "get_migration", migration=migration))["events"]
    assert len(events) == 6
    assert await ask(client, "get_service", service=service) == stored
    async with Bus(client.broker, f"watcher-{uuid.uuid4().hex[:8]}") as watcher:
        await watcher.subscribe(topics.service_state(service))
        assert (await next_message(watcher)).payload == stored
    await running.stop()


async def test_config_database_path(infra: FerryConfig, tmp_path: Path) -> None:
    from services.common.config import StatestoreConfig
    from services.statestore.service import database_path

    assert database_path(infra) == infra.stack.dir / "statestore.db"
    custom = dataclasses.replace(
        infra, statestore=StatestoreConfig(database=str(tmp_path / "x.db"))
    )
    assert database_path(custom) == tmp_path / "x.db"


async def test_event_not_stored_is_not_acked(
    infra: FerryConfig, tmp_path: Path, client: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    """A write that fails (here: another process holds the write lock) leaves the event unacked,
    so the broker delivers it again to the next statestore on the same session."""
    running = Running(infra, tmp_path / "s.db")
    await running.start()
    service, migration = name("svc"), name("m")
    blocker = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        event = migration_event(migration, service, "planned", now_ms())
        await client.publish(topics.migration_events(migration), event)
        await asyncio.sleep(BUSY_TIMEOUT_S + 0.5)  # the write gives up on the lock meanwhile
        assert "will be redelivered" in caplog.text
        await running.stop()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    await running.start()

    async def stored() -> dict[str, Any]:
        return await ask(client, "get_migration", migration=migration)

    record = await eventually(stored, "the redelivered event")
    assert record["events"] == [event]
    await running.stop()


async def test_writes_that_arrive_together_share_a_commit_and_fail_alone(
    statestore: Running, client: Bus
) -> None:
    """Forty service records at once, one of them a compare-and-set that must lose: every other
    write is stored and answered, the loser alone is refused, and the forty took far fewer
    commits than forty (group commit: one WAL sync per batch of writes)."""
    assert statestore.service is not None and statestore.service._db is not None
    db = statestore.service._db
    names = [name("crowd") for _ in range(40)]
    await ask(client, "put_service", record=service_record(names[0]))
    commits_before = db.commits
    loser = {"instance": "someone-else"}
    results = await asyncio.gather(
        *(
            ask(client, "put_service", record=service_record(n, epoch=2), expect=loser)
            if n == names[0]
            else ask(client, "put_service", record=service_record(n))
            for n in names
        ),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, RemoteError)]
    assert len(refused) == 1 and refused[0].code == "conflict"
    assert (await ask(client, "get_service", service=names[0]))["epoch"] == 1
    for n in names[1:]:
        assert (await ask(client, "get_service", service=n))["status"] == "serving"
    assert db.commits - commits_before < len(names)
