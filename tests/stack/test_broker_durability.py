"""The stack's real Mosquitto killed and restarted under load: what it PUBACKed survives, and
every component says "online" again afterwards.

Mosquitto 2.0 persists by snapshot. With the stack's setting (a snapshot after every main-loop
pass that changed anything) what can still be lost is bounded: the PUBACK of a message is sent
while its pass runs, the snapshot ends the pass, so a kill during that snapshot loses that pass's
messages, at most one per producer connection (Mosquitto reads one packet per connection per
pass). Both halves are tested here; README "Broker durability" has the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from pathlib import Path

import pytest

from bench.broker_persistence import Producer, Session
from services.common import topics
from services.common.bus import Bus, now_ms
from services.common.config import FerryConfig
from services.executor.instance import RECEIVE_MAXIMUM
from services.stack import Stack
from tests.conftest import ServiceProcesses, stack_config, wait_online

N = 500


def offline_session(config: FerryConfig) -> Session:
    """A persistent session (QoS 1, session expiry, clean_start false) that is now offline."""
    session = Session(config.broker.host, config.broker.port, f"durability/{uuid.uuid4().hex[:8]}")
    session.connect()
    session.disconnect()
    return session


async def kill_broker(config: FerryConfig, sig: signal.Signals = signal.SIGKILL) -> None:
    """Stop the stack's Mosquitto with ``sig`` and start it again, same config and data dir."""
    status = await Stack(config).restart("mosquitto", sig)
    assert status.ready, status.detail


async def test_a_broker_kill_keeps_every_input_it_acknowledged(infra: FerryConfig) -> None:
    session = offline_session(infra)
    producer = Producer(infra.broker.host, infra.broker.port)
    try:
        await asyncio.to_thread(producer.publish, session.topic, N)
        # One more round trip from the same producer: the pass that PUBACKed message N is over,
        # so its snapshot is written (the one window left is tested below).
        await asyncio.to_thread(producer.publish, f"{session.topic}/fence", 1)
    finally:
        producer.close()
    await kill_broker(infra)
    session.connect()
    try:
        received = await asyncio.to_thread(session.wait_for, N, 30)
    finally:
        session.disconnect()
    assert sorted(received) == list(range(1, N + 1)), f"lost {N - len(received)} of {N}"


async def test_a_kill_right_after_the_last_puback_loses_at_most_that_pass(
    infra: FerryConfig,
) -> None:
    session = offline_session(infra)
    producer = Producer(infra.broker.host, infra.broker.port)
    try:
        await asyncio.to_thread(producer.publish, session.topic, N)
        await kill_broker(infra)  # while the snapshot of the last pass may still be written
    finally:
        producer.client.loop_stop()
    session.connect()
    try:
        received = await asyncio.to_thread(session.wait_for, N, 10)
    finally:
        session.disconnect()
    missing = set(range(1, N + 1)) - received
    assert missing <= {N}, f"lost {len(missing)} PUBACKed inputs, not only the last pass's"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "restart"])
async def test_every_component_is_online_again_after_a_broker_restart(
    infra: FerryConfig, tmp_path: Path, processes: ServiceProcesses, sig: signal.Signals
) -> None:
    config, _ = stack_config(infra, tmp_path)
    status_topics = [
        topics.node_status("edge-a"),
        topics.component_status("statestore"),
        topics.component_status("scheduler"),
    ]
    processes.start("statestore")
    processes.start("scheduler")
    processes.start("executor@edge-a", "--node", "edge-a")
    await wait_online(config, status_topics)
    restarted = now_ms()
    await kill_broker(infra, sig)  # a restart (SIGTERM) fires every last will: "offline"
    started = time.monotonic()
    await wait_online(config, status_topics, timeout=10, since=restarted)
    print(f"online again {time.monotonic() - started:.2f} s after the broker came back")


async def test_a_service_holding_a_second_of_input_unacknowledged_does_not_stall(
    infra: FerryConfig,
) -> None:
    """The executor acknowledges input with its checkpoint (about 1 s at up to 5000 inputs/s):
    the broker (whose max_inflight_messages once was 100) must keep delivering while that many
    are unacknowledged to a session asking for the executor's Receive Maximum."""
    held = 6000
    topic = f"durability/window/{uuid.uuid4().hex[:8]}"
    bus = Bus(
        infra.broker,
        f"test-window-{uuid.uuid4().hex[:6]}",
        session_expiry=60,
        manual_ack=True,
        validate_inbound=False,
        receive_maximum=RECEIVE_MAXIMUM,  # what a service's input session asks for
    )
    async with bus:
        await bus.subscribe(topic)
        producer = Producer(infra.broker.host, infra.broker.port)
        try:
            await asyncio.to_thread(producer.publish, topic, held)
        finally:
            producer.close()
        received = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(20):
                async for _message in bus.messages():  # never acknowledged
                    received += 1
                    if received == held:
                        break
    assert received == held, f"delivery stalled at {received} unacknowledged inputs"
