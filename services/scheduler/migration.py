"""Where a migration's phases are decided: the state machine of migrate, suspend and resume.

migrate:  planned → target_ready → source_paused → checkpoint_stored → target_serving
          → source_stopped → committed
suspend:  planned → source_paused → checkpoint_stored → source_stopped → committed
resume:   planned → target_ready → target_serving → committed
recover:  planned → target_ready → target_serving → committed (a lost instance is replaced from
          the service's latest durable checkpoint; without one the target starts fresh and the
          broker replays every input, none having been acknowledged)
upgrade:  the phases of migrate, to the same node or another, but the target boots the image of
          another version of the app (``Plan.upgrade``), whose upgrade hook transforms the
          restored state; the commit writes the new image and version into the service record. A
          hook that refuses fails the restore, and the source serves on, unchanged.
Any failure: rolling_back → rolled_back (the source serves again, the target is discarded).

A phase fails at once, not at its timeout, when a node it waits for goes offline (its last will)
or the instance it drives dies (``Liveness``). The commit is a compare-and-set on the service
record: a paused source that claimed its service back (nobody finished the hand-over) and a
commit cannot both win.

The source is stopped only after the target confirmed it serves. Before rolling back, the target
is asked whether it already serves: if it does, it may have applied (and acknowledged) input, so
the migration is rolled *forward* instead — discarding it would lose that input.
Every phase is an event on ``ferry/v1/migrations/{id}/events`` time-stamped by the actor that did
it; downtime is the target's ``resumed_at`` minus the source's ``paused_at``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from tenacity import AsyncRetrying, retry_if_exception, stop_before_delay, wait_exponential

from services.common import topics
from services.common.bus import Bus, BusError, RemoteError, RequestTimeout, now_ms
from services.common.clients import ExecutorClient, StatestoreClient
from services.common.messages import (
    BlobRefDoc,
    CheckpointReply,
    Claim,
    Expect,
    RestoreReply,
    Versions,
)
from services.common.states import Phase, ServiceStatus
from services.scheduler.liveness import Liveness
from services.scheduler.metrics import SchedulerMetrics

log = logging.getLogger(__name__)

#: How long an event publish, or an idempotent call made to end a migration (status, stop,
#: resume, a record), is tried again while the broker connection is down: the bus reconnects
#: meanwhile, and a broker restart must not leave a migration open or undo a committed one.
BUS_RETRY = 30.0

T = TypeVar("T")


async def retrying(make: Callable[[], Awaitable[T]], limit: float = BUS_RETRY) -> T:
    """``await make()``, again (with a growing pause) after each BusError until ``limit`` s.

    Not after a RequestTimeout: that request reached the broker and its addressee had the whole
    timeout to answer (a node killed without its will heard yet must cost one timeout, not the
    retries too).
    """
    attempts = AsyncRetrying(
        retry=retry_if_exception(
            lambda exc: isinstance(exc, BusError) and not isinstance(exc, RequestTimeout)
        ),
        wait=wait_exponential(multiplier=0.1, max=1.0),
        stop=stop_before_delay(limit),  # never sleeps past the limit
        reraise=True,
    )

    async def attempt() -> T:  # a coroutine function: tenacity would not await a lambda's result
        return await make()

    result: T = await attempts(attempt)
    return result


def new_migration_id() -> str:
    return f"m-{uuid.uuid4().hex[:12]}"


@dataclass
class Plan:
    """What a migration, suspend or resume is to do; stored so a new scheduler can finish it."""

    id: str
    kind: str
    service: str
    trigger: str
    source: str | None
    target: str | None
    source_instance: str | None
    target_instance: str | None
    epoch: int
    record: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    #: An upgrade: ``{"image", "from_version", "to_version"}``; the record keeps the old image
    #: until the commit, so a rollback leaves it as it was.
    upgrade: dict[str, Any] | None = None

    def versions(self) -> Versions:
        """An upgrade's from/to versions, for the record and the phase events."""
        if self.upgrade is None:
            return {}
        return Versions(
            from_version=self.upgrade.get("from_version"), to_version=self.upgrade.get("to_version")
        )

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Plan:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in record.items() if k in names})


class NodeLost(Exception):
    """A node a phase waited for went offline, or the instance it drove died."""


class CommitRefused(Exception):
    """The service record changed under the plan (e.g. the paused source claimed it back)."""


class MigrationFailed(Exception):
    """A phase failed; ``phase`` is the one that was under way."""

    def __init__(self, phase: str, cause: BaseException) -> None:
        super().__init__(f"{phase}: {cause}")
        self.phase = phase
        self.cause = cause


class MigrationRunner:
    """Drives plans through their phases against the executors and records every step."""

    def __init__(
        self,
        bus: Bus,
        executors: ExecutorClient,
        store: StatestoreClient,
        liveness: Liveness | None = None,
        metrics: SchedulerMetrics | None = None,
        on_serving: Callable[[Plan], None] | None = None,
    ) -> None:
        self.bus = bus
        self.executors = executors
        self.store = store
        self.liveness = liveness or Liveness()
        self.metrics = metrics
        # Called once the target serves: what is left (stop the source, commit) is bookkeeping
        # and must not hold the node slots the next migration waits for.
        self.on_serving = on_serving

    async def emit(
        self,
        plan: Plan,
        phase: str,
        actor: str | None = "scheduler",
        at: float | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        event: dict[str, Any] = {
            "migration": plan.id,
            "service": plan.service,
            "kind": plan.kind,
            "phase": phase,
            "time": int(at if at is not None else now_ms()),
            "actor": actor or "scheduler",
            "source": plan.source,
            "target": plan.target,
            "trigger": plan.trigger,
        }
        if detail:
            event["detail"] = detail
        if phase == Phase.TARGET_SERVING and self.on_serving is not None:
            self.on_serving(plan)
        if self.metrics is not None:
            self.metrics.on_event(event)
        # A repeat is harmless: the statestore keeps one event per (migration, phase, actor).
        await retrying(lambda: self.bus.publish(topics.migration_events(plan.id), event))

    async def plan(self, plan: Plan) -> None:
        """Record the plan before anything moves (a restarted scheduler reads it back).

        A move of a serving service (migrate, suspend, upgrade) marks it migrating in the same
        write, compare-and-set on its instance and status: the plan and the mark are one fact,
        written once (both or neither; a RemoteError means neither)."""
        marked: dict[str, Any] | None = None
        expect: Expect | None = None
        if plan.kind in ("migrate", "suspend", "upgrade"):
            marked = {**plan.record, "status": ServiceStatus.MIGRATING}
            expect = Expect(instance=plan.source_instance, status=ServiceStatus.SERVING)
        await self.store.put_migration(
            {
                "id": plan.id,
                "service": plan.service,
                "kind": plan.kind,
                "trigger": plan.trigger,
                "source": plan.source,
                "target": plan.target,
                "plan": plan.to_record(),
                **plan.versions(),
            },
            service_record=marked,
            expect=expect,
        )
        await self.emit(plan, Phase.PLANNED, detail=plan.versions() or None)

    # -- the three flows --------------------------------------------------------------------

    async def run(self, plan: Plan) -> dict[str, Any]:
        """Carry out a planned migration/suspend/resume; returns the final event's detail."""
        flow = {
            "migrate": self._migrate,
            "suspend": self._suspend,
            "resume": self._resume,
            "recover": self._recover,
            "upgrade": self._migrate,
        }
        try:
            return await flow[plan.kind](plan)
        except MigrationFailed as failure:
            log.warning("%s %s of %s failed: %s", plan.kind, plan.id, plan.service, failure)
            if self.metrics is not None:
                self.metrics.on_phase_failed(plan.kind, failure.phase)
            forward = not isinstance(failure.cause, CommitRefused)
            return await self.roll_back(
                plan, f"{failure.phase} failed: {failure.cause}", forward=forward
            )

    async def _step(
        self, phase: str, coro: Awaitable[T], watch: tuple[str | None, str | None] | None = None
    ) -> T:
        """Await one phase; fail it at once if the node (or instance) it waits for is lost."""
        task = asyncio.ensure_future(coro)
        lost: asyncio.Future[str] | None = None
        if watch is not None and watch[0]:
            lost = asyncio.ensure_future(self.liveness.gone(watch[0], watch[1]))
        try:
            waited: set[asyncio.Future[Any]] = {task} if lost is None else {task, lost}
            await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                assert lost is not None
                task.cancel()
                raise MigrationFailed(phase, NodeLost(lost.result()))
            result = task.result()
        except (RemoteError, BusError) as exc:
            raise MigrationFailed(phase, exc) from exc
        finally:
            if lost is not None:
                lost.cancel()
        return result

    async def _preboot(self, plan: Plan) -> None:
        assert plan.target and plan.target_instance
        service = plan.record
        image = plan.upgrade["image"] if plan.upgrade else service["image"]
        ready = await self._step(
            "target pre-boot",
            self.executors.start(
                plan.target,
                service=plan.service,
                instance=plan.target_instance,
                app=service["app"],
                runtime=service["runtime"],
                image=image,
                params=service.get("params") or {},
                mode="wait",
                migration=plan.id,
            ),
            (plan.target, None),
        )
        await self.emit(plan, Phase.TARGET_READY, plan.target, detail=ready.get("timings"))

    async def _checkpoint(self, plan: Plan, stop_after: bool) -> CheckpointReply:
        assert plan.source and plan.source_instance
        return await self._step(
            "checkpoint",
            self.executors.checkpoint(
                plan.source,
                service=plan.service,
                instance=plan.source_instance,
                migration=plan.id,
                stop_after=stop_after,
            ),
            (plan.source, plan.source_instance),
        )

    async def _record_checkpoint(self, plan: Plan, checkpoint: CheckpointReply) -> None:
        """The phase events, off the critical path of the restore (the source executor records
        the checkpoint itself, before it acknowledges the input the checkpoint covers)."""
        assert plan.source
        ref = checkpoint["checkpoint"]
        await self.emit(plan, Phase.SOURCE_PAUSED, plan.source, at=checkpoint["paused_at"])
        await self.emit(
            plan,
            Phase.CHECKPOINT_STORED,
            plan.source,
            detail={"bytes": ref["size"], "key": ref["key"], **checkpoint.get("timings", {})},
        )

    async def _restore(self, plan: Plan, ref: BlobRefDoc) -> RestoreReply:
        """Have the target restore ``ref``, claim the service and serve (its reply says when
        input flowed again).

        The claim is the commit's compare-and-set, done by the target before it forwards any
        input: it loses to a rollback or to a source that claimed its service back (both move
        the record first), so a late target never serves beside the source.
        """
        assert plan.target and plan.target_instance
        restored = await self._step(
            "restore",
            self.executors.restore(
                plan.target,
                service=plan.service,
                instance=plan.target_instance,
                checkpoint=ref,
                migration=plan.id,
                claim=self._claim(plan),
            ),
            (plan.target, plan.target_instance),
        )
        return restored

    async def _announce_serving(self, plan: Plan, restored: RestoreReply) -> None:
        at = restored["resumed_at"]
        await self.emit(plan, Phase.TARGET_SERVING, plan.target, at=at, detail=restored["timings"])

    async def _migrate(self, plan: Plan) -> dict[str, Any]:
        assert plan.source and plan.target
        await self._preboot(plan)
        checkpoint = await self._checkpoint(plan, stop_after=False)
        # Downtime runs from here: restore first, bookkeeping alongside it.
        restored, _ = await asyncio.gather(
            self._restore(plan, checkpoint["checkpoint"]),
            self._record_checkpoint(plan, checkpoint),
        )
        await self._announce_serving(plan, restored)
        detail = {
            "downtime_ms": round(restored["resumed_at"] - checkpoint["paused_at"], 3),
            "bytes_moved": checkpoint["checkpoint"]["size"],
        }
        return await self._commit(plan, detail, claimed=bool(restored.get("claimed")))

    async def _suspend(self, plan: Plan) -> dict[str, Any]:
        checkpoint = await self._checkpoint(plan, stop_after=True)
        await self._record_checkpoint(plan, checkpoint)
        await self.emit(plan, Phase.SOURCE_STOPPED, plan.source)
        await self.store.put_service(
            {**plan.record, "node": None, "instance": None, "status": ServiceStatus.SUSPENDED}
        )
        detail = {"bytes_moved": checkpoint["checkpoint"]["size"]}
        await self.emit(plan, Phase.COMMITTED, detail={**detail, "total_ms": self._total_ms(plan)})
        return detail

    async def _resume(self, plan: Plan) -> dict[str, Any]:
        latest = await self.store.latest_checkpoint(plan.service)
        if latest is None:
            raise MigrationFailed("resume", LookupError(f"{plan.service} has no checkpoint"))
        await self._preboot(plan)
        restored = await self._restore(plan, latest)
        await self._announce_serving(plan, restored)
        return await self._commit(
            plan, {"bytes_moved": latest["size"]}, claimed=bool(restored.get("claimed"))
        )

    async def _recover(self, plan: Plan) -> dict[str, Any]:
        """Replace a lost instance from the latest durable checkpoint (or fresh: see above)."""
        assert plan.target and plan.target_instance
        latest = await self._step("recover", self._latest_or_none(plan.service))
        if latest.get("checkpoint") is None:
            service = plan.record
            started = await self._step(
                "fresh start",
                self.executors.start(
                    plan.target,
                    service=plan.service,
                    instance=plan.target_instance,
                    app=service["app"],
                    runtime=service["runtime"],
                    image=service["image"],
                    params=service.get("params") or {},
                    mode="fresh",
                    migration=plan.id,
                    claim=self._claim(plan),
                ),
                (plan.target, None),
            )
            await self.emit(plan, Phase.TARGET_READY, plan.target, detail=started.get("timings"))
            await self.emit(plan, Phase.TARGET_SERVING, plan.target)
            return await self._commit(
                plan,
                {"bytes_moved": 0, "from_checkpoint": None},
                claimed=bool(started.get("claimed")),
            )
        checkpoint = latest["checkpoint"]
        await self._preboot(plan)
        restored = await self._restore(plan, checkpoint)
        await self._announce_serving(plan, restored)
        return await self._commit(
            plan,
            {"bytes_moved": checkpoint["size"], "from_checkpoint": checkpoint["key"]},
            claimed=bool(restored.get("claimed")),
        )

    async def _latest_or_none(self, service: str) -> dict[str, Any]:
        return {"checkpoint": await self.store.latest_checkpoint(service)}

    def _commit_expects(self, plan: Plan) -> Expect:
        """What the service record must still say for this plan's commit to win."""
        if plan.kind in ("migrate", "upgrade"):
            return {"instance": plan.source_instance, "status": ServiceStatus.MIGRATING}
        if plan.kind == "recover":
            return {"instance": plan.source_instance}
        return {"status": plan.record.get("status", ServiceStatus.SUSPENDED)}

    def _claim(self, plan: Plan) -> Claim:
        """The commit, for the target to make before it forwards input: the record naming it,
        and the commit's expectations plus the epoch the plan started from, which a rollback
        moves past (``_fence``): the one field every kind of plan can be fenced on."""
        return {
            "record": self._committed_record(plan),
            "expect": {**self._commit_expects(plan), "epoch": int(plan.record["epoch"])},
        }

    def _committed_record(self, plan: Plan) -> dict[str, Any]:
        """The service record once the target serves."""
        upgraded = {}
        if plan.upgrade is not None:
            upgraded = {"image": plan.upgrade["image"], "version": plan.upgrade["to_version"]}
        return {
            **plan.record,
            **upgraded,
            "node": plan.target,
            "instance": plan.target_instance,
            "epoch": plan.epoch,
            "status": ServiceStatus.SERVING,
        }

    async def _commit(
        self, plan: Plan, detail: dict[str, Any], claimed: bool = False
    ) -> dict[str, Any]:
        """The target serves: record it (unless its claim already did), then (only then) stop
        the source for good."""
        if plan.upgrade is not None:
            detail.update(plan.versions())
        try:
            if not claimed:
                await self.store.put_service(
                    self._committed_record(plan), expect=self._commit_expects(plan)
                )
        except RemoteError as exc:
            if exc.code != "conflict":
                raise MigrationFailed("commit", exc) from exc
            if not await self._already_committed(plan):
                raise MigrationFailed("commit", CommitRefused(exc.message)) from exc
        except BusError as exc:
            raise MigrationFailed("commit", exc) from exc
        if plan.source and plan.source_instance and self._gone(plan.source):
            # A recovery from a node that is gone: nobody to tell. If it comes back, its copy
            # finds the record naming another instance and stops itself (fenced).
            detail["source_stop_error"] = f"node {plan.source} is offline"
        elif plan.source and plan.source_instance:
            source, instance = plan.source, plan.source_instance
            try:
                await retrying(lambda: self.executors.stop(source, plan.service, instance))
                await self.emit(plan, Phase.SOURCE_STOPPED, plan.source)
            except (RemoteError, BusError) as exc:
                # The target serves and owns the input session; a source we cannot reach holds
                # nothing that matters. Note it in the record rather than undo a good migration.
                detail["source_stop_error"] = str(exc)
        detail["total_ms"] = self._total_ms(plan)
        await self.emit(plan, Phase.COMMITTED, detail=detail)
        return detail

    # -- failure ----------------------------------------------------------------------------

    async def target_serving(self, plan: Plan) -> bool:
        """Does the target already run this plan's instance with input flowing?"""
        target = plan.target
        if not target or not plan.target_instance or self._gone(target):
            return False
        try:
            # Not knowing is not "no": rolling back a target that serves loses what it applied.
            status = await retrying(lambda: self.executors.status(target))
        except (RemoteError, BusError):
            return False
        return any(
            i["instance"] == plan.target_instance and i["state"] == "serving"
            for i in status.get("instances", [])
        )

    async def roll_back(self, plan: Plan, reason: str, forward: bool = True) -> dict[str, Any]:
        """Undo a failed plan so the source serves again; or finish it if the target serves.

        The record is moved first (``_fence``): a target still restoring then loses its claim
        and stops itself, so the source resumed next never serves beside it.
        """
        if plan.kind != "suspend" and await self._already_committed(plan):
            # The commit was recorded and a later step failed (e.g. its event, in a broker
            # restart): undoing it now would leave the record naming a target we stopped.
            log.warning("%s: already committed; finishing the commit", plan.id)
            return await self._commit(plan, {"finished_after": reason}, claimed=True)
        if forward and plan.kind != "suspend" and await self.target_serving(plan):
            log.warning("%s: target already serving; rolling forward", plan.id)
            return await self._commit(plan, {"rolled_forward": reason})
        await self.emit(plan, Phase.ROLLING_BACK, detail={"error": reason})
        notes: dict[str, Any] = {"error": reason, **plan.versions()}
        status = self._status_after_rollback(plan)
        resumes = bool(plan.source and plan.source_instance and plan.kind != "recover")
        if resumes and plan.source and self._gone(plan.source):
            notes["source_resume_error"] = f"node {plan.source} is offline"
            status = ServiceStatus.FAILED  # and the scheduler recovers it from its checkpoint
            resumes = False
        written: ServiceStatus | None = None  # what the record says now, if we wrote it
        if plan.kind != "suspend":
            fenced = await self._fence(plan, status, notes)
            if fenced is None:
                log.warning("%s: the target claimed the service first; finishing", plan.id)
                return await self._commit(plan, {"finished_after": reason}, claimed=True)
            if fenced:
                written = status
            else:
                resumes = False
        if plan.target and plan.target_instance and self._gone(plan.target):
            # Nobody to tell; a restarted executor ends what it ran (reported lost), and a copy
            # that comes back finds the record naming another instance (fenced).
            notes["target_stop_error"] = f"node {plan.target} is offline"
        elif plan.target and plan.target_instance:
            target, instance = plan.target, plan.target_instance
            try:
                await retrying(lambda: self.executors.stop(target, plan.service, instance))
            except (RemoteError, BusError) as exc:
                notes["target_stop_error"] = str(exc)
        if resumes and plan.source and plan.source_instance:
            source, instance = plan.source, plan.source_instance
            try:
                await retrying(lambda: self.executors.resume(source, plan.service, instance))
            except (RemoteError, BusError) as exc:
                notes["source_resume_error"] = str(exc)
                status = ServiceStatus.FAILED
        if status != written:
            with contextlib.suppress(RemoteError, BusError):
                # Only while the record still names the source: a source that claimed its
                # service back on its own has already written what is true.
                await retrying(lambda: self._put_rolled_back(plan, status))
        notes["outcome_status"] = status
        notes["total_ms"] = self._total_ms(plan)
        await self.emit(plan, Phase.ROLLED_BACK, detail=notes)
        return notes

    @staticmethod
    def _status_after_rollback(plan: Plan) -> ServiceStatus:
        if plan.kind == "resume":
            return ServiceStatus(plan.record.get("status") or ServiceStatus.SUSPENDED)
        if plan.kind == "recover":
            return ServiceStatus.FAILED
        return ServiceStatus.SERVING

    async def _put_rolled_back(self, plan: Plan, status: ServiceStatus) -> None:
        """The record as the rollback leaves it, past the plan's epoch (fence) for every kind
        with a target, and only while it still names the source."""
        epoch = plan.epoch if plan.kind != "suspend" else int(plan.record["epoch"])
        await self.store.put_service(
            {**plan.record, "status": status, "epoch": epoch},
            expect={"instance": plan.record.get("instance")},
        )

    async def _fence(self, plan: Plan, status: ServiceStatus, notes: dict[str, Any]) -> bool | None:
        """Move the record past the plan's epoch, so the target's claim (which expects that
        epoch) can no longer win. True: fenced; None: the target had claimed the service
        already (finish the plan instead); False: the record could not be moved (statestore
        unreachable, or someone else owns it): the source must not be resumed from here; it
        serves again on its own once it claims its service back (``pause_timeout``)."""
        try:
            await retrying(
                lambda: self.store.put_service(
                    {**plan.record, "status": status, "epoch": plan.epoch},
                    expect={
                        "instance": plan.record.get("instance"),
                        "epoch": int(plan.record["epoch"]),
                    },
                )
            )
            return True
        except RemoteError as exc:
            if await self._already_committed(plan):
                return None
            notes["fence_error"] = str(exc)
        except BusError as exc:
            notes["fence_error"] = f"statestore unreachable: {exc}"
        log.warning("%s: rollback not fenced: %s", plan.id, notes["fence_error"])
        return False

    async def recover(self, plan: Plan, phase: str) -> dict[str, Any]:
        """Finish or undo a plan a previous scheduler process left at ``phase``."""
        reason = f"scheduler restarted during phase {phase}"
        if plan.kind == "suspend" and phase in (Phase.CHECKPOINT_STORED, Phase.SOURCE_STOPPED):
            with contextlib.suppress(RemoteError, BusError):
                assert plan.source and plan.source_instance
                await self.executors.stop(plan.source, plan.service, plan.source_instance)
            await self.store.put_service(
                {**plan.record, "node": None, "instance": None, "status": ServiceStatus.SUSPENDED}
            )
            await self.emit(plan, Phase.COMMITTED, detail={"recovered": reason})
            return {"recovered": reason}
        try:
            return await self.roll_back(plan, reason)
        except MigrationFailed as failure:  # rolling forward was refused: undo it instead
            return await self.roll_back(plan, f"{reason}; {failure}", forward=False)

    async def _already_committed(self, plan: Plan) -> bool:
        """A commit refused because it already happened (its reply was lost, or a scheduler
        died right after it): the record names this plan's target instance."""
        if not plan.target_instance:
            return False
        try:
            record = await retrying(lambda: self.store.get_service(plan.service))
        except (RemoteError, BusError):
            return False
        return bool(record.get("instance") == plan.target_instance)

    def _gone(self, node: str) -> bool:
        """Known to be offline (its last will): asking it anything would only wait out a timeout."""
        return node in self.liveness.nodes and not self.liveness.online(node)

    @staticmethod
    def _total_ms(plan: Plan) -> float:
        return round((time.time() - plan.started) * 1000, 3)
