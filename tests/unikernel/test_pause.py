"""A pausing checkpoint stops a procedural guest between steps until RESUME (or STOP)."""

from __future__ import annotations

import asyncio

from conftest import spawn

from services.executor.channel import FrameType


async def test_no_step_runs_between_a_pausing_checkpoint_and_resume() -> None:
    async with spawn("procedural") as g:
        await g.chan.start({"rounds": 1000, "step_delay_ms": 5})
        await asyncio.sleep(0.2)
        await g.chan.checkpoint(0, pause=True)
        before = len(g.take(FrameType.OUTPUT))
        assert before > 0
        await asyncio.sleep(0.3)
        assert g.take(FrameType.OUTPUT) == [], "a paused guest ran a step"
        ready = await g.chan.resume()
        assert ready["restored"] is False
        await asyncio.sleep(0.2)
        assert len(g.take(FrameType.OUTPUT)) > 0, "RESUME did not restart the steps"
        assert (await g.chan.stop())["code"] == 0


async def test_a_plain_checkpoint_does_not_pause() -> None:
    async with spawn("procedural") as g:
        await g.chan.start({"rounds": 1000, "step_delay_ms": 5})
        await g.chan.checkpoint(0)
        g.take(FrameType.OUTPUT)
        await asyncio.sleep(0.2)
        assert len(g.take(FrameType.OUTPUT)) > 0
