"""The scheduler: turns operator commands and device mobility into migrations, within limits.

- One migration per service at a time (a second request is refused with ``migration_in_progress``).
- At most ``max_parallel_per_node`` migrations touch a node at once; the rest wait in FIFO order
  (``queued`` event). Slots are taken in node-name order so two migrations never deadlock.
- Mobility: a service bound to a device follows it to the node of its new cell once the device has
  stayed there for ``mobility_hysteresis`` seconds (a device bouncing between cells moves nothing).
- On start it finishes or rolls back whatever a previous scheduler process left in flight.
- Upgrade: a serving service moves (on its node or to another) into another pushed version of
  its app; refused up front when that version's manifest says it cannot restore the running
  version's state (a downgrade, say), and rolled back when its upgrade hook refuses the state.
- Recovery: a service whose instance is lost (its guest died, its executor restarted, or its node
  stayed offline longer than ``recovery_grace``) is restored on a healthy node from its latest
  durable checkpoint (a ``recover`` plan); the record's instance fences the old copy.
- Inspect: ``checkpoint_now`` has the node serving a service take a fresh checkpoint, recorded
  like a periodic one (operators may not command executors themselves).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar, cast

from services.common import contract, images, names, topics
from services.common import params as app_params
from services.common.blobstore import BlobError, BlobStore
from services.common.bus import Bus, BusError, Inbound, RemoteError, RequestTimeout, now_ms
from services.common.clients import ExecutorClient, StatestoreClient
from services.common.config import FerryConfig
from services.common.messages import (
    BindCommand,
    BindReply,
    CheckpointTakenReply,
    CordonReply,
    DeployCommand,
    DeployReply,
    DrainRefusal,
    DrainReply,
    DrainStarted,
    MigrationStarted,
    MoveCommand,
    NodeCommand,
    Purged,
    RemoveReply,
    SchedulerCommand,
    ServiceCommand,
    StopServiceReply,
)
from services.common.metrics import metrics_port
from services.common.states import Phase, ServiceStatus
from services.scheduler.liveness import Liveness
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.migration import MigrationRunner, Plan, new_migration_id, retrying

log = logging.getLogger(__name__)

VERSION = "0.1.0"


class NodeSlots:
    """Per-node limits on concurrent migrations, with a FIFO queue."""

    def __init__(self, per_node: int) -> None:
        self.per_node = per_node
        self._slots: dict[str, asyncio.Semaphore] = {}

    def _slot(self, node: str) -> asyncio.Semaphore:
        return self._slots.setdefault(node, asyncio.Semaphore(self.per_node))

    def would_wait(self, nodes: list[str]) -> bool:
        return any(self._slot(n).locked() for n in nodes)

    async def take(self, nodes: list[str]) -> Callable[[], None]:
        """Wait for a slot on each node (in name order, so two plans never deadlock); returns
        the release, which may be called early (when the target serves) and again at the end."""
        taken: list[asyncio.Semaphore] = []
        try:
            for node in sorted(set(nodes)):
                slot = self._slot(node)
                await slot.acquire()
                taken.append(slot)
        except BaseException:
            for slot in taken:
                slot.release()
            raise

        def release() -> None:
            while taken:
                taken.pop().release()

        return release


class Scheduler:
    """See the module docstring."""

    def __init__(self, config: FerryConfig, metrics_port: int | None = None) -> None:
        self.config = config
        self.metrics = SchedulerMetrics()
        self._metrics_port = metrics_port
        self.blobs = BlobStore(config.s3)
        self.slots = NodeSlots(config.scheduler.max_parallel_per_node)
        self.liveness = Liveness()
        self.nodes: dict[str, dict[str, Any]] = self.liveness.nodes
        self._offline_timers: dict[str, asyncio.Task[None]] = {}
        self._refreshing: set[str] = set()  # nodes whose full status was asked for
        self.cordons: dict[str, dict[str, Any]] = {}  # node -> its retained cordon (cordoned only)
        self.busy: dict[str, str] = {}
        self._slot_releases: dict[str, Callable[[], None]] = {}  # plan id -> its slots' release
        self._device_moves: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.bus: Bus | None = None
        self.runner: MigrationRunner | None = None
        self.store: StatestoreClient | None = None
        self.executors: ExecutorClient | None = None

    async def run(self, stop: asyncio.Event | None = None) -> None:
        offline = {"component": "scheduler", "status": "offline", "time": now_ms()}
        will = (topics.component_status("scheduler"), offline)
        async with Bus(
            self.config.broker, "ferry-scheduler", will=will, on_reconnect=self._refresh_all
        ) as bus:
            self.bus = bus
            timeout = self.config.scheduler.phase_timeout
            self.store = StatestoreClient(bus, timeout)
            self.executors = ExecutorClient(bus, timeout)
            self.runner = MigrationRunner(
                bus, self.executors, self.store, self.liveness, self.metrics, self._free_slots
            )
            port = metrics_port(self.config, "scheduler", self._metrics_port)
            self.metrics.start(self, self.config.metrics.host, port)
            for topic_filter in (
                topics.SCHEDULER_COMMANDS,
                topics.mobility("+"),
                topics.node_status("+"),
                topics.node_changes("+"),
                topics.node_cordon("+"),  # our own, retained: a restart keeps the cordons
            ):
                await bus.subscribe(topic_filter)
            self._spawn(self._recover_in_flight())
            status_topic = topics.component_status("scheduler")
            await bus.announce(  # again after every reconnect: a broker restart loses it
                status_topic,
                lambda: {
                    "component": "scheduler",
                    "status": "online",
                    "time": now_ms(),
                    "version": VERSION,
                },
            )
            serve = asyncio.create_task(self._serve(bus))
            try:
                await (stop.wait() if stop is not None else serve)
            finally:
                serve.cancel()
                self.metrics.stop()
                offline["time"] = now_ms()
                bus.withdraw(status_topic)
                with contextlib.suppress(BusError):
                    await bus.publish(topics.component_status("scheduler"), offline, retain=True)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _serve(self, bus: Bus) -> None:
        async for message in bus.messages():
            if message.topic == topics.SCHEDULER_COMMANDS:
                self._spawn(self._answer(bus, message))
            elif message.topic.startswith(f"{topics.PREFIX}/mobility/"):
                self._on_mobility(message.payload)
            elif message.topic == topics.node_cordon(message.payload["node"]):
                self._on_cordon(message.payload)
            elif message.topic == topics.node_changes(message.payload["node"]):
                self._on_node_change(message.payload)
            else:
                await self._on_node_status(message.payload)

    async def _answer(self, bus: Bus, message: Inbound) -> None:
        try:
            # The bus checked the payload against scheduler-command.schema.json.
            result = await self.execute(cast(SchedulerCommand, message.payload))
        except RemoteError as exc:
            await bus.reply(message, error=exc)
        except Exception as exc:
            log.exception("command %s failed", message.payload.get("command"))
            await bus.reply(message, error=RemoteError("internal", f"{type(exc).__name__}: {exc}"))
        else:
            await bus.reply(message, result)

    # -- commands ---------------------------------------------------------------------------

    async def execute(self, command: SchedulerCommand) -> Mapping[str, Any]:
        return await self.COMMANDS[command["command"]](self, command)

    @staticmethod
    def _move(service: str, node: str) -> MoveCommand:
        """The migrate command a drain or a device's mobility gives on the operator's behalf."""
        return MoveCommand(command="migrate", service=service, node=node)

    async def _service(self, name: str) -> dict[str, Any]:
        assert self.store is not None
        try:
            return await self.store.get_service(name)
        except RemoteError as exc:
            if exc.code == "unknown_service":
                raise RemoteError("unknown_service", f"no service named {name!r}") from None
            raise

    def _require_online(self, node: str) -> None:
        self._require_known(node)
        if self.nodes[node].get("status") != "online":
            raise RemoteError("node_offline", f"node {node} is offline")

    def _image_target(self, node: str, runtime: str) -> str:
        """Which build of an app ``runtime`` boots on ``node``, as the node advertises it
        (its executor's runtime registry); refused if the node does not offer ``runtime``."""
        status = self.nodes[node]
        if runtime not in status.get("runtimes", []):
            reason = status.get("unavailable", {}).get(runtime, "not offered")
            raise RemoteError("runtime_unavailable", f"{node} cannot run {runtime}: {reason}")
        target: str | None = status.get("image_targets", {}).get(runtime)
        if target is None:
            raise RemoteError(
                "runtime_unavailable",
                f"{node} offers {runtime} but does not say which build it boots "
                "(image_targets in its status): is its executor older than this scheduler?",
            )
        return target

    def _require_placeable(self, node: str) -> None:
        """A new instance may go to ``node``: it is online and not cordoned."""
        self._require_online(node)
        cordon = self.cordons.get(node)
        if cordon is not None:
            raise RemoteError(
                "node_cordoned",
                f"node {node} is cordoned ({cordon.get('reason') or 'no reason given'}): new "
                f"placements are kept off it; `ferry uncordon {node}` lets them back",
            )

    async def _cmd_deploy(self, command: DeployCommand) -> DeployReply:
        assert self.store is not None and self.executors is not None
        name, node = command["service"], command["node"]
        runtime = command.get("runtime", "microvm")
        self._require_placeable(node)
        epoch = 1
        try:
            existing = await self.store.get_service(name)
        except RemoteError as exc:
            if exc.code != "unknown_service":
                raise
        else:
            if existing.get("status") not in (ServiceStatus.STOPPED, ServiceStatus.FAILED):
                raise RemoteError(
                    "service_exists", f"{name} already exists ({existing.get('status')})"
                )
            epoch = int(existing["epoch"]) + 1  # a redeploy never reuses an instance id
        build = self._image_target(node, runtime)
        try:
            manifest = await images.describe(self.blobs, command["app"])
            image = await images.resolve(self.blobs, command["app"], build, manifest)
            declared = images.declared_params(manifest)
        except images.ImageNotFound as exc:
            raise RemoteError("unknown_image", str(exc)) from None
        except BlobError as exc:
            raise RemoteError("blob_unavailable", str(exc)) from None
        try:
            app_params.check(command["app"], declared, command.get("params") or {})
        except app_params.ParamError as exc:
            raise RemoteError("bad_params", str(exc)) from None
        record: dict[str, Any] = {
            "service": name,
            "app": command["app"],
            "runtime": runtime,
            "node": node,
            "instance": names.instance_id(name, epoch),
            "epoch": epoch,
            "status": ServiceStatus.DEPLOYING,
            "device": command.get("device"),
            "params": command.get("params") or {},
            "image": image.to_dict(),
            "version": images.app_version(manifest),
        }
        await self.store.put_service(record)
        try:
            started = await self.executors.start(
                node,
                service=name,
                instance=record["instance"],
                app=record["app"],
                runtime=runtime,
                image=record["image"],
                params=record["params"],
                mode="fresh",
            )
        except (RemoteError, BusError) as exc:
            await self.store.put_service({**record, "status": ServiceStatus.FAILED})
            raise RemoteError("deploy_failed", f"{name} on {node}: {exc}") from exc
        await self.store.put_service({**record, "status": ServiceStatus.SERVING})
        return {"service": name, "node": node, "instance": record["instance"], **started}

    async def _cmd_stop(self, command: ServiceCommand) -> StopServiceReply:
        assert self.store is not None and self.executors is not None
        record = await self._service(command["service"])
        self._mark_busy(record["service"], "stop")
        try:
            if record.get("node") and record.get("instance"):
                await self.executors.stop(record["node"], record["service"], record["instance"])
            await self.store.put_service(
                {**record, "status": ServiceStatus.STOPPED, "node": None, "instance": None}
            )
            purged = await self._purge(record["service"]) if command.get("purge") else {}
        finally:
            self.busy.pop(record["service"], None)
        return {"service": record["service"], "status": ServiceStatus.STOPPED, **purged}

    async def _purge(self, service: str) -> Purged:
        """Forget a stopped service now, with everything the statestore keeps of it."""
        assert self.store is not None
        done = await self.store.delete_service(service, purge=True)
        return {"purged": True, "checkpoints": done.get("checkpoints", 0)}

    async def _cmd_rm(self, command: ServiceCommand) -> RemoveReply:
        """Forget a stopped or failed service; a live one must be stopped first (its state)."""
        assert self.store is not None and self.executors is not None
        record = await self._service(command["service"])
        name, status = record["service"], record.get("status")
        if status not in (ServiceStatus.STOPPED, ServiceStatus.FAILED):
            raise RemoteError(
                "service_active", f"{name} is {status}: stop it first (`ferry stop {name}`)"
            )
        self._mark_busy(name, "rm")
        try:
            if record.get("node") and record.get("instance"):
                # A failed guest's instance may still be listed on its node: end it there too.
                with contextlib.suppress(RemoteError, BusError):
                    await self.executors.stop(record["node"], name, record["instance"])
            if command.get("purge"):
                purged = await self._purge(name)
            else:
                purged = {}
                await self.store.delete_service(name)
        finally:
            self.busy.pop(name, None)
        return {"service": name, "removed": True, **purged}

    async def _cmd_checkpoint_now(self, command: ServiceCommand) -> CheckpointTakenReply:
        """A fresh checkpoint of a serving service, taken by the node that serves it (operators
        command only the scheduler); the reply carries its blob reference.

        It does not claim the service: the executor already serialises it with a move's
        commands, and a claim would make a mobility move that arrives meanwhile fail.
        """
        assert self.executors is not None
        record = await self._service(command["service"])
        name, status = record["service"], record.get("status")
        if name in self.busy:
            raise RemoteError(
                "migration_in_progress",
                f"{name} is being moved ({self.busy[name]}): ask again once it serves",
            )
        if status != ServiceStatus.SERVING or not record.get("node") or not record.get("instance"):
            latest = (
                f"; `ferry checkpoint show {name}` shows its latest durable checkpoint"
                if status
                in (
                    ServiceStatus.SUSPENDED,
                    ServiceStatus.FAILED,
                    ServiceStatus.MIGRATING,
                    ServiceStatus.RECOVERING,
                )
                else ""
            )
            raise RemoteError(
                "not_serving", f"{name} is {status}, not serving: nothing to checkpoint{latest}"
            )
        node, instance = record["node"], record["instance"]
        self._require_online(node)
        try:
            taken = await self.executors.checkpoint_now(node, name, instance)
        except RequestTimeout:
            # Either the node is gone or the guest has not reached a step boundary: the
            # checkpoint, if it comes, is still recorded (it is one like the periodic ones).
            raise RemoteError(
                "checkpoint_timeout",
                f"{node} took no checkpoint of {name} within {self.executors.timeout:g} s "
                "(scheduler.phase_timeout): is its guest stuck in a step, or the node gone? "
                "See `ferry nodes` and `ferry watch errors`",
            ) from None
        except BusError as exc:
            raise RemoteError("node_unreachable", f"cannot reach {node}: {exc}") from exc
        return {"service": name, "node": node, **taken}

    async def _cmd_bind(self, command: BindCommand) -> BindReply:
        assert self.store is not None
        record = await self._service(command["service"])
        await self.store.put_service({**record, "device": command["device"]})
        return {"service": record["service"], "device": command["device"]}

    async def _cmd_migrate(
        self, command: MoveCommand, trigger: str = "operator"
    ) -> MigrationStarted:
        record = await self._service(command["service"])
        target = command["node"]
        if record.get("status") == ServiceStatus.FAILED:
            self._require_placeable(target)
            return await self._launch(self._recovery_plan(record, target, trigger))
        if record.get("status") != ServiceStatus.SERVING:
            raise RemoteError(
                "not_serving", f"{record['service']} is {record.get('status')}, not serving"
            )
        if record.get("node") == target:
            raise RemoteError("same_node", f"{record['service']} already runs on {target}")
        self._require_placeable(target)
        epoch = int(record["epoch"]) + 1
        plan = Plan(
            id=new_migration_id(),
            kind="migrate",
            service=record["service"],
            trigger=trigger,
            source=record["node"],
            target=target,
            source_instance=record["instance"],
            target_instance=names.instance_id(record["service"], epoch),
            epoch=epoch,
            record=_service_fields(record),
        )
        return await self._launch(plan)

    async def _cmd_upgrade(self, command: ServiceCommand) -> MigrationStarted:
        """Move a serving service into another pushed version of its app (see the docstring)."""
        record = await self._service(command["service"])
        service, app = record["service"], record["app"]
        if record.get("status") != ServiceStatus.SERVING:
            raise RemoteError("not_serving", f"{service} is {record.get('status')}, not serving")
        target = command.get("node") or record["node"]
        if target == record["node"]:
            self._require_online(target)  # in place: nothing new lands on a cordoned node
        else:
            self._require_placeable(target)
        build = self._image_target(target, record["runtime"])
        try:
            manifest = await images.describe(self.blobs, app, command.get("version"))
            image = await images.resolve(self.blobs, app, build, manifest)
        except images.ImageNotFound as exc:
            raise RemoteError("unknown_image", str(exc)) from None
        except BlobError as exc:
            raise RemoteError("blob_unavailable", str(exc)) from None
        current, wanted = record.get("version"), images.app_version(manifest)
        if image.to_dict() == record.get("image") or (current and current == wanted):
            raise RemoteError(
                "same_version",
                f"{service} already runs {app} {current or wanted or '(this image)'}: push the "
                f"new build first (`ferry image push {app}`), or name a pushed one with --version",
            )
        accepted = images.restores_from(manifest)
        if current and accepted is not None and current not in accepted:
            others = ", ".join(accepted[1:]) or "no other version"
            what = "a downgrade" if _older(wanted, current) else "an upgrade"
            raise RemoteError(
                "upgrade_refused",
                f"{app} {wanted} does not restore the state of {app} {current} ({what}; it "
                f"upgrades from: {others}); {service} keeps running {current}, nothing moved",
            )
        epoch = int(record["epoch"]) + 1
        plan = Plan(
            id=new_migration_id(),
            kind="upgrade",
            service=service,
            trigger="operator",
            source=record["node"],
            target=target,
            source_instance=record["instance"],
            target_instance=names.instance_id(service, epoch),
            epoch=epoch,
            record=_service_fields(record),
            upgrade={"image": image.to_dict(), "from_version": current, "to_version": wanted},
        )
        return {**await self._launch(plan), **plan.versions()}

    async def _cmd_suspend(self, command: ServiceCommand) -> MigrationStarted:
        record = await self._service(command["service"])
        if record.get("status") != ServiceStatus.SERVING:
            raise RemoteError(
                "not_serving", f"{record['service']} is {record.get('status')}, not serving"
            )
        plan = Plan(
            id=new_migration_id(),
            kind="suspend",
            service=record["service"],
            trigger="operator",
            source=record["node"],
            target=None,
            source_instance=record["instance"],
            target_instance=None,
            epoch=int(record["epoch"]),
            record=_service_fields(record),
        )
        return await self._launch(plan)

    async def _cmd_resume(self, command: MoveCommand) -> MigrationStarted:
        record = await self._service(command["service"])
        if record.get("status") == ServiceStatus.FAILED:
            # A failed service resumes from its latest durable checkpoint, like a recovery.
            self._require_placeable(command["node"])
            return await self._launch(self._recovery_plan(record, command["node"], "operator"))
        if record.get("status") != ServiceStatus.SUSPENDED:
            raise RemoteError(
                "not_suspended", f"{record['service']} is {record.get('status')}, not suspended"
            )
        self._require_placeable(command["node"])
        epoch = int(record["epoch"]) + 1
        plan = Plan(
            id=new_migration_id(),
            kind="resume",
            service=record["service"],
            trigger="operator",
            source=None,
            target=command["node"],
            source_instance=None,
            target_instance=names.instance_id(record["service"], epoch),
            epoch=epoch,
            record=_service_fields(record),
        )
        return await self._launch(plan)

    # -- cordon and drain -------------------------------------------------------------------

    async def _cmd_cordon(self, command: NodeCommand) -> CordonReply:
        node = command["node"]
        self._require_known(node)
        await self._set_cordon(node, command.get("reason") or "cordoned by the operator")
        return {"node": node, "cordoned": True}

    async def _cmd_uncordon(self, command: NodeCommand) -> CordonReply:
        node = command["node"]
        self._require_known(node)
        await self._set_cordon(node, None)
        return {"node": node, "cordoned": False}

    async def _cmd_drain(self, command: NodeCommand) -> DrainReply:
        """Cordon ``node``, then move every service on it to the least loaded node with room.

        Returns at once with the migrations started (each then runs like any migration, within
        the node slots) and the services that could not be moved, each with the reason.
        """
        assert self.store is not None
        node = command["node"]
        self._require_known(node)
        await self._set_cordon(node, command.get("reason") or "drained by the operator")
        on_node = [s for s in await self.store.list_services() if s.get("node") == node]
        planned: dict[str, set[str]] = {}
        migrations: list[DrainStarted] = []
        refused: list[DrainRefusal] = []
        for record in sorted(on_node, key=lambda r: str(r["service"])):
            service = record["service"]
            if record.get("status") not in (ServiceStatus.SERVING, ServiceStatus.FAILED):
                refused.append({"service": service, "error": f"it is {record.get('status')}"})
                continue
            target = self._placement(record, away_from=node, elsewhere_only=True, planned=planned)
            if target is None:
                error = f"no online, uncordoned node with room offers {record['runtime']}"
                refused.append({"service": service, "error": f"{error} ({self._loads(planned)})"})
                continue
            try:
                started = await self._cmd_migrate(self._move(service, target), "drain")
            except (RemoteError, BusError) as exc:
                refused.append({"service": service, "error": str(exc)})
                continue
            planned.setdefault(target, set()).add(service)
            migrations.append({"service": service, "target": target, **started})
        return {"node": node, "cordoned": True, "migrations": migrations, "refused": refused}

    def _loads(self, planned: dict[str, set[str]]) -> str:
        """Each node's instances/capacity as placement counts them, e.g. ``edge-b 3/3``."""
        return ", ".join(
            f"{node} {_load(status, planned.get(node, set()))}/{status.get('capacity', '?')}"
            + (" cordoned" if node in self.cordons else "")
            + ("" if status.get("status") == "online" else " offline")
            for node, status in sorted(self.liveness.nodes.items())
        )

    def _require_known(self, node: str) -> None:
        if node not in self.nodes:
            known = ", ".join(sorted(self.nodes)) or "none"
            raise RemoteError("unknown_node", f"no node named {node!r} (known: {known})")

    async def _set_cordon(self, node: str, reason: str | None) -> None:
        """Cordon (``reason`` given) or uncordon ``node``; retained, so it outlives a restart."""
        assert self.bus is not None
        doc: dict[str, Any] = {"node": node, "cordoned": reason is not None, "time": now_ms()}
        if reason is not None:
            doc["reason"] = reason
        await self.bus.publish(topics.node_cordon(node), doc, retain=True)
        self._on_cordon(doc)

    def _on_cordon(self, doc: dict[str, Any]) -> None:
        if doc["cordoned"]:
            self.cordons[doc["node"]] = doc
        else:
            self.cordons.pop(doc["node"], None)

    def _placement(
        self,
        record: dict[str, Any],
        away_from: str | None,
        elsewhere_only: bool,
        planned: dict[str, set[str]] | None = None,
    ) -> str | None:
        """Where a new instance of ``record`` goes: an online, uncordoned node that offers its
        runtime and has room (its capacity, counting the services ``planned`` onto it);
        another node than ``away_from`` first (only, if ``elsewhere_only``), least loaded first."""
        candidates = []
        for node, status in self.liveness.nodes.items():
            if status.get("status") != "online" or node in self.cordons:
                continue
            if record.get("runtime") not in status.get("runtimes", []):
                continue
            if elsewhere_only and node == away_from:
                continue
            load = _load(status, (planned or {}).get(node, set()))
            if load >= int(status.get("capacity", load + 1)):
                continue
            candidates.append((node != away_from, -load, node))
        return max(candidates)[2] if candidates else None

    def _mark_busy(self, service: str, migration: str) -> None:
        if service in self.busy:
            raise RemoteError(
                "migration_in_progress", f"{service} is already being moved ({self.busy[service]})"
            )
        self.busy[service] = migration

    async def _launch(self, plan: Plan) -> MigrationStarted:
        """Record the plan, then run it in the background; the reply names the migration."""
        assert self.runner is not None and self.store is not None
        self._mark_busy(plan.service, plan.id)
        try:
            await self.runner.plan(plan)
        except RemoteError as exc:  # refused (the service changed meanwhile): nothing written
            self.busy.pop(plan.service, None)
            raise RemoteError("not_started", f"{plan.id} not started: {exc}") from exc
        except BusError as exc:
            # Written or not, nobody can tell: undo whatever was, so it never stays open.
            self._spawn(self._abandon(plan, f"not started: {exc}"))
            raise RemoteError("not_started", f"{plan.id} not started: {exc}") from exc
        except BaseException:
            self.busy.pop(plan.service, None)
            raise
        self._spawn(self._drive(plan))
        return {"migration": plan.id, "service": plan.service, "kind": plan.kind}

    async def _drive(self, plan: Plan) -> None:
        assert self.runner is not None
        nodes = [n for n in (plan.source, plan.target) if n]
        try:
            if self.slots.would_wait(nodes):
                await self.runner.emit(plan, Phase.QUEUED)
            release = self._slot_releases[plan.id] = await self.slots.take(nodes)
            try:
                outcome = await self.runner.run(plan)
            finally:
                self._slot_releases.pop(plan.id, None)
                release()
        except Exception as exc:
            log.exception("%s: %s failed unexpectedly", plan.id, plan.kind)
            # Never leave it open: undo it (or finish it, if the target already serves).
            try:
                outcome = await self.runner.roll_back(plan, f"{type(exc).__name__}: {exc}")
            except Exception as again:
                log.exception("%s: rolling back failed too", plan.id)
                outcome = {"outcome_status": "failed"}
                with contextlib.suppress(Exception):
                    await self.runner.emit(plan, Phase.FAILED, detail={"error": str(again)})
        finally:
            self.busy.pop(plan.service, None)
        if outcome.get("outcome_status") == "failed":
            self._spawn(self._recover_later(plan.service, "its move failed and left it failed"))

    async def _abandon(self, plan: Plan, reason: str) -> None:
        """Undo a plan that may have been recorded (and its service marked) but never ran; the
        service stays busy until then. Rolling back a plan that never started only moves the
        record past its epoch and closes its migration record."""
        assert self.runner is not None
        try:
            await self.runner.roll_back(plan, reason, forward=False)
        except Exception:
            log.exception("%s: undoing a plan that never started failed", plan.id)
        finally:
            self.busy.pop(plan.service, None)

    def _free_slots(self, plan: Plan) -> None:
        """The target serves: free the plan's node slots before the commit bookkeeping."""
        release = self._slot_releases.pop(plan.id, None)
        if release is not None:
            release()

    # -- mobility and nodes -----------------------------------------------------------------

    def _on_mobility(self, event: dict[str, Any]) -> None:
        device = event["device"]
        pending = self._device_moves.pop(device, None)
        if pending is not None:
            pending.cancel()
        self._device_moves[device] = self._spawn(self._follow(device, event["node"]))

    async def _follow(self, device: str, node: str) -> None:
        """After the hysteresis delay, move every service bound to ``device`` to ``node``."""
        assert self.store is not None
        await asyncio.sleep(self.config.scheduler.mobility_hysteresis)
        self._device_moves.pop(device, None)
        for record in await self.store.list_services():
            if record.get("device") != device or record.get("node") in (node, None):
                continue
            try:
                await self._cmd_migrate(self._move(record["service"], node), "mobility")
            except RemoteError as exc:
                log.warning("mobility of %s: cannot move %s: %s", device, record["service"], exc)

    async def _on_node_status(self, status: dict[str, Any], fresh: bool = False) -> None:
        """A full status: the retained one, the will, or an answer to ``_refresh`` (``fresh``)."""
        node = status["node"]
        known = node in self.liveness.nodes
        was_online = self.liveness.online(node)
        if not self.liveness.update(status):
            return  # older than the view (a retained copy we get again on resubscribing)
        if status["status"] == "offline":
            if was_online:
                await self._report(node, f"node {node} went offline")
            if node not in self._offline_timers:
                self._offline_timers[node] = self._spawn(self._recover_node_later(node))
            return
        timer = self._offline_timers.pop(node, None)
        if timer is not None:
            timer.cancel()
        if not known and not fresh:
            # The retained status may be up to executor.status_interval old, and the changes
            # published since went by before we subscribed: ask for the present.
            self._refresh(node)
        for instance in status.get("instances", []):
            if instance["state"] in ("failed", "lost"):
                self._spawn(self._instance_lost(node, instance))

    def _on_node_change(self, change: dict[str, Any]) -> None:
        """One instance changed state: keep the view, and recover a service whose guest died."""
        if self.liveness.change(change):
            self._refresh(change["node"])
        instance = change["instance"]
        if instance["state"] in ("failed", "lost"):
            self._spawn(self._instance_lost(change["node"], instance))

    def _refresh_all(self) -> None:
        """Back on the broker: the changes published while we were away are lost to us."""
        for node in list(self.liveness.nodes):
            self._refresh(node)

    def _refresh(self, node: str) -> None:
        if node not in self._refreshing:
            self._refreshing.add(node)
            self._spawn(self._refresh_node(node))

    async def _refresh_node(self, node: str) -> None:
        """Ask an executor for its full status (its ``status`` command) and take it in."""
        assert self.executors is not None
        try:
            status = await self.executors.status(node)
            contract.validate(topics.node_status(node), status)
        except (RemoteError, BusError, contract.ContractError) as exc:
            log.info("no full status from %s yet: %s", node, exc)
            return
        finally:
            self._refreshing.discard(node)
        await self._on_node_status(status, fresh=True)

    async def _instance_lost(self, node: str, instance: dict[str, Any]) -> None:
        """A guest died, or its executor restarted without it: recover its service."""
        service = instance["service"]
        reason = instance.get("reason") or "its guest died"
        await self._recover(
            service, instance["instance"], f"{instance['instance']} on {node}: {reason}"
        )

    async def _recover_node_later(self, node: str) -> None:
        """A node that stays offline past the grace period: recover everything it served."""
        assert self.store is not None
        try:
            await asyncio.sleep(self.config.scheduler.recovery_grace)
            if self.liveness.online(node):
                return
            for record in await self.store.list_services():
                if record.get("node") == node and record.get("instance"):
                    await self._recover(
                        record["service"], record["instance"], f"node {node} is offline"
                    )
        except (RemoteError, BusError) as exc:
            log.error("cannot recover the services of %s: %s", node, exc)
        finally:
            if self._offline_timers.get(node) is asyncio.current_task():
                del self._offline_timers[node]

    async def _recover_later(self, service: str, reason: str) -> None:
        await asyncio.sleep(self.config.scheduler.recovery_grace)
        assert self.store is not None
        try:
            record = await self.store.get_service(service)
        except (RemoteError, BusError):
            return
        if record.get("status") == ServiceStatus.FAILED and record.get("instance"):
            await self._recover(service, record["instance"], reason)

    async def _recover(self, service: str, lost_instance: str, reason: str) -> None:
        """Restore ``service`` elsewhere if its record still names ``lost_instance``."""
        assert self.store is not None
        if service in self.busy:
            return  # a plan in flight decides what happens to it (it fails fast on the loss)
        try:
            record = await self.store.get_service(service)
        except (RemoteError, BusError):
            return
        if record.get("instance") != lost_instance or record.get("status") not in (
            ServiceStatus.SERVING,
            ServiceStatus.FAILED,
            ServiceStatus.RECOVERING,
        ):
            return
        target = self._recovery_target(record)
        if target is None:
            await self.store.put_service(
                {**_service_fields(record), "status": ServiceStatus.FAILED}
            )
            await self._report(
                record.get("node") or "?", f"{service}: {reason}; no node can take it over yet"
            )
            return
        await self._report(
            record.get("node") or target, f"{service}: {reason}; recovering it on {target}"
        )
        with contextlib.suppress(RemoteError):
            await self._launch(self._recovery_plan(record, target, "recovery"))

    def _recovery_target(self, record: dict[str, Any]) -> str | None:
        """Another node than the lost one if possible (see ``_placement``)."""
        return self._placement(record, away_from=record.get("node"), elsewhere_only=False)

    def _recovery_plan(self, record: dict[str, Any], target: str, trigger: str) -> Plan:
        epoch = int(record["epoch"]) + 1
        return Plan(
            id=new_migration_id(),
            kind="recover",
            service=record["service"],
            trigger=trigger,
            source=record.get("node"),
            target=target,
            source_instance=record.get("instance"),
            target_instance=names.instance_id(record["service"], epoch),
            epoch=epoch,
            record=_service_fields(record),
        )

    async def _report(self, node: str, reason: str) -> None:
        if self.bus is not None:
            await self.bus.report(topics.node_status(node), reason)

    async def _recover_in_flight(self) -> None:
        """Finish or roll back the migrations a previous scheduler left unfinished."""
        assert self.runner is not None and self.store is not None
        try:
            open_migrations = await retrying(self.store.open_migrations)
        except (RemoteError, BusError) as exc:
            log.error("cannot read unfinished migrations from the statestore: %s", exc)
            return
        for record in open_migrations:
            if not record.get("plan"):
                log.error("migration %s has no recorded plan; cannot recover it", record["id"])
                continue
            plan = Plan.from_record(record["plan"])
            phase = str(record.get("phase") or Phase.PLANNED)
            log.warning(
                "recovering %s %s of %s (left at %s)", plan.kind, plan.id, plan.service, phase
            )
            self.busy[plan.service] = plan.id
            try:
                await self.runner.recover(plan, phase)
            finally:
                self.busy.pop(plan.service, None)

    #: Every operator command, as scheduler-command.schema.json names them.
    COMMANDS: ClassVar[dict[str, Callable[[Scheduler, Any], Awaitable[Mapping[str, Any]]]]] = {
        "deploy": _cmd_deploy,
        "migrate": _cmd_migrate,
        "stop": _cmd_stop,
        "suspend": _cmd_suspend,
        "resume": _cmd_resume,
        "bind": _cmd_bind,
        "rm": _cmd_rm,
        "upgrade": _cmd_upgrade,
        "checkpoint_now": _cmd_checkpoint_now,
        "cordon": _cmd_cordon,
        "uncordon": _cmd_uncordon,
        "drain": _cmd_drain,
    }


def _load(status: dict[str, Any], planned: set[str]) -> int:
    """A node's instances, with the services planned onto it that its status does not list
    yet (a target reports its pre-booted instance as soon as it boots, or a moment later)."""
    instances = status.get("instances", [])
    return len(instances) + len(planned - {i.get("service") for i in instances})


def _older(version: str | None, than: str | None) -> bool:
    """Whether dotted ``version`` sorts before ``than`` (numbers as numbers), for the wording of
    a refusal only: which versions restore which is the app's declaration, not an order."""

    def key(v: str) -> list[tuple[int, int | str]]:
        return [(0, int(p)) if p.isdigit() else (1, p) for p in v.replace("-", ".").split(".")]

    return version is not None and than is not None and key(version) < key(than)


def _service_fields(record: dict[str, Any]) -> dict[str, Any]:
    """A service record without the fields the statestore sets itself."""
    return {k: v for k, v in record.items() if k != "time"}
