"""The operator's side of the bus: commands to the scheduler, queries to the statestore, progress.

Used by the ``ferry`` CLI, ``make demo`` and the tests, so all three drive Ferry the same way.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any

from services.common import topics
from services.common.bus import Bus, RemoteError
from services.common.config import FerryConfig
from services.common.states import FINAL_PHASES

COMMAND_TIMEOUT = 120.0
CONNECT_TIMEOUT = 3.0


class Operator:
    """An operator session: ``async with Operator(config) as ops: await ops.migrate(...)``."""

    def __init__(self, config: FerryConfig) -> None:
        self.config = config
        # An operator waits seconds, not the services' half minute, to hear the stack is down.
        self.bus = Bus(
            config.broker, f"ferry-cli-{uuid.uuid4().hex[:10]}", connect_timeout=CONNECT_TIMEOUT
        )
        self._events: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self._service_of: dict[str, str] = {}
        self._router: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Operator:
        await self.bus.__aenter__()
        await self.bus.subscribe(topics.migration_events("+"))
        self._router = asyncio.create_task(self._route_events())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._router is not None:
            self._router.cancel()
        await self.bus.close()

    async def _route_events(self) -> None:
        async for message in self.bus.messages():
            event = message.payload
            self._service_of[event["migration"]] = event["service"]
            self._events.setdefault(event["migration"], asyncio.Queue()).put_nowait(event)

    async def command(self, command: str, **args: Any) -> dict[str, Any]:
        payload = {"command": command, **{k: v for k, v in args.items() if v is not None}}
        return await self.bus.request(topics.SCHEDULER_COMMANDS, payload, COMMAND_TIMEOUT)

    async def query(self, op: str, **args: Any) -> dict[str, Any]:
        payload = {"op": op, **{k: v for k, v in args.items() if v is not None}}
        return await self.bus.request(topics.STATESTORE_QUERIES, payload, COMMAND_TIMEOUT)

    async def follow(
        self,
        migration: str,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        timeout: float = 300.0,
    ) -> dict[str, Any]:
        """Wait for a migration's final event, reporting each phase; returns the final event."""
        queue = self._events.setdefault(migration, asyncio.Queue())
        async with asyncio.timeout(timeout):
            while True:
                event = await queue.get()
                if on_event is not None:
                    on_event(event)
                if event["phase"] in FINAL_PHASES:
                    return event

    async def move(
        self,
        command: str,
        service: str,
        node: str | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """migrate / suspend / resume and wait until it is committed or rolled back."""
        started = await self.command(command, service=service, node=node)
        return await self.follow(started["migration"], on_event)

    def migrations_seen(self) -> set[str]:
        """Ids of the migrations this session has seen events of so far."""
        return set(self._events)

    async def next_migration(self, service: str, seen: set[str], timeout: float = 30.0) -> str:
        """The id of the next migration of ``service`` not in ``seen`` (e.g. mobility-caused)."""
        async with asyncio.timeout(timeout):
            while True:
                for migration, owner in self._service_of.items():
                    if owner == service and migration not in seen:
                        return migration
                await asyncio.sleep(0.05)

    async def wait_serving(self, service: str, timeout: float = 30.0) -> dict[str, Any]:
        """Poll the statestore until ``service`` serves (after deploy or a move)."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    record = await self.query("get_service", service=service)
                except RemoteError:
                    record = {}
                if record.get("status") == "serving":
                    return record
                await asyncio.sleep(0.1)
