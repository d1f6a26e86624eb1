"""The stack's real Mosquitto killed and restarted under load: what it PUBACKed survives (all of
it with a snapshot per change, all but a bounded tail with the default), and every component
says "online" again afterwards.

Mosquitto 2.0 persists by snapshot, every ``stack.broker_autosave`` changes. With 1 (a snapshot
after every main-loop pass that changed anything) what can still be lost is bounded: the PUBACK
of a message is sent while its pass runs, the snapshot ends the pass, so a kill during that
snapshot loses that pass's messages, at most one per producer connection (Mosquitto reads one
packet per connection per pass). With the default, 100, a kill loses at most the changes since
the last snapshot. README "Broker durability" has the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from bench.broker_persistence import Producer, Session
from services.common import topics
from services.common.bus import Bus, now_ms
from services.common.config import FerryConfig, load_config
from services.executor.instance import RECEIVE_MAXIMUM
from tests.conftest import ServiceProcesses, stack_config, wait_online
from tools.stack import Stack

N = 500


@pytest.fixture(scope="module")
async def durable(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FerryConfig]:
    """A stack of its own whose broker snapshots after every change."""
    directory = tmp_path_factory.mktemp("durable")
    env = {"FERRY_STACK__DIR": str(directory), "FERRY_STACK__BROKER_AUTOSAVE": "1"}
    stack = Stack(load_config(env=env), services=[])
    info = await stack.up()
    try:
        yield info.config
    finally:
        await stack.down()


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


async def publish_kill_and_collect(config: FerryConfig, fence: bool) -> set[int]:
    """Publish N to an offline persistent session, every PUBACK in, then kill -9 the broker,
    restart it and collect what the session gets. ``fence``: one more round trip from the same
    producer first, so the pass that PUBACKed message N is over (its snapshot written)."""
    session = offline_session(config)
    producer = Producer(config.broker.host, config.broker.port)
    try:
        await asyncio.to_thread(producer.publish, session.topic, N)
        if fence:
            await asyncio.to_thread(producer.publish, f"{session.topic}/fence", 1)
        await kill_broker(config)
    finally:
        producer.client.loop_stop()
    session.connect()
    try:
        return await asyncio.to_thread(session.wait_for, N, 10)
    finally:
        session.disconnect()


async def test_a_broker_kill_keeps_every_input_it_acknowledged(durable: FerryConfig) -> None:
    received = await publish_kill_and_collect(durable, fence=True)
    assert sorted(received) == list(range(1, N + 1)), f"lost {N - len(received)} of {N}"


async def test_a_kill_right_after_the_last_puback_loses_at_most_that_pass(
    durable: FerryConfig,
) -> None:
    missing = set(range(1, N + 1)) - await publish_kill_and_collect(durable, fence=False)
    assert missing <= {N}, f"lost {len(missing)} PUBACKed inputs, not only the last pass's"


async def test_the_default_snapshot_loses_at_most_the_changes_since_the_last_one(
    infra: FerryConfig,
) -> None:
    bound = infra.stack.broker_autosave
    missing = set(range(1, N + 1)) - await publish_kill_and_collect(infra, fence=True)
    print(f"every {bound} changes: a kill -9 lost {len(missing)} of {N} PUBACKed inputs")
    assert len(missing) <= bound, f"lost {len(missing)} PUBACKed inputs (bound {bound})"
    assert not missing or min(missing) > N - bound, "lost inputs older than the last snapshot"


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


@pytest.mark.parametrize("call", ["publish", "subscribe"])
async def test_a_publish_waiting_for_its_puback_fails_when_the_connection_drops(
    durable: FerryConfig, call: str
) -> None:
    """The broker stops answering (SIGSTOP) while a QoS 1 publish waits for its PUBACK (or a
    subscribe for its SUBACK), then dies: the call fails as soon as the connection is known
    lost, saying so, rather than waiting out aiomqtt's 10 s timeout (a scheduler whose broker
    restarted sat 10 s in such a wait before it rolled anything back; a fenced target sat as
    long in a subscribe on a session the broker had handed to its owner). The bus then
    publishes on the new connection."""
    import os

    from services.common.bus import BusError

    state = orjson.loads((durable.stack.dir / "stack.json").read_bytes())
    [pid] = [c["pid"] for c in state["components"] if c["name"] == "mosquitto"]
    async with Bus(durable.broker, f"test-puback-{uuid.uuid4().hex[:6]}") as bus:
        topic = topics.component_status("statestore")
        payload = {"component": "statestore", "status": "online", "time": now_ms()}
        os.killpg(int(pid), signal.SIGSTOP)
        try:
            waiting = asyncio.create_task(
                bus.publish(topic, payload) if call == "publish" else bus.subscribe(topic)
            )
            await asyncio.sleep(0.5)
            assert not waiting.done()  # no PUBACK from a stopped broker
            await kill_broker(durable)  # killed while stopped: the connection resets
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(pid), signal.SIGCONT)
            raise
        acked = "PUBACK" if call == "publish" else "SUBACK"
        with pytest.raises(BusError, match=f"connection was lost before its {acked}"):
            await waiting
        async with asyncio.timeout(15):
            while True:  # reconnected: publishing works again
                with contextlib.suppress(BusError):
                    await bus.publish(topic, {**payload, "time": now_ms()})
                    break
                await asyncio.sleep(0.2)
