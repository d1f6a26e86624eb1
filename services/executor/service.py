"""The executor of one edge node: answers commands, owns the node's instances, reports health.

Commands arrive as MQTT 5 requests on ``ferry/v1/nodes/{node}/commands``. They are idempotent per
``request_id`` (a retried request gets the first answer, even while the first is still running)
and serialised per service, so a checkpoint can never race a restore of the same service.

Status is published as changes: the full node status (retained) when the executor connects or
reconnects and every ``executor.status_interval``; in between, one small message per instance
whose state changed (``ferry/v1/nodes/{node}/changes``), after the reply of the command that
changed it, so nothing is published or awaited between a checkpoint and its reply. The
``status`` command answers a full snapshot on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, cast

import orjson

from services.common import checkpoint_blob, messages, topics
from services.common.blobstore import (
    BlobError,
    BlobRef,
    BlobStore,
    IntegrityError,
    LocalFileError,
)
from services.common.bus import Bus, BusError, Inbound, RemoteError, now_ms
from services.common.clients import StatestoreClient
from services.common.config import FerryConfig
from services.common.messages import (
    CheckpointCommand,
    CheckpointNowReply,
    CheckpointReply,
    ExecutorCommand,
    InstanceCommand,
    RestoreCommand,
    RestoreReply,
    ResumeReply,
    StartCommand,
    StartReply,
    StopReply,
)
from services.common.metrics import metrics_port
from services.common.states import InstanceState, ServiceStatus
from services.executor.capture import Capture
from services.executor.channel import ChannelError, GuestError
from services.executor.image_cache import ImageCache
from services.executor.instance import CheckpointPolicy, Claim, Instance, InstanceError
from services.executor.metrics import ExecutorMetrics
from services.executor.runtime import GuestRuntimeError, LaunchSpec, Runtime
from services.executor.runtimes import REGISTRY, available_runtimes

log = logging.getLogger(__name__)

VERSION = "0.1.0"
REMEMBERED_REQUESTS = 2048
#: A move's target whose S3 client was idle this many seconds wakes the path up first ...
WARM_UP_AFTER_IDLE = 0.5
#: ... spending at most this many seconds on it before it says it is ready.
WARM_UP_TIMEOUT = 1.0
#: Most seconds an instance's change waits to be published (``publish_changes_soon``).
CHANGES_COALESCE = 0.05


class Executor:
    """See the module docstring."""

    def __init__(self, config: FerryConfig, node: str, metrics_port: int | None = None) -> None:
        self.config = config
        self.node = node
        self.root = config.stack.dir.resolve() / "nodes" / node
        self.instances_dir = self.root / "instances"
        cache_dir = Path(config.executor.cache_dir) if config.executor.cache_dir else None
        self.store = BlobStore(config.s3)
        self.keyring = checkpoint_blob.Keyring.configured(config.executor.checkpoint_key_file)
        self.images = ImageCache(cache_dir or self.root / "images", self.store)
        self.runtimes: dict[str, Runtime] = {}
        self.unavailable: dict[str, str] = {}
        self.accel: dict[str, str] = {}
        #: By instance id: an upgrade on this node runs a service's old and new instance at once.
        self.instances: dict[str, Instance] = {}
        self.cleaned_up: list[str] = []
        #: Instances an earlier executor process ran, reported as lost until they moved on.
        self.lost: dict[str, dict[str, Any]] = {}
        self._answers: OrderedDict[str, asyncio.Future[dict[str, Any]]] = OrderedDict()
        self._service_locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: When this process started, and its changes so far (see node-change.schema.json).
        self.boot = now_ms()
        self.seq = 0
        #: By instance id: what consumers were last told of each instance (state and reason).
        self._announced: dict[str, dict[str, Any]] = {}
        self._changes_due: asyncio.Task[None] | None = None
        self._changes_wanted = False
        self._leaving = False
        self.bus: Bus | None = None
        self.metrics = ExecutorMetrics(self)
        self._metrics_port = metrics_port

    # -- main loop --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set (or forever); instances are stopped on the way out."""
        self.instances_dir.mkdir(parents=True, exist_ok=True)
        leftovers = clean_up_leftovers(self.instances_dir)
        self.cleaned_up = [record["instance"] for record in leftovers]
        self.lost = {
            record["service"]: {
                "service": record["service"],
                "instance": record["instance"],
                "app": record.get("app") or "unknown",
                "runtime": record.get("runtime") or "unix",
                "state": InstanceState.LOST,
                "reason": "its executor process ended (restart or crash) and took the guest along",
            }
            for record in leftovers
            if record.get("service")
        }
        self.runtimes, self.unavailable, self.accel = await available_runtimes(self.config)
        port = metrics_port(self.config, "executor", self._metrics_port)
        self.metrics.start(self.config.metrics.host, port)
        offline = {"node": self.node, "status": "offline", "time": now_ms(), "boot": self.boot}
        will = (topics.node_status(self.node), offline)
        async with Bus(self.config.broker, f"ferry-executor-{self.node}", will=will) as bus:
            self.bus = bus
            await bus.subscribe(topics.node_commands(self.node))
            # Re-announced after every reconnect, or a broker restart leaves the node "offline".
            await bus.announce(topics.node_status(self.node), self._full_status)
            heartbeat = asyncio.create_task(self._heartbeat())
            full_status = asyncio.create_task(self._full_status_periodically())
            watch_paused = asyncio.create_task(self._watch_paused())
            serve = asyncio.create_task(self._serve(bus))
            try:
                if stop is None:
                    await serve
                else:
                    await stop.wait()
            finally:
                heartbeat.cancel()
                full_status.cancel()
                watch_paused.cancel()
                serve.cancel()
                for instance in list(self.instances.values()):
                    with contextlib.suppress(Exception):
                        await instance.stop()
                self.metrics.stop()
                self._leaving = True
                if self._changes_due is not None:  # the offline status is the last word
                    self._changes_due.cancel()
                bus.withdraw(topics.node_status(self.node))
                await bus.publish(topics.node_status(self.node), offline, retain=True)

    async def _serve(self, bus: Bus) -> None:
        async for message in bus.messages():
            task = asyncio.create_task(self._answer(bus, message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _heartbeat(self) -> None:
        assert self.bus is not None
        while True:
            await asyncio.sleep(self.config.executor.heartbeat_interval)
            with contextlib.suppress(Exception):
                await self.bus.publish(
                    topics.node_heartbeat(self.node),
                    {
                        "node": self.node,
                        "time": now_ms(),
                        "instances": len(self.instances),
                        "load": os.getloadavg()[0],
                        "applied": {i.instance_id: i.applied for i in self.instances.values()},
                    },
                    qos=0,
                )
            # A change no command announced (say, an instance that lost its session).
            self.publish_changes_soon()

    async def _full_status_periodically(self) -> None:
        while True:
            await asyncio.sleep(max(self.config.executor.status_interval, 1.0))
            try:
                await self.publish_status()
            except BusError as exc:
                log.warning("%s: full status not published: %s", self.node, exc)

    def status(self) -> dict[str, Any]:
        """The full status: every instance, and ``seq``, the last change it includes."""
        return {
            "node": self.node,
            "status": "online",
            "time": now_ms(),
            "boot": self.boot,
            "seq": self.seq,
            "version": VERSION,
            "runtimes": sorted(self.runtimes),
            "image_targets": {name: REGISTRY[name].image_target for name in sorted(self.runtimes)},
            "unavailable": self.unavailable,
            "accel": self.accel,
            "capacity": self.config.executor.capacity,
            "instances": self._instance_summaries(),
            "cleaned_up": self.cleaned_up,
        }

    def _instance_summaries(self) -> list[dict[str, Any]]:
        """Every instance as the status reports it, with those an earlier process lost."""
        return [
            *(i.summary() for i in self.instances.values()),
            *(lost for service, lost in self.lost.items() if service not in self._services()),
        ]

    def _full_status(self) -> dict[str, Any]:
        """The full status about to be published: consumers now know every instance in it."""
        status = self.status()
        self._announced = _as_told(status["instances"])
        return status

    async def publish_status(self) -> None:
        """The full status, retained: what a consumer that (re)subscribes starts from."""
        assert self.bus is not None
        await self.bus.publish(topics.node_status(self.node), self._full_status(), retain=True)

    def _changes(self) -> list[dict[str, Any]]:
        """One change per instance whose state (or failure reason) differs from what consumers
        were last told, and one with state ``stopped`` per instance gone from this node."""
        current = _as_told(self._instance_summaries())
        changed = [
            entry
            for instance, entry in current.items()
            if (told := self._announced.get(instance)) is None
            or (told["state"], told.get("reason")) != (entry["state"], entry.get("reason"))
        ]
        changed += [
            {**_without(entry, "reason"), "state": "stopped"}
            for instance, entry in self._announced.items()
            if instance not in current
        ]
        self._announced = current
        changes = []
        for entry in changed:
            self.seq += 1
            changes.append(
                {
                    "node": self.node,
                    "boot": self.boot,
                    "seq": self.seq,
                    "time": now_ms(),
                    "instance": entry,
                }
            )
        return changes

    # -- commands ---------------------------------------------------------------------------

    async def _answer(self, bus: Bus, message: Inbound) -> None:
        request_id = message.payload["request_id"]
        answer = self._answers.get(request_id)
        if answer is None:
            answer = asyncio.get_running_loop().create_future()
            self._answers[request_id] = answer
            while len(self._answers) > REMEMBERED_REQUESTS:
                self._answers.popitem(last=False)
            try:
                # The bus checked the payload against executor-command.schema.json.
                command = cast(ExecutorCommand, message.payload)
                answer.set_result({"ok": True, "result": await self.execute(command)})
            except RemoteError as exc:
                answer.set_result({"ok": False, "error": exc})
            except Exception as exc:
                log.exception("%s: %s failed", self.node, message.payload.get("command"))
                error = RemoteError("internal", f"{type(exc).__name__}: {exc}")
                answer.set_result({"ok": False, "error": error})
        outcome = await answer
        with contextlib.suppress(Exception):
            if outcome["ok"]:
                await bus.reply(message, outcome["result"])
            else:
                await bus.reply(message, error=outcome["error"])
        if message.payload["command"] != "status":
            # After the reply: a migration's downtime must not wait for bookkeeping.
            self.publish_changes_soon()

    async def execute(self, command: ExecutorCommand) -> Mapping[str, Any]:
        """Carry out one validated command; raise RemoteError with a clear code on failure."""
        if command["command"] == "status":
            return self.status()
        name, service = command["command"], command["service"]
        async with self._service_locks.setdefault(service, asyncio.Lock()):
            try:
                result = await self.COMMANDS[name](self, command)
            except InstanceError as exc:
                raise RemoteError(exc.code, str(exc)) from exc
            except GuestRuntimeError as exc:
                raise RemoteError("runtime_failed", str(exc)) from exc
            except GuestError as exc:
                raise RemoteError("guest_refused", f"the guest refused: {exc}") from exc
            except ChannelError as exc:
                raise RemoteError("guest_failed", f"lost the guest's channel: {exc}") from exc
            except (IntegrityError, checkpoint_blob.BlobFormatError) as exc:
                raise RemoteError("blob_corrupt", str(exc)) from exc
            except LocalFileError as exc:
                raise RemoteError("node_storage", f"node {self.node}: {exc}") from exc
            except BlobError as exc:
                raise RemoteError("blob_unavailable", str(exc)) from exc
        # No status here: ``_answer`` publishes it after the reply (nothing is published or
        # awaited between a checkpoint and its reply; consumers poll or ask `status`).
        return result

    def _services(self) -> set[str]:
        return {instance.service for instance in self.instances.values()}

    def _instance(self, command: CheckpointCommand | RestoreCommand | InstanceCommand) -> Instance:
        instance = self.instances.get(command["instance"])
        if instance is None or instance.service != command["service"]:
            raise RemoteError(
                "unknown_instance",
                f"node {self.node} runs no instance {command['instance']!r} "
                f"of service {command['service']!r}",
            )
        return instance

    async def _cmd_start(self, command: StartCommand) -> StartReply:
        service, instance_id = command["service"], command["instance"]
        same = self.instances.get(instance_id)
        if (
            same is not None
            and same.service == service
            and same.state not in (InstanceState.FAILED, InstanceState.STOPPED)
        ):
            return {"state": same.state, "instance": instance_id}
        for existing in [i for i in self.instances.values() if i.service == service]:
            if (
                existing.state in (InstanceState.FAILED, InstanceState.STOPPED)
                or existing.instance_id == instance_id
            ):
                await self._stop(existing)  # a dead guest's leftovers go before its successor
            elif command["mode"] != "wait":
                # Only a move's target (it waits for the state) may run beside a live instance
                # of its service: an upgrade on this node.
                raise RemoteError(
                    "service_busy",
                    f"node {self.node} already runs {existing.instance_id} of {service}",
                )
        runtime = self.runtimes.get(command["runtime"])
        if runtime is None:
            reason = self.unavailable.get(command["runtime"], "not configured")
            raise RemoteError(
                "runtime_unavailable", f"runtime {command['runtime']} on {self.node}: {reason}"
            )
        started = time.perf_counter()
        image_ref = BlobRef.from_dict(command["image"])
        image = await self.images.path_for(image_ref)
        fetched = time.perf_counter()
        # A move's target: the downtime that follows is one PUT and one GET, so wake S3 up now.
        warm_up = (
            asyncio.create_task(self._warm_up_s3(image_ref))
            if command["mode"] == "wait" and self.store.idle_for() > WARM_UP_AFTER_IDLE
            else None
        )
        workdir = instance_dir(self.instances_dir, instance_id)
        workdir.mkdir(parents=True, exist_ok=True)
        spec = LaunchSpec(
            service=service,
            instance=instance_id,
            app=command["app"],
            image=image,
            workdir=workdir,
            memory_mb=self.config.executor.microvm_memory_mb,
        )
        instance = Instance(
            node=self.node,
            service=service,
            instance_id=instance_id,
            app=command["app"],
            runtime=runtime,
            spec=spec,
            broker=self.config.broker,
            node_bus=self._bus(),
            keeper=self,
            policy=CheckpointPolicy(
                self.config.executor.checkpoint_interval, self.config.executor.checkpoint_inputs
            ),
            max_input_bytes=self.config.executor.max_input_bytes,
            on_failure=self._instance_failed,
            on_session_lost=self._detached,
        )
        self.instances[instance_id] = instance
        self.lost.pop(service, None)
        claim = command.get("claim") if command["mode"] == "fresh" else None
        try:
            await instance.boot(fresh=command["mode"] == "fresh")
            if warm_up is not None:
                await warm_up
            record_instance(workdir, instance)
            if command["mode"] == "fresh":
                await instance.start_fresh(
                    command.get("params") or {},
                    self._claimer(instance, claim) if claim else None,
                )
        except BaseException as exc:
            if warm_up is not None:
                warm_up.cancel()
            if isinstance(exc, InstanceError) and exc.code == "detached":
                raise  # started; whether it serves is the statestore's answer (see attach_input)
            await instance.stop()
            self.instances.pop(instance_id, None)
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        booted = time.perf_counter()
        return {
            "state": instance.state,
            "instance": instance_id,
            "claimed": claim is not None,
            "timings": {
                "image_ms": (fetched - started) * 1000,
                "boot_ms": (booted - fetched) * 1000,
            },
        }

    async def _warm_up_s3(self, image: BlobRef) -> None:
        """One small request (a HEAD of the image) before a move's downtime, alongside the boot.

        Why: on a quiet store the first request after a pause is slow (this machine's Swift:
        a PUT after 6 s idle 14-17 ms, 10-12 ms right after another client's HEAD; bench/README
        "Downtime budget"), and the downtime is exactly such a PUT (the source's) and GET (this
        node's, on its pooled connection, which this request also wakes). Only after an idle
        spell: in a drain the store is awake and the request would only add to its load.
        A failure never fails the start: the restore fetches with its own retries and errors.
        """
        try:
            await asyncio.wait_for(self.store.stat(image.key), WARM_UP_TIMEOUT)
        except Exception as exc:
            log.info("%s: S3 warm-up before a move failed (ignored): %s", self.node, exc)

    async def _cmd_checkpoint(self, command: CheckpointCommand) -> CheckpointReply:
        """Capture for a move; answer once the blob is stored and every output is out.

        A suspend (``stop_after``) records the checkpoint before answering, since the resume
        reads it back. A migration answers first (downtime runs) and records it right after,
        then acknowledges what it covers and leaves the input session; if the target takes the
        session over before that, the unacknowledged rest is redelivered to it and dropped by
        its watermark.
        """
        instance = self._instance(command)
        migration = command.get("migration")
        checkpoint = await instance.checkpoint()
        upload_started = time.perf_counter()
        # The service is down while this runs: a frozen S3 must not hold it for s3.timeout.
        bound = min(self.config.s3.timeout, self.config.executor.pause_timeout / 2)
        try:
            ref = await asyncio.wait_for(
                self.upload(instance, checkpoint.capture, migration), bound
            )
        except TimeoutError:
            await instance.resume()
            raise BlobError(
                f"checkpoint upload of {instance.service} took over {bound:g} s "
                "(executor.pause_timeout / 2); the source serves again"
            ) from None
        except BlobError:
            await instance.resume()
            raise
        upload_ms = (time.perf_counter() - upload_started) * 1000
        self.metrics.observe_upload("move", upload_ms / 1000)
        await instance.outputs.wait_confirmed()
        stored_at = time.time() * 1000
        watermark = checkpoint.capture.watermark
        record = self.record(instance, ref, watermark, checkpoint.paused_at, migration)
        if command.get("stop_after"):
            await instance.release(checkpoint.covers, record)
            await self._stop(instance)
        else:
            self._in_background(self._release_after_reply(instance, checkpoint.covers, record))
        return {
            "checkpoint": ref.to_dict(),
            "watermark": watermark,
            "paused_at": checkpoint.paused_at,
            "stored_at": stored_at,
            "timings": {
                "drain_ms": checkpoint.drain_ms,
                "checkpoint_ms": checkpoint.checkpoint_ms,
                "upload_ms": upload_ms,
            },
        }

    async def _cmd_checkpoint_now(self, command: CheckpointCommand) -> CheckpointNowReply:
        """A fresh checkpoint of a serving instance, for an operator (``ferry checkpoint show
        --fresh``): taken without pausing, stored, recorded with the statestore (which refuses
        a fenced copy) and acknowledged like a periodic one, so it is also the recovery point.

        Whole-image runtimes are refused: their checkpoint is the whole guest (CRIU, a VM
        snapshot), taken only when the service moves, and it is nothing ``show`` could decode.
        """
        instance = self._instance(command)
        service = instance.service
        if not instance.runtime.capture_form.periodic:
            raise RemoteError(
                "whole_image_runtime",
                f"{service} runs on {instance.runtime.name}, which checkpoints the whole guest "
                "image, and only when the service moves (suspend, migrate): there is no fresh "
                "checkpoint to take; the app-level runtimes (unix, microvm) take them",
            )
        if instance.state != InstanceState.SERVING:
            raise RemoteError(
                "not_serving",
                f"{service}'s instance {instance.instance_id} on {self.node} is {instance.state}, "
                "not serving (is it being moved?): ask again once it serves",
            )
        taken_at = time.time() * 1000
        ref = await instance.checkpoint_now()
        if ref is None:
            raise RemoteError(
                "not_serving",
                f"{service}'s instance {instance.instance_id} on {self.node} stopped serving "
                f"({instance.state}) before its checkpoint was taken",
            )
        return {"checkpoint": ref, "instance": instance.instance_id, "taken_at": taken_at}

    async def _release_after_reply(self, instance: Instance, covers: int, record: Any) -> None:
        async with self._service_locks.setdefault(instance.service, asyncio.Lock()):
            await instance.release(covers, record)

    # -- where checkpoints go (the instances' Keeper) ---------------------------------------

    @staticmethod
    def _checkpoint_key(instance: Instance, migration: str | None) -> str:
        return f"checkpoints/{instance.service}/{migration or instance.instance_id}/{now_ms()}"

    async def upload(self, instance: Instance, capture: Capture, migration: str | None) -> BlobRef:
        """Store a capture in S3, sealed when the node holds checkpoint keys."""
        key = f"{self._checkpoint_key(instance, migration)}{capture.form.suffix}"
        started = time.perf_counter()
        ref = await capture.store(self.store, key, keyring=self.keyring, service=instance.service)
        if (
            instance.state == InstanceState.SERVING
        ):  # a move's upload is observed by _cmd_checkpoint
            self.metrics.observe_upload("durable", time.perf_counter() - started)
        return ref

    async def record(
        self,
        instance: Instance,
        ref: BlobRef,
        watermark: dict[str, int],
        taken_at: float,
        migration: str | None,
    ) -> None:
        """Make ``ref`` the service's recovery point; the statestore refuses (``not_owner``)
        an instance the service record no longer names, so a fenced copy never moves it."""
        record: dict[str, Any] = {
            "service": instance.service,
            "instance": instance.instance_id,
            **ref.to_dict(),
            "watermark": watermark,
            "time": int(taken_at),
        }
        if migration:
            record["migration"] = migration
        await self._statestore().record_checkpoint(record)

    # -- an instance that lost its input session, or waits paused too long -----------------

    def _detached(self, instance: Instance) -> None:
        # A task the executor holds: an unreferenced task may be collected mid-way, and this one
        # must run until the instance serves again or stops.
        self._in_background(self._session_lost(instance))

    async def _session_lost(self, instance: Instance) -> None:
        """Take the session back only while the service record still names this instance.

        The broker connection dropped (or another client took the session): if the service has
        moved on (recovered elsewhere while this node was away), this copy is fenced: it stops
        and says so, and its unacknowledged input belongs to the new owner.
        """
        delay = 0.2
        while instance.state == InstanceState.DETACHED:
            try:
                record = await self._statestore().get_service(instance.service)
            except (RemoteError, BusError) as exc:
                log.warning("%s: cannot ask who owns %s yet: %s", self.node, instance.service, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            async with self._service_locks.setdefault(instance.service, asyncio.Lock()):
                if instance.state != InstanceState.DETACHED:
                    return
                if record.get("instance") == instance.instance_id and record.get("status") in (
                    ServiceStatus.DEPLOYING,
                    ServiceStatus.SERVING,
                    ServiceStatus.MIGRATING,
                    ServiceStatus.RECOVERING,
                ):
                    try:
                        await instance.attach_input()
                        log.warning(
                            "%s: %s took its input session back", self.node, instance.service
                        )
                    except BusError as exc:
                        log.info(
                            "%s: session of %s not back yet: %s", self.node, instance.service, exc
                        )
                        await asyncio.sleep(delay)
                        continue
                else:
                    await self._fenced(instance, record)
                return

    async def _fenced(self, instance: Instance, record: dict[str, Any]) -> None:
        """The service record names another instance: this copy stops and says so (its
        unacknowledged input belongs to the owner). The caller holds the service's lock."""
        reason = (
            f"{instance.service}: instance {instance.instance_id} on {self.node} is "
            f"fenced: the service moved on to {record.get('instance')} "
            f"({record.get('status')}); stopping it"
        )
        log.warning(reason)
        await self._report(instance.service, reason)
        await self._stop(instance)
        self.publish_changes_soon()

    async def _watch_paused(self) -> None:
        """A source paused for a move serves again on its own if nobody finishes the hand-over.

        It claims the service back in the statestore first (only if the record still names it
        and says migrating), so it can never serve beside a target that was committed.
        """
        limit = self.config.executor.pause_timeout
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            for instance in list(self.instances.values()):
                since = instance.paused_since
                if since is None or time.monotonic() - since < limit:
                    continue
                self._in_background(self._resume_abandoned(instance))
                instance.paused_since = time.monotonic()  # one attempt per period

    async def _resume_abandoned(self, instance: Instance) -> None:
        try:
            record = await self._statestore().get_service(instance.service)
            if record.get("instance") not in (instance.instance_id, None):
                async with self._service_locks.setdefault(instance.service, asyncio.Lock()):
                    if instance.state == InstanceState.PAUSED:  # not stopped by a commit
                        await self._fenced(instance, record)  # its target claimed the service
                return
            if (
                record.get("instance") != instance.instance_id
                or record.get("status") != ServiceStatus.MIGRATING
            ):
                return
            claimed = {k: v for k, v in record.items() if k != "time"}
            await self._statestore().put_service(
                {**claimed, "status": ServiceStatus.SERVING},
                expect={"instance": instance.instance_id, "status": ServiceStatus.MIGRATING},
            )
        except (RemoteError, BusError) as exc:
            log.warning("%s: cannot claim %s back yet: %s", self.node, instance.service, exc)
            return
        async with self._service_locks.setdefault(instance.service, asyncio.Lock()):
            if instance.state == InstanceState.PAUSED:
                await instance.resume()
                await self._report(
                    instance.service,
                    f"{instance.service}: nobody completed its hand-over within "
                    f"{self.config.executor.pause_timeout:g} s; it serves again on {self.node}",
                )
        self.publish_changes_soon()

    async def _report(self, service: str, reason: str) -> None:
        await self._bus().report(topics.node_status(self.node), reason, service=service)

    def publish_changes_soon(self) -> None:
        """Publish, within ``CHANGES_COALESCE`` s, each instance's change of state since
        consumers were last told; what changes meanwhile goes out with it.

        Why changes, not the full status: a drain sends a node hundreds of commands, and a full
        status after each (built, then validated by this executor, the statestore and the
        scheduler, each O(instances)) was the control plane's largest cost (bench/README.md,
        "Drain"). A change is one instance's, whatever the node holds.
        """
        if self._leaving:
            return  # the offline status is the last word
        self._changes_wanted = True
        if self._changes_due is None or self._changes_due.done():
            self._changes_due = asyncio.create_task(self._publish_wanted_changes())

    async def _publish_wanted_changes(self) -> None:
        while self._changes_wanted:  # again if something changed while they were published
            await asyncio.sleep(CHANGES_COALESCE)
            self._changes_wanted = False
            changes = self._changes()
            if not changes:
                continue
            topic = topics.node_changes(self.node)
            failed = await self._bus().publish_many([(topic, change) for change in changes])
            if any(failed):
                # Consumers see the gap in ``seq`` and ask for the full status (or take the
                # next periodic one), which says the same.
                log.warning(
                    "%s: a status change was not published: %s",
                    self.node,
                    next(e for e in failed if e),
                )

    def _in_background(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        """Forget a finished background task, and say what ended one that failed (nothing
        awaits these: an exception would otherwise vanish)."""
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: background task failed", self.node, exc_info=task.exception())

    async def _cmd_restore(self, command: RestoreCommand) -> RestoreReply:
        instance = self._instance(command)
        ref = BlobRef.from_dict(command["checkpoint"])
        started = time.perf_counter()
        capture = await instance.runtime.capture_form.fetch(
            self.store,
            ref,
            keyring=self.keyring,
            service=instance.service,
            allow_unsealed=self.config.executor.allow_unsealed_checkpoints,
            workdir=instance.spec.workdir,
        )
        fetched = time.perf_counter()
        fetched_at = time.time() * 1000
        claim = command.get("claim")
        try:
            resumed_at = await instance.restore(
                capture, self._claimer(instance, claim) if claim else None
            )
        except InstanceError as exc:
            if exc.code == "fenced":
                log.warning("%s: %s", self.node, exc)
                await self._stop(instance)
            raise
        return {
            "state": instance.state,
            "resumed_at": resumed_at,
            "claimed": claim is not None,
            "bytes": ref.size,
            "timings": {
                "fetch_ms": (fetched - started) * 1000,
                "restore_ms": instance.restored_at - fetched_at,
                "attach_ms": resumed_at - instance.restored_at,
            },
        }

    def _claimer(self, instance: Instance, claim: messages.Claim) -> Claim:
        """The restore's claim: the scheduler's commit, as a compare-and-set by the target."""

        async def make_owner() -> bool | None:
            statestore = self._statestore()
            try:
                await statestore.put_service(claim["record"], expect=claim["expect"])
                return True
            except RemoteError as exc:
                if exc.code not in ("conflict", "stale_epoch"):
                    log.warning("%s: claim of %s refused: %s", self.node, instance.service, exc)
                    return None
            except BusError as exc:
                log.warning("%s: claim of %s not answered: %s", self.node, instance.service, exc)
                return None
            try:  # refused: by a record that already names us (a repeat) or by another owner
                record = await statestore.get_service(instance.service)
            except (RemoteError, BusError):
                return None
            return bool(record.get("instance") == instance.instance_id)

        return make_owner

    async def _cmd_resume(self, command: InstanceCommand) -> ResumeReply:
        instance = self._instance(command)
        await instance.resume()
        return {"state": instance.state, "resumed_at": time.time() * 1000}

    async def _cmd_stop(self, command: InstanceCommand) -> StopReply:
        instance = self.instances.get(command["instance"])
        if instance is None or instance.service != command["service"]:
            return {"state": InstanceState.STOPPED, "already": True}
        await self._stop(instance)
        return {"state": InstanceState.STOPPED, "applied": instance.applied}

    async def _stop(self, instance: Instance) -> None:
        await instance.stop()
        self.instances.pop(instance.instance_id, None)
        shutil.rmtree(instance.spec.workdir, ignore_errors=True)

    def _instance_failed(self, instance: Instance) -> None:
        """A guest died on its own: tell the scheduler and operators (a node change)."""
        self.metrics.guest_failures.labels(self.node).inc()
        self.publish_changes_soon()

    def _statestore(self) -> StatestoreClient:
        return StatestoreClient(self._bus(), self.config.broker.request_timeout)

    def _bus(self) -> Bus:
        assert self.bus is not None
        return self.bus

    #: Every command but `status` (answered by `execute`), named as executor-command.schema.json.
    COMMANDS: ClassVar[dict[str, Callable[[Executor, Any], Awaitable[Mapping[str, Any]]]]] = {
        "start": _cmd_start,
        "checkpoint": _cmd_checkpoint,
        "checkpoint_now": _cmd_checkpoint_now,
        "restore": _cmd_restore,
        "resume": _cmd_resume,
        "stop": _cmd_stop,
    }


def _as_told(summaries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """By instance id, each instance as a change reports it: its summary without the
    per-producer counts."""
    return {summary["instance"]: _without(summary, "producers") for summary in summaries}


def _without(entry: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != key}


# -- leftovers of an earlier executor process ---------------------------------------------------

INSTANCE_RECORD = "instance.json"


def instance_dir(instances_dir: Path, instance_id: str) -> Path:
    """The working directory of an instance, refusing any id that would leave ``instances_dir``.

    The schema already refuses such ids; this is the second lock, since the directory is removed
    on stop.
    """
    workdir = instances_dir / instance_id
    if workdir.resolve().parent != instances_dir.resolve() or workdir.name != instance_id:
        raise RemoteError("invalid_name", f"instance id {instance_id!r} is not a plain file name")
    return workdir


def record_instance(workdir: Path, instance: Instance) -> None:
    """Note the guest's pid so a restarted executor can find and end it."""
    pid = instance.guest.pid if instance.guest else None
    record = {
        "service": instance.service,
        "instance": instance.instance_id,
        "app": instance.app,
        "runtime": instance.runtime.name,
        "pid": pid,
    }
    (workdir / INSTANCE_RECORD).write_bytes(orjson.dumps(record))


def clean_up_leftovers(instances_dir: Path) -> list[dict[str, Any]]:
    """End the guests a previous executor process left behind; return their records.

    An executor that restarts has lost its guests' channels, so those guests can never be driven
    again: their input stays queued in the broker, the node status lists them as ``lost``, and
    the scheduler recovers their services from their latest durable checkpoints.
    """
    cleaned: list[dict[str, Any]] = []
    for workdir in sorted(instances_dir.iterdir()) if instances_dir.exists() else []:
        record_file = workdir / INSTANCE_RECORD
        if record_file.exists():
            record = orjson.loads(record_file.read_bytes())
            pid = record.get("pid")
            if isinstance(pid, int) and pid > 1:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            record.setdefault("instance", workdir.name)
            cleaned.append(record)
            log.warning("cleaned up instance %s left by an earlier executor", workdir.name)
        shutil.rmtree(workdir, ignore_errors=True)
    return cleaned
