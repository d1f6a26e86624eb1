"""Typed request helpers for executors and the statestore: the scheduler and executors use them."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from services.common import topics
from services.common.bus import Bus, RemoteError
from services.common.messages import (
    BlobRefDoc,
    CheckpointCommand,
    CheckpointNowReply,
    CheckpointReply,
    Claim,
    ExecutorCommand,
    Expect,
    InstanceCommand,
    ListRequest,
    RecordRequest,
    RestoreCommand,
    RestoreReply,
    ResumeReply,
    ServiceRequest,
    StartCommand,
    StartReply,
    StatestoreRequest,
    StatusCommand,
    StopReply,
)


def new_request_id() -> str:
    return uuid.uuid4().hex


class ExecutorClient:
    """Commands to the executor of one node; a retry reuses its request id (idempotent).

    One method per command of executor-command.schema.json, each building its typed command
    (``services.common.messages``) and returning its typed reply.
    """

    def __init__(self, bus: Bus, timeout: float) -> None:
        self.bus = bus
        self.timeout = timeout

    async def _send(self, node: str, command: ExecutorCommand) -> Any:
        return await self.bus.request(topics.node_commands(node), dict(command), self.timeout)

    async def start(
        self,
        node: str,
        *,
        service: str,
        instance: str,
        app: str,
        runtime: str,
        image: BlobRefDoc,
        params: dict[str, Any],
        mode: Literal["fresh", "wait"],
        migration: str | None = None,
        claim: Claim | None = None,
    ) -> StartReply:
        command = StartCommand(
            command="start",
            request_id=new_request_id(),
            service=service,
            instance=instance,
            app=app,
            runtime=runtime,
            image=image,
            params=params,
            mode=mode,
        )
        if migration is not None:
            command["migration"] = migration
        if claim is not None:
            command["claim"] = claim
        reply: StartReply = await self._send(node, command)
        return reply

    async def checkpoint(
        self, node: str, *, service: str, instance: str, migration: str, stop_after: bool
    ) -> CheckpointReply:
        """Capture for a move (the instance pauses; with ``stop_after`` it then stops)."""
        command = CheckpointCommand(
            command="checkpoint",
            request_id=new_request_id(),
            service=service,
            instance=instance,
            migration=migration,
            stop_after=stop_after,
        )
        reply: CheckpointReply = await self._send(node, command)
        return reply

    async def checkpoint_now(self, node: str, service: str, instance: str) -> CheckpointNowReply:
        """A fresh durable checkpoint of a serving instance (it does not pause)."""
        command = CheckpointCommand(
            command="checkpoint_now",
            request_id=new_request_id(),
            service=service,
            instance=instance,
        )
        reply: CheckpointNowReply = await self._send(node, command)
        return reply

    async def restore(
        self,
        node: str,
        *,
        service: str,
        instance: str,
        checkpoint: BlobRefDoc,
        migration: str,
        claim: Claim,
    ) -> RestoreReply:
        command = RestoreCommand(
            command="restore",
            request_id=new_request_id(),
            service=service,
            instance=instance,
            checkpoint=checkpoint,
            migration=migration,
            claim=claim,
        )
        reply: RestoreReply = await self._send(node, command)
        return reply

    async def resume(self, node: str, service: str, instance: str) -> ResumeReply:
        command = InstanceCommand(
            command="resume", request_id=new_request_id(), service=service, instance=instance
        )
        reply: ResumeReply = await self._send(node, command)
        return reply

    async def stop(self, node: str, service: str, instance: str) -> StopReply:
        command = InstanceCommand(
            command="stop", request_id=new_request_id(), service=service, instance=instance
        )
        reply: StopReply = await self._send(node, command)
        return reply

    async def status(self, node: str) -> dict[str, Any]:
        """The node's full status (node-status.schema.json), now."""
        command = StatusCommand(command="status", request_id=new_request_id())
        reply: dict[str, Any] = await self._send(node, command)
        return reply


class StatestoreClient:
    """Queries and updates of the registry: one method per op of statestore-request.schema.json
    that a component uses, each building its typed request (``services.common.messages``)."""

    def __init__(self, bus: Bus, timeout: float) -> None:
        self.bus = bus
        self.timeout = timeout

    async def _send(self, request: StatestoreRequest) -> Any:
        return await self.bus.request(topics.STATESTORE_REQUESTS, dict(request), self.timeout)

    async def get_service(self, service: str) -> dict[str, Any]:
        record: dict[str, Any] = await self._send(ServiceRequest(op="get_service", service=service))
        return record

    async def list_services(self) -> list[dict[str, Any]]:
        services: list[dict[str, Any]] = (await self._send(ListRequest(op="list_services")))[
            "services"
        ]
        return services

    async def put_service(self, record: dict[str, Any], expect: Expect | None = None) -> None:
        """Store a service record; with ``expect``, only if the stored one still matches."""
        request = RecordRequest(op="put_service", record=record)
        if expect is not None:
            request["expect"] = expect
        await self._send(request)

    async def delete_service(self, service: str, purge: bool = False) -> dict[str, Any]:
        """Forget a service; with ``purge``, its checkpoints and input session now, too."""
        request = ServiceRequest(op="delete_service", service=service)
        if purge:
            request["purge"] = True
        done: dict[str, Any] = await self._send(request)
        return done

    async def record_checkpoint(self, record: dict[str, Any]) -> None:
        await self._send(RecordRequest(op="record_checkpoint", record=record))

    async def latest_checkpoint(self, service: str) -> BlobRefDoc | None:
        """The newest checkpoint's blob reference, or None if the service has none."""
        try:
            latest = await self._send(ServiceRequest(op="latest_checkpoint", service=service))
        except RemoteError as exc:
            if exc.code == "no_checkpoint":
                return None
            raise
        checkpoint: BlobRefDoc = latest["checkpoint"]
        return checkpoint

    async def put_migration(
        self,
        record: dict[str, Any],
        service_record: dict[str, Any] | None = None,
        expect: Expect | None = None,
    ) -> None:
        """Record a migration; with ``service_record``, store that in the same write,
        compare-and-set by ``expect`` (both or neither)."""
        request = RecordRequest(op="put_migration", record=record)
        if service_record is not None:
            request["service_record"] = service_record
            if expect is not None:
                request["expect"] = expect
        await self._send(request)

    async def open_migrations(self) -> list[dict[str, Any]]:
        migrations: list[dict[str, Any]] = (await self._send(ListRequest(op="open_migrations")))[
            "migrations"
        ]
        return migrations
