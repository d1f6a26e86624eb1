"""Bounded storage against the real S3 store and broker: old checkpoints go, rows and objects.

Each test runs its own statestore in-process with retention settings of its own, records real
checkpoint objects in Swift through ``BlobStore`` and asks the statestore over MQTT, as the
executor does; what remains is read back from S3 and from the statestore itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from services.common import topics
from services.common.blobstore import BlobRef, BlobStore
from services.common.bus import Bus, RemoteError
from services.common.config import FerryConfig
from services.executor.instance import session_client_id
from services.statestore import StatestoreService

WAIT = 10.0
KEEP = 3


def retention(config: FerryConfig, **changes: Any) -> FerryConfig:
    """``config`` with collection at once (no grace) and quick sweeps, plus ``changes``."""
    settings = {"keep_checkpoints": KEEP, "checkpoint_grace": 0.0, "collect_interval": 0.2}
    return dataclasses.replace(
        config, statestore=dataclasses.replace(config.statestore, **{**settings, **changes})
    )


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Callable[[FerryConfig], Awaitable[Any]]]:
    """Start a statestore on its own client id and database; stopped at the end of the test."""
    running: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def starter(config: FerryConfig) -> StatestoreService:
        service = StatestoreService(
            config,
            client_id=f"ferry-statestore-test-{uuid.uuid4().hex[:8]}",
            database=tmp_path / f"{len(running)}.db",
        )
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        running.append((stop, task))
        await asyncio.wait_for(service.ready.wait(), WAIT)
        return service

    yield starter
    for stop, task in running:
        stop.set()
        await asyncio.wait_for(task, WAIT)


@pytest.fixture
async def client(infra: FerryConfig) -> AsyncIterator[Bus]:
    async with Bus(infra.broker, f"test-client-{uuid.uuid4().hex[:8]}") as bus:
        yield bus


async def ask(bus: Bus, op: str, **arguments: Any) -> dict[str, Any]:
    return await bus.request(topics.STATESTORE_REQUESTS, {"op": op, **arguments}, timeout=WAIT)


async def until(probe: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT
    while not await probe():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def checkpoint(bus: Bus, blobs: BlobStore, service: str, n: int, **extra: Any) -> BlobRef:
    """Upload checkpoint number ``n`` of ``service`` to S3 and record it, as an executor does."""
    ref = await blobs.put_bytes(f"checkpoints/{service}/{n}.json", f'{{"n": {n}}}'.encode())
    record = {"service": service, **ref.to_dict(), "watermark": {"dev-1": n}, "time": 1000 + n}
    await ask(bus, "record_checkpoint", record={**record, **extra})
    return ref


def name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def test_only_the_newest_k_checkpoints_and_their_objects_remain(
    infra: FerryConfig, start: Callable[[FerryConfig], Awaitable[Any]], client: Bus
) -> None:
    statestore = await start(retention(infra))
    blobs = BlobStore(infra.s3)
    service, bystander = name("svc"), name("other")
    other = await checkpoint(client, blobs, bystander, 1)
    refs = [await checkpoint(client, blobs, service, n) for n in range(1, KEEP + 4)]
    newest = refs[-KEEP:]
    prefix = f"checkpoints/{service}/"

    async def objects() -> set[str]:
        return set(await blobs.list_keys(prefix))

    async def collected() -> bool:
        return await objects() == {r.key for r in newest}

    await until(collected, f"only the newest {KEEP} objects of {service} in S3")
    listed = (await ask(client, "list_checkpoints", service=service))["checkpoints"]
    assert [c["checkpoint"] for c in listed] == [r.to_dict() for r in reversed(newest)]
    latest = await ask(client, "latest_checkpoint", service=service)
    assert latest["checkpoint"] == refs[-1].to_dict()
    assert await blobs.get_bytes(BlobRef.from_dict(latest["checkpoint"])) == b'{"n": 6}'
    # Another service's only checkpoint is untouched.
    assert (await ask(client, "latest_checkpoint", service=bystander))["checkpoint"] == (
        other.to_dict()
    )
    assert await blobs.list_keys(f"checkpoints/{bystander}/") == [other.key]
    assert statestore.collected["blobs"] == 3

    # Many more: rows and objects stay flat at KEEP, and the latest always survives.
    for n in range(KEEP + 4, KEEP + 24):
        ref = await checkpoint(client, blobs, service, n)
        assert (await ask(client, "latest_checkpoint", service=service))["checkpoint"] == (
            ref.to_dict()
        )

    async def flat() -> bool:
        return len(await objects()) == KEEP and ref.key in await objects()

    await until(flat, f"{KEEP} objects after 20 more checkpoints")
    assert len((await ask(client, "list_checkpoints", service=service))["checkpoints"]) == KEEP


async def test_an_open_migrations_checkpoint_is_kept_until_it_finishes(
    infra: FerryConfig, start: Callable[[FerryConfig], Awaitable[Any]], client: Bus
) -> None:
    await start(retention(infra, keep_checkpoints=1))
    blobs = BlobStore(infra.s3)
    service, migration = name("svc"), name("m")
    await ask(client, "put_migration", record={"id": migration, "service": service})
    moved = await checkpoint(client, blobs, service, 1, migration=migration)
    for n in (2, 3):
        await checkpoint(client, blobs, service, n)
    prefix = f"checkpoints/{service}/"

    async def keys() -> set[str]:
        return set(await blobs.list_keys(prefix))

    await until(
        lambda: _equals(keys(), {moved.key, f"{prefix}3.json"}),
        "checkpoint 2 collected, the open migration's kept",
    )
    await ask(client, "put_migration", record={"id": migration, "outcome": "committed"})
    await checkpoint(client, blobs, service, 4)
    await until(lambda: _equals(keys(), {f"{prefix}4.json"}), "the finished one collected too")


async def _equals(value: Awaitable[set[str]], expected: set[str]) -> bool:
    return await value == expected


async def test_a_stopped_service_loses_checkpoints_record_and_retained_state_after_grace(
    infra: FerryConfig, start: Callable[[FerryConfig], Awaitable[Any]], client: Bus
) -> None:
    await start(retention(infra, stopped_grace=0.5))
    blobs = BlobStore(infra.s3)
    stopped, deleted, serving = name("stopped"), name("deleted"), name("serving")
    record = {"app": "counter", "runtime": "unix", "epoch": 1, "status": "serving"}
    for service in (stopped, deleted, serving):
        await ask(client, "put_service", record={"service": service, **record})
        await checkpoint(client, blobs, service, 1)
    for service in (stopped, serving):  # each with a persistent input session, inputs queued
        async with Bus(infra.broker, session_client_id(service), session_expiry=3600) as owner:
            await owner.subscribe(topics.app_input(service))
        for seq in (1, 2):
            await client.publish(
                topics.app_input(service), {"producer": "dev-1", "seq": seq, "data": {}}
            )
    await ask(client, "put_service", record={"service": stopped, **record, "status": "stopped"})
    await ask(client, "delete_service", service=deleted)
    await client.subscribe(topics.service_state(stopped))
    state = await asyncio.wait_for(anext(client.messages()), WAIT)
    assert state.payload["status"] == "stopped"  # retained until the grace is over

    async def gone() -> bool:
        return not await blobs.list_keys(f"checkpoints/{stopped}/") and not await blobs.list_keys(
            f"checkpoints/{deleted}/"
        )

    await until(gone, "the stopped and the deleted service's objects deleted")
    for service in (stopped, deleted):
        with pytest.raises(RemoteError) as info:
            await ask(client, "latest_checkpoint", service=service)
        assert info.value.code == "no_checkpoint"
    with pytest.raises(RemoteError) as info:
        await ask(client, "get_service", service=stopped)
    assert info.value.code == "unknown_service"
    # A fresh subscriber gets no retained state for it any more.
    async with Bus(infra.broker, name("late")) as late:
        await late.subscribe(topics.service_state(stopped))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(late.messages()), 0.5)
    # Its input session is gone with the inputs queued in it; the serving one's is not.
    assert await queued_inputs(infra, stopped) == []
    assert await queued_inputs(infra, serving) == [1, 2]
    # The serving one keeps everything.
    assert (await ask(client, "get_service", service=serving))["status"] == "serving"
    assert await blobs.list_keys(f"checkpoints/{serving}/") == [f"checkpoints/{serving}/1.json"]


async def test_a_purge_forgets_a_service_now_not_after_the_grace(
    infra: FerryConfig, start: Callable[[FerryConfig], Awaitable[Any]], client: Bus
) -> None:
    """`ferry stop --purge`: with a day of stopped_grace, everything goes at once anyway."""
    await start(retention(infra, stopped_grace=86400.0, collect_interval=3600.0))
    blobs = BlobStore(infra.s3)
    purged, kept = name("purged"), name("kept")
    record = {"app": "counter", "runtime": "unix", "epoch": 1, "status": "stopped"}
    for service in (purged, kept):
        await ask(client, "put_service", record={"service": service, **record})
        await checkpoint(client, blobs, service, 1)
        await checkpoint(client, blobs, service, 2)
        async with Bus(infra.broker, session_client_id(service), session_expiry=3600) as owner:
            await owner.subscribe(topics.app_input(service))
        await client.publish(topics.app_input(service), {"producer": "d", "seq": 1, "data": {}})
    done = await ask(client, "delete_service", service=purged, purge=True)
    assert done == {"service": purged, "deleted": True, "checkpoints": 2}
    with pytest.raises(RemoteError) as info:
        await ask(client, "latest_checkpoint", service=purged)
    assert info.value.code == "no_checkpoint"
    assert await queued_inputs(infra, purged) == []

    async def gone() -> bool:
        return not await blobs.list_keys(f"checkpoints/{purged}/")

    await until(gone, "the purged service's objects deleted")  # checkpoint_grace is 0 here
    # The other stopped service waits out its grace with everything it had.
    assert (await ask(client, "get_service", service=kept))["status"] == "stopped"
    assert len(await blobs.list_keys(f"checkpoints/{kept}/")) == 2
    assert await queued_inputs(infra, kept) == [1]


async def queued_inputs(infra: FerryConfig, service: str) -> list[int]:
    """Resume the service's input session (subscribing to nothing) and collect what the broker
    delivers from it: the inputs it queued, if the session still exists."""
    seqs: list[int] = []
    async with Bus(infra.broker, session_client_id(service), session_expiry=3600) as owner:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                async for message in owner.messages():
                    seqs.append(message.payload["seq"])
    return seqs


async def test_blobs_wait_out_an_unreachable_s3_store_and_are_deleted_later(
    infra: FerryConfig, start: Callable[[FerryConfig], Awaitable[Any]], client: Bus
) -> None:
    """S3 down (a dead endpoint): checkpoints are still recorded and answered at once, the
    deletions stay queued in the database, and go through once S3 is back."""
    dead = dataclasses.replace(infra.s3, endpoint="127.0.0.1:9", timeout=1.0)
    statestore = await start(dataclasses.replace(retention(infra), s3=dead))
    blobs = BlobStore(infra.s3)
    service = name("svc")
    for n in range(1, KEEP + 3):
        await checkpoint(client, blobs, service, n)
    await asyncio.sleep(1.0)  # the collector has tried (and failed) meanwhile
    prefix = f"checkpoints/{service}/"
    assert len(await blobs.list_keys(prefix)) == KEEP + 2
    assert len((await ask(client, "list_checkpoints", service=service))["checkpoints"]) == KEEP
    statestore.blobs = BlobStore(infra.s3)  # S3 is back
    statestore._collect_now.set()
    await until(lambda: _count(blobs.list_keys(prefix), KEEP), f"{KEEP} objects left")


async def _count(keys: Awaitable[list[str]], n: int) -> bool:
    return len(await keys) == n


async def test_storage_stays_flat_across_a_thousand_migrations(
    infra: FerryConfig, start: Callable[[FerryConfig], Awaitable[Any]], client: Bus
) -> None:
    """A thousand migrations of one service, each recorded the way the components record it:
    the plan, its phase events, and the source's checkpoint with its object in S3. Rows of every
    table and objects in the bucket stay bounded (the newest KEEP checkpoints; finished
    migrations and their events compacted after ``migration_retention``), and the database's
    used pages after the thousandth are those after the two hundredth (give or take two pages:
    a B-tree's shape varies with the order its rows went)."""
    statestore = await start(retention(infra, migration_retention=0.0))
    blobs = BlobStore(infra.s3)
    service = name("flat")
    prefix = f"checkpoints/{service}/"

    async def migrate(n: int) -> None:
        migration = f"m-{service}-{n}"
        plan = {"id": migration, "service": service, "kind": "migrate", "trigger": "mobility"}
        await ask(client, "put_migration", record=plan)
        for step, phase in enumerate(("planned", "source_paused", "checkpoint_stored")):
            await client.publish(topics.migration_events(migration), event(plan, phase, n, step))
        await checkpoint(client, blobs, service, n, migration=migration)
        for step, phase in enumerate(("target_serving", "source_stopped", "committed"), 3):
            await client.publish(topics.migration_events(migration), event(plan, phase, n, step))

    async def settled() -> bool:
        counts = await statestore._call(statestore._db.storage_counts)
        return bool(
            counts["migrations"] == 0
            and counts["migration_events"] == 0
            and counts["checkpoints"] == KEEP
            and len(await blobs.list_keys(prefix)) == KEEP
        )

    async def used_pages() -> int:
        def pages() -> int:
            conn = statestore._db.conn
            return int(conn.execute("PRAGMA page_count").fetchone()[0]) - int(
                conn.execute("PRAGMA freelist_count").fetchone()[0]
            )

        return int(await statestore._call(pages))

    for n in range(1, 201):
        await migrate(n)
    await until(settled, "the first 200 migrations compacted to KEEP checkpoints")
    after_200 = await used_pages()
    for n in range(201, 1001):
        await migrate(n)
    await until(settled, "1000 migrations compacted to KEEP checkpoints")
    assert await used_pages() <= after_200 + 2
    assert (await ask(client, "latest_checkpoint", service=service))["checkpoint"]["key"] == (
        f"{prefix}1000.json"
    )


def event(plan: dict[str, Any], phase: str, n: int, step: int) -> dict[str, Any]:
    """A phase event of migration ``n`` as the scheduler publishes it."""
    return {
        "migration": plan["id"],
        "service": plan["service"],
        "kind": "migrate",
        "phase": phase,
        "time": 10_000 * n + step,
        "actor": "scheduler",
        "source": "edge-a",
        "target": "edge-b",
        "trigger": "mobility",
    }
