"""Checkpoint mid-run, restore in a fresh process, finish: same outputs and state as one run."""

from __future__ import annotations

import asyncio
import random
import struct
from typing import Any

import orjson
import pytest
from conftest import Guest, spawn

from services.executor.channel import FrameType

Inputs = list[tuple[str, int, dict[str, Any]]]


def sensor_inputs(n: int, sources: int, seed: int) -> Inputs:
    """Deterministic readings from a few producers, each with its own seq."""
    rng = random.Random(seed)
    seqs = [0] * sources
    out: Inputs = []
    for _ in range(n):
        s = rng.randrange(sources)
        seqs[s] += 1
        value = round(rng.uniform(-20.0, 140.0), rng.randrange(0, 6))
        out.append((f"dev{s}", seqs[s], {"device": f"dev{s}", "sensor": f"s{s}", "value": value}))
    return out


def state_of(doc: bytes) -> dict[str, Any]:
    """The parts of a checkpoint that must match between runs."""
    d = orjson.loads(doc)
    return {k: d[k] for k in ("app", "mode", "next_step", "params", "vars", "watermark")}


async def feed(g: Guest, inputs: Inputs) -> bytes:
    for source, seq, payload in inputs:
        g.chan.send_input(source, seq, payload)
    return await asyncio.wait_for(g.chan.checkpoint(1), 30)


EVENT_APPS = [
    ("counter", {}),
    ("aggregator", {"window": 8, "threshold": 70.5}),
    ("threshold", {"threshold": 60.0}),  # answers only readings above 60
]


@pytest.mark.parametrize(("app", "params"), EVENT_APPS)
async def test_event_app_migrates_losslessly(app: str, params: dict[str, Any]) -> None:
    inputs = sensor_inputs(300, 4, seed=7)
    k = 137

    async with spawn(app) as g:
        await g.chan.start(params)
        reference_doc = await feed(g, inputs)
        reference_out = g.take(FrameType.OUTPUT)
        if app == "threshold":
            assert 0 < len(reference_out) < len(inputs)
        else:
            assert len(reference_out) == len(inputs)
        assert all(d["applied"] for d in g.take(FrameType.DONE))

    async with spawn(app) as g:
        await g.chan.start(params)
        doc = await feed(g, inputs[:k])
        first_out = g.take(FrameType.OUTPUT)
        assert (await g.chan.stop())["code"] == 0
        assert await g.wait() == 0

    async with spawn(app) as g:
        ready = await g.chan.restore(doc)
        assert ready == {"step": "input", "restored": True}
        # Redeliver the last 20 applied inputs first, as a broker would.
        final_doc = await feed(g, inputs[k - 20 :])
        rest_out = g.take(FrameType.OUTPUT)
        done = g.take(FrameType.DONE)

    assert [d["applied"] for d in done] == [False] * 20 + [True] * (len(inputs) - k)
    assert first_out + rest_out == reference_out
    assert state_of(final_doc) == state_of(reference_doc)


async def test_replayed_inputs_are_dropped_not_reapplied() -> None:
    async with spawn("counter") as g:
        await g.chan.start({})
        inputs = [
            ("a", 1, {"value": 1}),
            ("a", 2, {"value": 2}),
            ("a", 2, {"value": 99}),
            ("a", 1, {"value": 99}),
            ("b", 1, {"value": 5}),
            ("a", 3, {"value": 3}),
        ]
        doc = orjson.loads(await feed(g, inputs))
        done = [(d["source"], d["seq"], d["applied"]) for d in g.take(FrameType.DONE)]
    assert done == [
        ("a", 1, True),
        ("a", 2, True),
        ("a", 2, False),
        ("a", 1, False),
        ("b", 1, True),
        ("a", 3, True),
    ]
    assert doc["watermark"] == {"a": 3, "b": 1}
    assert doc["vars"]["count/a"] == {"type": "int64", "value": 3}
    assert doc["vars"]["total"] == {"type": "int64", "value": 4}


async def run_until_finished(g: Guest) -> bytes:
    for _ in range(400):
        doc = await g.chan.checkpoint(2)
        if orjson.loads(doc)["next_step"] is None:
            return doc
        await asyncio.sleep(0.02)
    raise AssertionError("procedural app did not finish")


async def test_procedural_app_resumes_at_the_right_step() -> None:
    params = {"rounds": 6, "seed": 42, "size": 32}

    async with spawn("procedural") as g:
        await g.chan.start(params)
        reference_doc = await run_until_finished(g)
        reference_out = g.take(FrameType.OUTPUT)
        assert g.take(FrameType.FINISHED) == [{"step": "finish"}]
    steps = [o["payload"]["step"] for o in reference_out]
    assert steps[0] == "init" and steps[-1] == "finish"
    assert {"square", "halve"} & set(steps)

    paced = {**params, "step_delay_ms": 15}
    async with spawn("procedural") as g:
        await g.chan.start(paced)
        await asyncio.sleep(0.15)
        # Pausing, as a move does: no step runs after the checkpoint, so the outputs taken here
        # are exactly those before it (a running guest raced ahead of take() under load).
        doc = await g.chan.checkpoint(3, pause=True)
        first_out = g.take(FrameType.OUTPUT)
        await g.chan.stop()
    next_step = orjson.loads(doc)["next_step"]
    assert 0 < len(first_out) < len(reference_out)
    assert next_step == reference_out[len(first_out)]["payload"]["step"]

    async with spawn("procedural") as g:
        ready = await g.chan.restore(doc)
        assert ready == {"step": next_step, "restored": True}
        final_doc = await run_until_finished(g)
        rest_out = g.take(FrameType.OUTPUT)
        assert g.take(FrameType.FINISHED) == [{"step": "finish"}]

    assert first_out + rest_out == reference_out
    ref_state, final_state = state_of(reference_doc), state_of(final_doc)
    assert final_state["params"].pop("step_delay_ms") == {"type": "int64", "value": 15}
    assert final_state == ref_state


async def test_float64_round_trips_exactly() -> None:
    """Values that decimal printing would perturb survive checkpoint and restore bit for bit."""
    values = [0.1, 1 / 3, 5e-324, 1.7976931348623157e308, -0.0, 123456.789e-300]
    async with spawn("counter") as g:
        await g.chan.start({})
        for i, v in enumerate(values, 1):
            g.chan.send_input(f"d{i}", 1, {"value": v})
        doc = await g.chan.checkpoint(4)
    async with spawn("counter") as g:
        await g.chan.restore(doc)
        again = await g.chan.checkpoint(4)
    assert again == doc
    # Inputs with <= 17 significant digits, a mantissa below 2**53 and small exponents
    # parse correctly rounded (the guest has no strtod; others land within a few ulps,
    # deterministically). A first mean equals its input.
    for i in (1, 2, 3):
        bits = orjson.loads(doc)["vars"][f"mean/d{i}"]["bits"]
        assert bits == struct.pack(">d", values[i - 1]).hex()


async def test_per_device_keys_are_cut_to_the_key_limit() -> None:
    """ferry_key(): a device name too long for a store key is cut, not overflowed."""
    device = "d" * 300
    async with spawn("counter") as g:
        await g.chan.start({})
        g.chan.send_input("src", 1, {"device": device, "value": 2.0})
        doc = await g.chan.checkpoint(1)
    keys = set(orjson.loads(doc)["vars"])
    assert {"count/" + "d" * 250, "mean/" + "d" * 251} <= keys  # 256 bytes each
