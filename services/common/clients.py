"""Typed request helpers for executors and the statestore: the scheduler and executors use them."""

from __future__ import annotations

import uuid
from typing import Any

from services.common import topics
from services.common.bus import Bus, RemoteError


def new_request_id() -> str:
    return uuid.uuid4().hex


class ExecutorClient:
    """Commands to the executor of one node; a retry reuses its request id (idempotent)."""

    def __init__(self, bus: Bus, timeout: float) -> None:
        self.bus = bus
        self.timeout = timeout

    async def call(self, node: str, command: str, **args: Any) -> dict[str, Any]:
        payload = {"command": command, "request_id": new_request_id(), **args}
        return await self.bus.request(topics.node_commands(node), payload, self.timeout)

    async def start(self, node: str, **args: Any) -> dict[str, Any]:
        return await self.call(node, "start", **args)

    async def checkpoint(self, node: str, **args: Any) -> dict[str, Any]:
        return await self.call(node, "checkpoint", **args)

    async def restore(self, node: str, **args: Any) -> dict[str, Any]:
        return await self.call(node, "restore", **args)

    async def resume(self, node: str, service: str, instance: str) -> dict[str, Any]:
        return await self.call(node, "resume", service=service, instance=instance)

    async def stop(self, node: str, service: str, instance: str) -> dict[str, Any]:
        return await self.call(node, "stop", service=service, instance=instance)


class StatestoreClient:
    """Queries and updates of the registry (ops of statestore-request.schema.json)."""

    def __init__(self, bus: Bus, timeout: float) -> None:
        self.bus = bus
        self.timeout = timeout

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        return await self.bus.request(topics.STATESTORE_REQUESTS, {"op": op, **args}, self.timeout)

    async def get_service(self, service: str) -> dict[str, Any]:
        return await self.call("get_service", service=service)

    async def list_services(self) -> list[dict[str, Any]]:
        services: list[dict[str, Any]] = (await self.call("list_services"))["services"]
        return services

    async def put_service(
        self, record: dict[str, Any], expect: dict[str, Any] | None = None
    ) -> None:
        """Store a service record; with ``expect``, only if the stored one still matches."""
        if expect is None:
            await self.call("put_service", record=record)
        else:
            await self.call("put_service", record=record, expect=expect)

    async def record_checkpoint(self, record: dict[str, Any]) -> None:
        await self.call("record_checkpoint", record=record)

    async def latest_checkpoint(self, service: str) -> dict[str, Any] | None:
        """The newest checkpoint's blob reference, or None if the service has none."""
        try:
            latest = await self.call("latest_checkpoint", service=service)
        except RemoteError as exc:
            if exc.code == "no_checkpoint":
                return None
            raise
        checkpoint: dict[str, Any] = latest["checkpoint"]
        return checkpoint

    async def put_migration(self, record: dict[str, Any]) -> None:
        await self.call("put_migration", record=record)

    async def open_migrations(self) -> list[dict[str, Any]]:
        migrations: list[dict[str, Any]] = (await self.call("open_migrations"))["migrations"]
        return migrations
