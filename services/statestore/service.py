"""The statestore's MQTT side: answers requests, records node status and migration events.

Why a persistent session with manual acks: the statestore must lose nothing across its own
restart. Its session (client id ``ferry-statestore``) outlives the process, so the broker queues
events published while it is down, and each message is acknowledged only once its write is
committed to SQLite; whatever was received but not yet committed is delivered again, and every
write is idempotent (see ``db.py``), so a second delivery changes nothing.

Messages are handled one at a time, in arrival order: writes are serialised by the single database
thread anyway, and in-order handling keeps each service's retained state in the order its writes
were made.

Storage stays bounded (``statestore.keep_checkpoints`` and the other retention keys): recording a
checkpoint moves the service's surplus ones to the blob garbage in the same transaction, and a
background collector deletes their S3 objects once ``checkpoint_grace`` has passed, after the
reply; a sweep every ``collect_interval`` also retires stopped and deleted services (after
``stopped_grace``: checkpoints, record, retained state) and prunes finished migrations older than
``migration_retention``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

from services.common import contract, topics
from services.common.blobstore import BlobError, BlobNotFound, BlobStore
from services.common.bus import Bus, BusError, Inbound, RemoteError, now_ms
from services.common.config import FerryConfig
from services.common.messages import (
    ListRequest,
    MigrationRequest,
    RecordRequest,
    ServiceRequest,
    StatestoreRequest,
)
from services.common.metrics import metrics_port
from services.statestore.db import DEFAULT_LIMIT, Conflict, Database, NotFound
from services.statestore.metrics import StatestoreMetrics

log = logging.getLogger(__name__)

VERSION = "0.1.0"
COMPONENT = "statestore"
CLIENT_ID = "ferry-statestore"
# A day: long enough to cover any restart or upgrade of the statestore, short enough that a
# statestore that is gone for good does not make the broker queue events forever.
SESSION_EXPIRY_S = 86400

T = TypeVar("T")


def _check(validator: contract.Validator, record: dict[str, Any], what: str) -> None:
    """Raise RemoteError('invalid_record') naming the first violation."""
    error = validator.first_error(record)
    if error is not None:
        where, message = error
        raise RemoteError("invalid_record", f"{what}: at {where}: {message}")


def database_path(config: FerryConfig) -> Path:
    """``statestore.database`` if set, else ``<stack.dir>/statestore.db``."""
    if config.statestore.database:
        return Path(config.statestore.database)
    return config.stack.dir / "statestore.db"


class StatestoreService:
    """The statestore process's work (see the module docstring)."""

    def __init__(
        self,
        config: FerryConfig,
        *,
        client_id: str = CLIENT_ID,
        database: Path | None = None,
        metrics_port: int | None = None,
    ) -> None:
        """``client_id`` and ``database`` override the defaults (tests run several side by side)."""
        self.config = config
        self.metrics = StatestoreMetrics()
        self._metrics_port = metrics_port
        self.client_id = client_id
        self.path = database or database_path(config)
        self.bus: Bus | None = None
        # Set once subscribed and online, cleared on the way out: lets an embedding (tests, a
        # supervisor in-process) wait for a statestore that will answer.
        self.ready = asyncio.Event()
        self._db: Database | None = None
        self._thread: ThreadPoolExecutor | None = None
        #: Writes waiting for the next group commit (``_write``), and the task committing them.
        self._writes: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None
        #: The messages being handled (``_serve``).
        self._handling: set[asyncio.Task[None]] = set()
        self._service_state = contract.validator("service-state.schema.json")
        self.blobs: BlobStore | None = None
        self._collect_now = asyncio.Event()
        #: What the collector did so far (tests and operators read it).
        self.collected = {"blobs": 0, "checkpoints": 0, "migrations": 0, "services": 0}

    # -- main loop --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set (or forever); publishes offline and closes the DB on exit.

        Raises BusError if the broker cannot be reached, sqlite3.Error if the database cannot
        be opened.
        """
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="statestore-db")
        try:
            self._db = await self._call(Database, self.path)
            log.info("statestore database %s", self.path)
            port = metrics_port(self.config, COMPONENT, self._metrics_port)
            self.metrics.start(self, self.config.metrics.host, port)
            offline = self._component_status("offline")
            will = (topics.component_status(COMPONENT), offline)
            async with Bus(
                self.config.broker,
                self.client_id,
                will=will,
                session_expiry=SESSION_EXPIRY_S,
                manual_ack=True,
            ) as bus:
                self.bus = bus
                await bus.subscribe(topics.STATESTORE_REQUESTS)
                await bus.subscribe(topics.STATESTORE_QUERIES)
                await bus.subscribe(topics.node_status("+"))
                await bus.subscribe(topics.node_cordon("+"))
                await bus.subscribe(topics.node_changes("+"))
                await bus.subscribe(topics.migration_events("+"))
                await self._republish_states()
                # Again after every reconnect: a broker restart loses it (or fires the will).
                await bus.announce(
                    topics.component_status(COMPONENT), lambda: self._component_status("online")
                )
                serve = asyncio.create_task(self._serve(bus), name="statestore-serve")
                collector = asyncio.create_task(self._collector(), name="statestore-collect")
                self.ready.set()
                try:
                    if stop is None:
                        await serve
                    else:
                        stopped = asyncio.create_task(stop.wait())
                        await asyncio.wait({serve, stopped}, return_when=asyncio.FIRST_COMPLETED)
                        stopped.cancel()
                        if serve.done():
                            serve.result()
                finally:
                    self.ready.clear()
                    serve.cancel()
                    collector.cancel()
                    for task in (serve, collector, *self._handling):
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
                    bus.withdraw(topics.component_status(COMPONENT))
                    with contextlib.suppress(BusError):
                        await bus.publish(
                            topics.component_status(COMPONENT),
                            self._component_status("offline"),
                            retain=True,
                        )
        finally:
            self.bus = None
            self.metrics.stop()
            if self._flusher is not None:  # the writes already handed over get committed
                await asyncio.gather(self._flusher, return_exceptions=True)
            if self._db is not None:
                await self._call(self._db.close)
                self._db = None
            self._thread.shutdown(wait=True)

    def _component_status(self, status: str) -> dict[str, Any]:
        return {"component": COMPONENT, "status": status, "time": now_ms(), "version": VERSION}

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking database call on the one database thread."""
        assert self._thread is not None
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """A database write, committed together with every other write waiting (group commit).

        Why: writes are serialised on one thread and each commit syncs the WAL; in a drain,
        hundreds of events and requests arrive at once. The writes that arrive while a batch
        commits wait for the next one, so a lone write is committed at once, and a crowd costs
        one sync per batch. Each write still succeeds or fails alone (``Database.batch``), and
        its caller hears of it only after the commit: acks and replies stay after the write.
        """
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._writes.append((functools.partial(fn, *args), future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._commit_writes(), name="statestore-commit")
        return await future

    async def _commit_writes(self) -> None:
        while self._writes:
            writes, self._writes = self._writes, []
            try:
                outcomes = await self._call(self._database().batch, [w for w, _ in writes])
            except asyncio.CancelledError:
                for _, future in writes:
                    future.cancel()
                raise
            except Exception as exc:  # the database thread itself failed
                outcomes = [(False, exc)] * len(writes)
            for (_, future), (ok, value) in zip(writes, outcomes, strict=True):
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

    def _database(self) -> Database:
        assert self._db is not None
        return self._db

    async def _republish_states(self) -> None:
        """Publish every stored service state, so retained state matches the DB after a crash."""
        for doc in await self._call(self._database().list_services):
            await self._publish(doc)

    async def _serve(self, bus: Bus) -> None:
        """Handle each message in a task of its own: independent requests and events do not
        wait behind each other's replies. Their writes still reach the database in the order
        the messages arrived (each handler hands its write to ``_write`` before it first
        waits) and are committed together."""
        async for message in bus.messages():
            task = asyncio.create_task(self._handle(bus, message))
            self._handling.add(task)
            task.add_done_callback(self._handling.discard)

    async def _handle(self, bus: Bus, message: Inbound) -> None:
        try:
            if message.topic in (topics.STATESTORE_REQUESTS, topics.STATESTORE_QUERIES):
                await self._answer(bus, message)
            elif message.topic.endswith("/events"):
                await self._on_event(bus, message)
            elif message.topic.endswith("/changes"):
                await self._on_node_change(bus, message)
            elif message.topic == topics.node_cordon(message.payload["node"]):
                await self._write_then_ack(
                    bus, message, self._database().put_cordon, message.payload
                )
            else:
                await self._on_node_status(bus, message)
        except Exception:
            # Never let one message stop the service; it stays unacked and comes again
            # after the next reconnect.
            log.exception("statestore: could not handle a message on %s", message.topic)

    # -- retention ---------------------------------------------------------------------------

    async def _collector(self) -> None:
        """Delete due garbage blobs whenever woken (after a checkpoint is recorded) or due, and
        sweep the database every ``collect_interval``. Never raises: a failure is logged and
        retried on the next pass, since the queue of blobs to delete lives in the database."""
        retention = self.config.statestore
        loop = asyncio.get_running_loop()
        next_sweep = 0.0
        while True:
            try:
                if loop.time() >= next_sweep:
                    next_sweep = loop.time() + retention.collect_interval
                    await self.sweep()
                await self.delete_due_blobs()
                due = await self._call(self._database().next_garbage_due)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("statestore: retention pass failed; retrying later")
                due = None
            timeout = max(0.0, next_sweep - loop.time())
            if due is not None:
                timeout = min(timeout, max(0.0, (due - now_ms()) / 1000))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):  # not wait_for: 3.11's can drop a cancel
                    await self._collect_now.wait()
            self._collect_now.clear()

    async def sweep(self) -> dict[str, Any]:
        """One retention sweep of the database (see ``Database.collect``); clears the retained
        state of every stopped service it forgot."""
        retention = self.config.statestore
        now = now_ms()
        result = await self._call(
            self._database().collect,
            now,
            retention.keep_checkpoints,
            now - int(retention.stopped_grace * 1000),
            now - int(retention.migration_retention * 1000),
            now + int(retention.checkpoint_grace * 1000),
        )
        assert self.bus is not None
        for service in result["forgotten"]:
            await self.bus.publish(topics.service_state(service), None, retain=True)
        for service in [*result["forgotten"], *result["deleted"]]:
            await self._end_input_session(service)
        self.collected["checkpoints"] += result["checkpoints"]
        self.collected["migrations"] += result["migrations"]
        self.collected["services"] += len(result["forgotten"])
        if result["checkpoints"] or result["migrations"] or result["forgotten"]:
            log.info(
                "statestore: retired %d checkpoints, %d finished migrations, %d stopped services",
                result["checkpoints"],
                result["migrations"],
                len(result["forgotten"]),
            )
        return result

    async def _end_input_session(self, service: str) -> None:
        """Discard a retired service's persistent input session (and the inputs the broker
        queued for it, up to max_queued_messages for 7 days): a clean-start connect with its
        client id and no expiry ends the session. Only for services stopped or deleted for
        ``stopped_grace``, since it would also cut off a live owner. Best effort."""
        from services.executor.instance import session_client_id  # the one definition

        try:
            async with Bus(self.config.broker, session_client_id(service), connect_timeout=5.0):
                pass
        except (BusError, OSError) as exc:
            log.warning("statestore: could not end the input session of %s: %s", service, exc)

    async def delete_due_blobs(self) -> int:
        """Delete the S3 objects of collected checkpoints that are due; returns how many went.
        A blob that cannot be deleted now stays queued for the next pass."""
        deleted = 0
        while batch := await self._call(self._database().due_garbage, now_ms()):
            if self.blobs is None:
                self.blobs = BlobStore(self.config.s3)
            done: list[tuple[str, str]] = []
            failure: BlobError | None = None
            for bucket, key in batch:
                try:
                    await self.blobs.delete(key, bucket=bucket)
                except BlobNotFound:
                    pass  # already gone: as good as deleted
                except BlobError as exc:
                    failure = exc
                    break
                done.append((bucket, key))
            await self._call(self._database().forget_garbage, done)
            deleted += len(done)
            self.collected["blobs"] += len(done)
            if failure is not None:
                log.warning("statestore: cannot delete old checkpoints from S3 yet: %s", failure)
                break
        return deleted

    # -- subscriptions ------------------------------------------------------------------------

    async def _on_node_status(self, bus: Bus, message: Inbound) -> None:
        await self._write_then_ack(
            bus, message, self._database().upsert_node, message.payload, now_ms()
        )

    async def _on_node_change(self, bus: Bus, message: Inbound) -> None:
        await self._write_then_ack(
            bus, message, self._database().apply_node_change, message.payload, now_ms()
        )

    async def _on_event(self, bus: Bus, message: Inbound) -> None:
        await self._write_then_ack(
            bus, message, self._database().record_event, message.payload, now_ms()
        )

    async def _write_then_ack(
        self, bus: Bus, message: Inbound, write: Callable[..., Any], *args: Any
    ) -> None:
        """Commit, then ack. A transient DB failure leaves the message unacked (redelivered
        later); any other failure would fail again, so it is acked and reported instead."""
        try:
            await self._write(write, *args)
        except sqlite3.OperationalError as exc:
            log.error("statestore: %s not stored, will be redelivered: %s", message.topic, exc)
            return
        except Exception as exc:
            log.exception("statestore: dropping a message on %s", message.topic)
            reason = f"statestore could not store it: {type(exc).__name__}: {exc}"
            await bus.report(message.topic, reason)
        bus.ack(message)

    # -- requests ----------------------------------------------------------------------------

    async def _answer(self, bus: Bus, message: Inbound) -> None:
        op = message.payload["op"]
        try:
            # The bus checked the payload against statestore-request.schema.json.
            result = await self.execute(cast(StatestoreRequest, message.payload))
        except RemoteError as exc:
            await self._reply(bus, message, error=exc)
        except sqlite3.Error as exc:
            log.exception("statestore: %s failed in the database", op)
            error = RemoteError("database_error", f"{op}: {type(exc).__name__}: {exc}")
            await self._reply(bus, message, error=error)
        except Exception as exc:
            log.exception("statestore: %s failed", op)
            await self._reply(
                bus, message, error=RemoteError("internal", f"{op}: {type(exc).__name__}: {exc}")
            )
        else:
            await self._reply(bus, message, result)
        bus.ack(message)

    async def _reply(
        self,
        bus: Bus,
        message: Inbound,
        result: dict[str, Any] | None = None,
        *,
        error: RemoteError | None = None,
    ) -> None:
        op = str(message.payload.get("op"))
        self.metrics.answered(op, error.code if error else "ok", time.time() - message.received)
        try:
            await bus.reply(message, result, error=error)
        except Exception as exc:
            log.warning("statestore: could not reply to %s: %s", message.payload.get("op"), exc)

    async def execute(self, request: StatestoreRequest) -> dict[str, Any]:
        """Carry out one schema-valid request; raise RemoteError with a clear code on failure."""
        handler = self.OPS.get(request["op"])
        if handler is None:
            raise RemoteError("unknown_op", f"op {request['op']!r} is not implemented")
        try:
            result = await handler(self, request)
        except NotFound as exc:
            raise RemoteError(exc.code, str(exc)) from exc
        except Conflict as exc:
            raise RemoteError(exc.code, str(exc), exc.details) from exc
        return result

    def _record(self, request: RecordRequest) -> dict[str, Any]:
        return dict(request["record"])

    async def _op_list_nodes(self, request: ListRequest) -> dict[str, Any]:
        return {"nodes": await self._call(self._database().list_nodes)}

    async def _op_list_services(self, request: ListRequest) -> dict[str, Any]:
        return {"services": await self._call(self._database().list_services)}

    async def _op_get_service(self, request: ServiceRequest) -> dict[str, Any]:
        return await self._call(self._database().get_service, request["service"])

    async def _op_put_service(self, request: RecordRequest) -> dict[str, Any]:
        record = self._record(request)
        if request.get("service") not in (None, record.get("service")):
            raise RemoteError(
                "invalid_record",
                f"request names service {request['service']!r}, "
                f"record names {record.get('service')!r}",
            )
        record["time"] = now_ms()
        _check(self._service_state, record, "service-state record")
        doc = await self._write(self._database().put_service, record, request.get("expect"))
        await self._publish(doc)
        return doc

    async def _publish(self, doc: dict[str, Any]) -> None:
        """A service's stored record, as its retained state."""
        assert self.bus is not None
        await self.bus.publish(topics.service_state(doc["service"]), doc, retain=True)

    async def _op_delete_service(self, request: ServiceRequest) -> dict[str, Any]:
        """Forget a service; with ``purge``, retire its checkpoints and end its input session
        now (one sweep) instead of after ``statestore.stopped_grace``."""
        service, purge = request["service"], bool(request.get("purge"))
        since = 0 if purge else now_ms()
        existed = await self._write(self._database().delete_service, service, since)
        assert self.bus is not None
        # Cleared even if it was not stored: a retained state left over is worse than none.
        await self.bus.publish(topics.service_state(service), None, retain=True)
        if not purge:
            return {"service": service, "deleted": existed}
        swept = await self.sweep()
        self._collect_now.set()  # its blobs go as soon as checkpoint_grace allows
        return {"service": service, "deleted": existed, "checkpoints": swept["checkpoints"]}

    async def _op_record_checkpoint(self, request: RecordRequest) -> dict[str, Any]:
        # The record's shape is checked by the bus (statestore-request.schema.json).
        record = self._record(request)
        record.setdefault("time", now_ms())
        retention = self.config.statestore
        due = now_ms() + int(retention.checkpoint_grace * 1000)
        doc = await self._write(
            self._database().record_checkpoint, record, retention.keep_checkpoints, due
        )
        self._collect_now.set()  # the S3 deletions happen after this reply, in the collector
        return doc

    async def _op_latest_checkpoint(self, request: ServiceRequest) -> dict[str, Any]:
        return await self._call(self._database().latest_checkpoint, request["service"])

    async def _op_list_checkpoints(self, request: ServiceRequest) -> dict[str, Any]:
        limit = request.get("limit", DEFAULT_LIMIT)
        rows = await self._call(self._database().list_checkpoints, request["service"], limit)
        return {"checkpoints": rows}

    async def _op_put_migration(self, request: RecordRequest) -> dict[str, Any]:
        record = self._record(request)
        marked = request.get("service_record")
        if marked is None:
            return await self._write(self._database().put_migration, record, now_ms())
        marked = {**marked, "time": now_ms()}
        _check(self._service_state, marked, "service-state record")
        row = await self._write(
            self._database().put_migration, record, now_ms(), marked, request.get("expect")
        )
        await self._publish(await self._call(self._database().get_service, marked["service"]))
        return row

    async def _op_get_migration(self, request: MigrationRequest) -> dict[str, Any]:
        return await self._call(self._database().get_migration, request["migration"])

    async def _op_list_migrations(self, request: ListRequest) -> dict[str, Any]:
        limit = request.get("limit", DEFAULT_LIMIT)
        rows = await self._call(self._database().list_migrations, limit, request.get("service"))
        return {"migrations": rows}

    async def _op_open_migrations(self, request: ListRequest) -> dict[str, Any]:
        return {"migrations": await self._call(self._database().open_migrations)}

    #: Every op, as statestore-request.schema.json names them.
    OPS: ClassVar[dict[str, Callable[[StatestoreService, Any], Awaitable[dict[str, Any]]]]] = {
        "list_nodes": _op_list_nodes,
        "list_services": _op_list_services,
        "get_service": _op_get_service,
        "put_service": _op_put_service,
        "delete_service": _op_delete_service,
        "record_checkpoint": _op_record_checkpoint,
        "latest_checkpoint": _op_latest_checkpoint,
        "list_checkpoints": _op_list_checkpoints,
        "put_migration": _op_put_migration,
        "get_migration": _op_get_migration,
        "list_migrations": _op_list_migrations,
        "open_migrations": _op_open_migrations,
    }
