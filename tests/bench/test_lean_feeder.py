"""``bench.load.LeanFeeder`` against the session's real broker: what ``mosquitto_sub`` records
is what was published on the service's output topic, for its own producer only, and it is still
there after the feeder closed (the rate scenarios read it then)."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from bench.load import LeanFeeder
from services.common import topics
from services.common.config import FerryConfig
from tools.cli.simulate import connect_paho

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_the_lean_feeder_records_its_producers_outputs_with_their_arrival(
    infra: FerryConfig,
) -> None:
    feeder = LeanFeeder(infra.broker, "lean-feeder-test", "dev-1", rate=100.0)
    service_side = connect_paho(infra.broker, "test-lean-service")
    try:
        for seq, producer in [(1, "dev-1"), (2, "dev-1"), (1, "dev-2"), (3, "dev-1")]:
            output = {"producer": producer, "seq": seq, "node": "edge-a", "data": {"count": seq}}
            info = service_side.publish(
                topics.app_output("lean-feeder-test"), orjson.dumps(output), qos=1
            )
            info.wait_for_publish(5)
        for _ in range(100):  # mosquitto_sub writes them as they arrive
            if len(feeder.snapshot()) == 3:
                break
            await asyncio.sleep(0.05)
    finally:
        feeder.close()
        service_side.disconnect()
        service_side.loop_stop()
    outputs = feeder.snapshot()
    assert [(o.seq, o.count, o.node) for o in outputs] == [
        (1, 1, "edge-a"),
        (2, 2, "edge-a"),
        (3, 3, "edge-a"),
    ]
    assert outputs[0].at <= outputs[1].at <= outputs[2].at
