"""Declared parameters in the guest: HELLO lists them, and a getter falls back to the declared
default (not the caller's) when the parameter was not given."""

from __future__ import annotations

from conftest import drive_inputs, spawn
from test_migration import run_until_finished

from services.executor.channel import FrameType


async def test_a_declared_default_applies_when_the_param_is_absent() -> None:
    readings = [("dev-1", i + 1, {"value": v}) for i, v in enumerate([24.0, 26.0, 21.0, 40.0])]
    async with spawn("threshold") as g:
        assert [p["name"] for p in g.hello["params"]] == ["threshold"]
        await g.chan.start({})  # threshold declared as 25.0; the app passes 0 to the getter
        await drive_inputs(g, readings)
        assert [o["payload"]["value"] for o in g.take(FrameType.OUTPUT)] == [26.0, 40.0]
    async with spawn("threshold") as g:
        await g.chan.start({"threshold": 22})  # an integer serves a float64 parameter
        await drive_inputs(g, readings)
        assert [o["payload"]["value"] for o in g.take(FrameType.OUTPUT)] == [24.0, 26.0, 40.0]


async def test_procedural_runs_its_declared_number_of_rounds() -> None:
    async with spawn("procedural") as g:
        await g.chan.start({})
        await run_until_finished(g)
        rounds = {o["payload"]["round"] for o in g.take(FrameType.OUTPUT)}
        assert max(rounds) == 5  # FERRY_PARAM_I64("rounds", 5, ...)
