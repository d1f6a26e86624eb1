"""The executor of one edge node: answers commands, owns the node's instances, reports health.

Commands arrive as MQTT 5 requests on ``ferry/v1/nodes/{node}/commands``. They are idempotent per
``request_id`` (a retried request gets the first answer, even while the first is still running)
and serialised per service, so a checkpoint can never race a restore of the same service.
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
from pathlib import Path
from typing import Any

import orjson

from services.common import checkpoint_blob, topics
from services.common.blobstore import (
    BlobError,
    BlobRef,
    BlobStore,
    IntegrityError,
    LocalFileError,
)
from services.common.bus import Bus, Inbound, RemoteError, now_ms
from services.common.config import FerryConfig
from services.executor.channel import ChannelError, GuestError
from services.executor.images import ImageCache
from services.executor.instance import Instance, InstanceError
from services.executor.runtime import GuestRuntimeError, LaunchSpec, Runtime
from services.executor.runtimes import available_runtimes

log = logging.getLogger(__name__)

VERSION = "0.1.0"
REMEMBERED_REQUESTS = 2048


class Executor:
    """See the module docstring."""

    def __init__(self, config: FerryConfig, node: str) -> None:
        self.config = config
        self.node = node
        self.root = config.stack.dir.resolve() / "nodes" / node
        self.instances_dir = self.root / "instances"
        cache_dir = Path(config.executor.cache_dir) if config.executor.cache_dir else None
        self.store = BlobStore(config.s3)
        self.images = ImageCache(cache_dir or self.root / "images", self.store)
        self.runtimes: dict[str, Runtime] = {}
        self.unavailable: dict[str, str] = {}
        self.accel: dict[str, str] = {}
        self.instances: dict[str, Instance] = {}
        self.cleaned_up: list[str] = []
        self._answers: OrderedDict[str, asyncio.Future[dict[str, Any]]] = OrderedDict()
        self._service_locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.bus: Bus | None = None

    # -- main loop --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set (or forever); instances are stopped on the way out."""
        self.instances_dir.mkdir(parents=True, exist_ok=True)
        self.cleaned_up = clean_up_leftovers(self.instances_dir)
        self.runtimes, self.unavailable, self.accel = await available_runtimes(self.config)
        offline = {"node": self.node, "status": "offline", "time": now_ms()}
        will = (topics.node_status(self.node), offline)
        async with Bus(self.config.broker, f"ferry-executor-{self.node}", will=will) as bus:
            self.bus = bus
            await bus.subscribe(topics.node_commands(self.node))
            # Re-announced after every reconnect, or a broker restart leaves the node "offline".
            await bus.announce(topics.node_status(self.node), self.status)
            heartbeat = asyncio.create_task(self._heartbeat())
            serve = asyncio.create_task(self._serve(bus))
            try:
                if stop is None:
                    await serve
                else:
                    await stop.wait()
            finally:
                heartbeat.cancel()
                serve.cancel()
                for instance in list(self.instances.values()):
                    with contextlib.suppress(Exception):
                        await instance.stop()
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
                    },
                    qos=0,
                )

    def status(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "status": "online",
            "time": now_ms(),
            "version": VERSION,
            "runtimes": sorted(self.runtimes),
            "unavailable": self.unavailable,
            "accel": self.accel,
            "capacity": self.config.executor.capacity,
            "instances": [i.summary() for i in self.instances.values()],
            "cleaned_up": self.cleaned_up,
        }

    async def publish_status(self) -> None:
        assert self.bus is not None
        await self.bus.publish(topics.node_status(self.node), self.status(), retain=True)

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
                answer.set_result({"ok": True, "result": await self.execute(message.payload)})
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
            with contextlib.suppress(Exception):
                await self.publish_status()

    async def execute(self, command: dict[str, Any]) -> dict[str, Any]:
        """Carry out one validated command; raise RemoteError with a clear code on failure."""
        name = command["command"]
        if name == "status":
            return self.status()
        service = command["service"]
        async with self._service_locks.setdefault(service, asyncio.Lock()):
            try:
                result = await getattr(self, f"_cmd_{name}")(command)
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
        await self.publish_status()
        return result

    def _instance(self, command: dict[str, Any]) -> Instance:
        instance = self.instances.get(command["service"])
        if instance is None or instance.instance_id != command["instance"]:
            raise RemoteError(
                "unknown_instance",
                f"node {self.node} runs no instance {command['instance']!r} "
                f"of service {command['service']!r}",
            )
        return instance

    async def _cmd_start(self, command: dict[str, Any]) -> dict[str, Any]:
        service, instance_id = command["service"], command["instance"]
        existing = self.instances.get(service)
        if existing is not None:
            if existing.instance_id == instance_id and existing.state not in ("failed", "stopped"):
                return {"state": existing.state, "instance": instance_id}
            if existing.state not in ("failed", "stopped"):
                raise RemoteError(
                    "service_busy",
                    f"node {self.node} already runs {existing.instance_id} of {service}",
                )
            await self._stop(existing)  # a dead guest's leftovers go before its successor
        runtime = self.runtimes.get(command["runtime"])
        if runtime is None:
            reason = self.unavailable.get(command["runtime"], "not configured")
            raise RemoteError(
                "runtime_unavailable", f"runtime {command['runtime']} on {self.node}: {reason}"
            )
        started = time.perf_counter()
        image = await self.images.path_for(BlobRef.from_dict(command["image"]))
        fetched = time.perf_counter()
        workdir = self.instances_dir / instance_id
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
            on_failure=self._instance_failed,
        )
        self.instances[service] = instance
        try:
            await instance.boot(fresh=command["mode"] == "fresh")
            record_instance(workdir, instance)
            if command["mode"] == "fresh":
                await instance.start_fresh(command.get("params") or {})
        except BaseException:
            await instance.stop()
            self.instances.pop(service, None)
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        booted = time.perf_counter()
        return {
            "state": instance.state,
            "instance": instance_id,
            "timings": {
                "image_ms": (fetched - started) * 1000,
                "boot_ms": (booted - fetched) * 1000,
            },
        }

    async def _cmd_checkpoint(self, command: dict[str, Any]) -> dict[str, Any]:
        instance = self._instance(command)
        checkpoint = await instance.checkpoint()
        key = (
            f"checkpoints/{instance.service}/{command.get('migration') or instance.instance_id}/"
            f"{now_ms()}"
        )
        upload_started = time.perf_counter()
        try:
            if checkpoint.image_file is not None:
                ref = await self.store.put_file(f"{key}.img", checkpoint.image_file)
            else:
                assert checkpoint.document is not None
                ref = await self.store.put_bytes(
                    f"{key}.json", checkpoint_blob.pack(checkpoint.document)
                )
        except BlobError:
            await instance.resume()
            raise
        upload_ms = (time.perf_counter() - upload_started) * 1000
        stored_at = time.time() * 1000
        if command.get("stop_after"):
            await self._stop(instance)
        return {
            "checkpoint": ref.to_dict(),
            "watermark": checkpoint.watermark,
            "paused_at": checkpoint.paused_at,
            "stored_at": stored_at,
            "timings": {
                "drain_ms": checkpoint.drain_ms,
                "checkpoint_ms": checkpoint.checkpoint_ms,
                "upload_ms": upload_ms,
            },
        }

    async def _cmd_restore(self, command: dict[str, Any]) -> dict[str, Any]:
        instance = self._instance(command)
        ref = BlobRef.from_dict(command["checkpoint"])
        started = time.perf_counter()
        if instance.runtime.whole_image:
            image_file = instance.spec.workdir / "incoming.img"
            await self.store.get_file(ref, image_file)
            fetched = time.perf_counter()
            fetched_at = time.time() * 1000
            resumed_at = await instance.restore_image(image_file)
        else:
            document = checkpoint_blob.unpack(await self.store.get_bytes(ref))
            fetched = time.perf_counter()
            fetched_at = time.time() * 1000
            resumed_at = await instance.restore(document)
        return {
            "state": instance.state,
            "resumed_at": resumed_at,
            "bytes": ref.size,
            "timings": {
                "fetch_ms": (fetched - started) * 1000,
                "restore_ms": instance.restored_at - fetched_at,
                "attach_ms": resumed_at - instance.restored_at,
            },
        }

    async def _cmd_resume(self, command: dict[str, Any]) -> dict[str, Any]:
        instance = self._instance(command)
        await instance.resume()
        return {"state": instance.state, "resumed_at": time.time() * 1000}

    async def _cmd_stop(self, command: dict[str, Any]) -> dict[str, Any]:
        instance = self.instances.get(command["service"])
        if instance is None or instance.instance_id != command["instance"]:
            return {"state": "stopped", "already": True}
        await self._stop(instance)
        return {"state": "stopped", "applied": instance.applied}

    async def _stop(self, instance: Instance) -> None:
        await instance.stop()
        self.instances.pop(instance.service, None)
        shutil.rmtree(instance.spec.workdir, ignore_errors=True)

    def _instance_failed(self, instance: Instance) -> None:
        """A guest died on its own: tell the scheduler and operators through the node status."""
        task = asyncio.create_task(self.publish_status())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _bus(self) -> Bus:
        assert self.bus is not None
        return self.bus


# -- leftovers of an earlier executor process ---------------------------------------------------

INSTANCE_RECORD = "instance.json"


def record_instance(workdir: Path, instance: Instance) -> None:
    """Note the guest's pid so a restarted executor can find and end it."""
    pid = instance.guest.pid if instance.guest else None
    record = {"service": instance.service, "instance": instance.instance_id, "pid": pid}
    (workdir / INSTANCE_RECORD).write_bytes(orjson.dumps(record))


def clean_up_leftovers(instances_dir: Path) -> list[str]:
    """End the guests a previous executor process left behind; return their instance ids.

    An executor that restarts has lost its guests' channels, so those guests can never be driven
    again: their input stays queued in the broker and the scheduler re-places the service.
    """
    cleaned = []
    for workdir in sorted(instances_dir.iterdir()) if instances_dir.exists() else []:
        record_file = workdir / INSTANCE_RECORD
        if record_file.exists():
            record = orjson.loads(record_file.read_bytes())
            pid = record.get("pid")
            if isinstance(pid, int) and pid > 1:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            cleaned.append(str(record.get("instance", workdir.name)))
            log.warning("cleaned up instance %s left by an earlier executor", workdir.name)
        shutil.rmtree(workdir, ignore_errors=True)
    return cleaned
