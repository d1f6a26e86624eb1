"""Upgrades in the guest: a checkpoint of counter 1.0.0 restored into counter 2.0.0
(apps/counter_v2.c) runs its upgrade hook, which derives the new state from the old; versions the
app does not list, downgrades included, and states the hook refuses end the guest clearly."""

from __future__ import annotations

import struct
from typing import Any

import orjson
import pytest
from conftest import Guest, spawn

from services.executor.channel import FrameType, GuestError

DEVICES = ("a", "b/c", "count", "zz")


def f64(value: dict[str, Any]) -> float:
    assert value["type"] == "float64"
    result: float = struct.unpack(">d", bytes.fromhex(value["bits"]))[0]
    return result


async def v1_checkpoint(readings: list[tuple[str, int, float]]) -> bytes:
    """counter 1.0.0 fed ``readings`` (source, seq, value); its checkpoint."""
    async with spawn("counter") as g:
        await g.chan.start({})
        for source, seq, value in readings:
            g.chan.send_input(source, seq, {"value": value})
        return await g.chan.checkpoint(1000)


def readings(per_device: int = 5) -> list[tuple[str, int, float]]:
    return [(d, s, s * 1.5 + i) for i, d in enumerate(DEVICES) for s in range(1, per_device + 1)]


async def refusal(g: Guest, document: bytes) -> GuestError:
    with pytest.raises(GuestError) as caught:
        await g.chan.restore(document)
    assert await g.wait() == 3
    return caught.value


async def test_hello_lists_the_versions_an_app_upgrades_from() -> None:
    async with spawn("counter_v2") as g:
        assert g.hello["app"] == "counter" and g.hello["app_version"] == "2.0.0"
        assert g.hello["upgrades_from"] == ["1.0.0"]
    async with spawn("counter") as g:
        assert "upgrades_from" not in g.hello


async def test_the_hook_derives_the_new_state_and_the_watermark_carries_over() -> None:
    document = await v1_checkpoint(readings())
    old = orjson.loads(document)
    assert old["app"] == {"name": "counter", "version": "1.0.0"}
    async with spawn("counter_v2") as g:
        ready = await g.chan.restore(document)
        assert ready["restored"] is True and ready["upgraded_from"] == "1.0.0"
        # the state as the hook left it, before any input: one sum per device, exact
        upgraded = orjson.loads(await g.chan.checkpoint(2000))
        assert upgraded["app"] == {"name": "counter", "version": "2.0.0"}
        assert upgraded["watermark"] == old["watermark"]
        assert upgraded["vars"]["upgraded_from"] == {"type": "string", "value": "1.0.0"}
        for i, device in enumerate(DEVICES):
            values = [s * 1.5 + i for s in range(1, 6)]
            assert f64(upgraded["vars"][f"sum/{device}"]) == pytest.approx(sum(values), rel=1e-12)
        assert {k for k in upgraded["vars"] if k.startswith("sum/")} == {
            f"sum/{d}" for d in DEVICES
        }
        # inputs the old version applied are dropped; new ones carry the sum on
        g.chan.send_input("a", 5, {"value": 99})
        g.chan.send_input("a", 6, {"value": 10})
        await g.chan.checkpoint(3000)
        outputs = [f["payload"] for f in g.take(FrameType.OUTPUT)]
        done = g.take(FrameType.DONE)
        assert [d["applied"] for d in done] == [False, True]
        assert outputs == [
            {
                "device": "a",
                "count": 6,
                "mean": pytest.approx((sum(s * 1.5 for s in range(1, 6)) + 10) / 6),
                "total": len(DEVICES) * 5 + 1,
                "sum": pytest.approx(sum(s * 1.5 for s in range(1, 6)) + 10),
            }
        ]


async def test_a_restore_of_the_same_version_runs_no_hook() -> None:
    async with spawn("counter_v2") as g:
        await g.chan.start({})
        g.chan.send_input("a", 1, {"value": 2.0})
        document = await g.chan.checkpoint(1000)
    async with spawn("counter_v2") as g:
        ready = await g.chan.restore(document)
        assert "upgraded_from" not in ready
        again = orjson.loads(await g.chan.checkpoint(2000))
        assert "upgraded_from" not in again["vars"]
        assert again["vars"] == orjson.loads(document)["vars"]


async def test_a_version_the_app_does_not_list_is_refused() -> None:
    document = orjson.loads(await v1_checkpoint(readings(2)))
    document["app"]["version"] = "0.9.0"
    async with spawn("counter_v2") as g:
        error = await refusal(g, orjson.dumps(document))
    assert error.code == "wrong_app"
    assert error.message == (
        "the checkpoint is of counter 0.9.0; counter 2.0.0 upgrades only from: 1.0.0"
    )


async def test_a_downgrade_is_refused_unless_the_older_version_lists_the_newer() -> None:
    async with spawn("counter_v2") as g:
        await g.chan.start({})
        g.chan.send_input("a", 1, {"value": 2.0})
        document = await g.chan.checkpoint(1000)
    async with spawn("counter") as g:
        error = await refusal(g, document)
    assert error.code == "wrong_app"
    assert "the checkpoint is of counter 2.0.0; counter 1.0.0 restores no other version" in (
        error.message
    )


async def test_the_hook_refuses_a_state_it_cannot_convert() -> None:
    """Two readings near the float64 limit: their mean is finite, their sum is not."""
    document = await v1_checkpoint([("a", 1, 1.5), ("big", 1, 1e308), ("big", 2, 1e308)])
    async with spawn("counter_v2") as g:
        error = await refusal(g, document)
    assert error.code == "upgrade_refused"
    assert error.message == (
        "counter 2.0.0 refuses the state of 1.0.0: a device's sum of readings is beyond a float64"
    )
