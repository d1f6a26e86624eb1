"""A stop ends the periodic checkpoint loop even when the statestore's reply to its last
``record_checkpoint`` lands in the same event-loop step as the stop's cancel.

Found by ``bench.drain``: under Python 3.11 ``asyncio.wait_for`` (what ``Bus.request`` awaits)
returns a result that arrived together with a cancel instead of raising ``CancelledError``; the
loop then went on checkpointing and ``ferry stop`` hung until the executor exited (2 of 100
services in one drain run). Real guest (the unix ``counter``), real broker session; the Keeper
is this test's, so it can hand the reply over at exactly that moment.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from services.common import topics
from services.common.blobstore import BlobRef
from services.common.bus import Bus
from services.common.config import FerryConfig
from services.executor.capture import Capture
from services.executor.instance import CheckpointPolicy, Instance
from services.executor.runtime import LaunchSpec
from services.executor.runtimes.unix import UnixRuntime

pytestmark = pytest.mark.asyncio(loop_scope="session")


class RacingKeeper:
    """Stores nothing; ``record`` waits for its "reply" the way ``Bus.request`` does."""

    def __init__(self) -> None:
        self.recording = asyncio.Event()
        self.reply: asyncio.Future[None] | None = None

    async def upload(self, instance: Instance, capture: Capture, migration: str | None) -> BlobRef:
        return BlobRef(
            "ferry", f"test/{instance.instance_id}.json", "0" * 64, len(capture.document)
        )

    async def record(
        self,
        instance: Instance,
        ref: BlobRef,
        watermark: dict[str, int],
        taken_at: float,
        migration: str | None,
    ) -> None:
        self.reply = asyncio.get_running_loop().create_future()
        self.recording.set()
        await asyncio.wait_for(self.reply, 10.0)


async def test_a_cancel_that_meets_the_statestore_reply_still_ends_the_checkpoint_loop(
    infra: FerryConfig, unikernel_builds: Path, tmp_path: Path
) -> None:
    service = f"cancel-{uuid.uuid4().hex[:6]}"
    image = unikernel_builds / "unix" / "counter"
    keeper = RacingKeeper()
    async with Bus(infra.broker, f"test-node-{uuid.uuid4().hex[:6]}") as node_bus:
        instance = Instance(
            node="edge-t",
            service=service,
            instance_id=f"{service}.1",
            app="counter",
            runtime=UnixRuntime(),
            spec=LaunchSpec(service, f"{service}.1", "counter", image, tmp_path),
            broker=infra.broker,
            node_bus=node_bus,
            keeper=keeper,
            policy=CheckpointPolicy(interval=0.05, inputs=0),
            max_input_bytes=1 << 20,
        )
        try:
            await instance.boot(fresh=True)
            await instance.start_fresh({})
            body: dict[str, Any] = {"producer": "p", "seq": 1, "data": {"device": "p", "value": 1}}
            await node_bus.publish(topics.app_input(service), body)
            await asyncio.wait_for(keeper.recording.wait(), 10.0)
            loop_task = instance._durable_task
            assert loop_task is not None and keeper.reply is not None
            keeper.reply.set_result(None)  # the reply arrives ...
            loop_task.cancel()  # ... in the same step as the stop's cancel
            done, _ = await asyncio.wait({loop_task}, timeout=3.0)
            assert loop_task in done, "the checkpoint loop survived its cancel"
            assert loop_task.cancelled()
        finally:
            await instance.stop()
