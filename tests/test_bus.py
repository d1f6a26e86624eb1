"""The message bus against the real broker: validation, errors, request/reply, manual acks."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid

import aiomqtt
import orjson
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from services.common import topics
from services.common.bus import Bus, Inbound, RemoteError, RequestTimeout
from services.common.config import FerryConfig


def cid(name: str) -> str:
    return f"t-{name}-{uuid.uuid4().hex[:6]}"


async def serve_commands(bus: Bus) -> None:
    async for message in bus.messages():
        if message.payload["command"] == "status":
            await bus.reply(message, {"node": "edge-x"})
        else:
            await bus.reply(message, error=RemoteError("unknown_instance", "no such instance"))


async def test_request_reply_and_remote_errors(infra: FerryConfig) -> None:
    async with Bus(infra.broker, cid("svc")) as svc, Bus(infra.broker, cid("cli")) as cli:
        await svc.subscribe(topics.node_commands("edge-x"))
        server = asyncio.create_task(serve_commands(svc))
        try:
            reply = await cli.request(
                topics.node_commands("edge-x"), {"command": "status", "request_id": "r1"}
            )
            assert reply == {"node": "edge-x"}
            with pytest.raises(RemoteError) as caught:
                await cli.request(
                    topics.node_commands("edge-x"),
                    {"command": "stop", "request_id": "r2", "service": "s", "instance": "i"},
                )
            assert caught.value.code == "unknown_instance"
            with pytest.raises(RequestTimeout):
                await cli.request(
                    topics.node_commands("nobody"), {"command": "status", "request_id": "r3"}, 0.3
                )
        finally:
            server.cancel()


async def test_invalid_payloads_are_refused_on_send() -> None:
    from services.common.config import load_config
    from services.common.contract import ContractError

    config = load_config(env={})
    bus = Bus(config.broker, cid("x"))
    bus._client = object()  # type: ignore[assignment]  # validation happens before any I/O
    with pytest.raises(ContractError, match="'status' is a required property"):
        await bus.publish(topics.node_status("edge-a"), {"node": "edge-a", "time": 1})


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"command": "fly"}', "executor-command.schema.json"),
        (b"[1]", "object"),
    ],
)
async def test_malformed_message_is_reported_and_answered_and_service_survives(
    infra: FerryConfig, raw: bytes, reason: str
) -> None:
    async with Bus(infra.broker, cid("svc")) as svc, Bus(infra.broker, cid("ops")) as ops:
        await svc.subscribe(topics.node_commands("edge-y"))
        await ops.subscribe(topics.ERRORS)
        server = asyncio.create_task(serve_commands(svc))
        try:
            async with aiomqtt.Client(
                infra.broker.host, infra.broker.port, protocol=aiomqtt.ProtocolVersion.V5
            ) as raw_client:
                await raw_client.publish(topics.node_commands("edge-y"), raw, qos=1)
            async with asyncio.timeout(5):
                async for message in ops.messages():
                    if (
                        message.topic == topics.ERRORS
                        and message.payload["source"] == svc.client_id
                    ):
                        assert reason in message.payload["reason"]
                        assert message.payload["topic"] == topics.node_commands("edge-y")
                        break
            # the service still answers
            reply = await ops.request(
                topics.node_commands("edge-y"), {"command": "status", "request_id": "ok"}
            )
            assert reply["node"] == "edge-x"
            # and a requester that sent it with a response topic gets an error reply
            reply_topic = topics.replies("anonymous", cid("raw"))
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = reply_topic
            props.CorrelationData = b"c1"
            async with aiomqtt.Client(
                infra.broker.host, infra.broker.port, protocol=aiomqtt.ProtocolVersion.V5
            ) as raw_client:
                await raw_client.subscribe(reply_topic, qos=1)
                await raw_client.publish(
                    topics.node_commands("edge-y"), raw, qos=1, properties=props
                )
                async with asyncio.timeout(5):
                    async for answer in raw_client.messages:
                        error = orjson.loads(answer.payload)
                        assert error["ok"] is False
                        assert error["error"]["code"] == "invalid_message"
                        assert answer.properties.CorrelationData == b"c1"
                        break
        finally:
            server.cancel()


async def queued_session(infra: FerryConfig, inputs: int) -> str:
    """A service's persistent input session (its client id), offline, with ``inputs`` queued."""
    service = f"svc{uuid.uuid4().hex[:6]}"
    session = f"ferry-svc-{service}"
    async with Bus(infra.broker, session, session_expiry=600, manual_ack=True) as owner:
        await owner.subscribe(topics.app_input(service))
    async with Bus(infra.broker, cid("dev")) as device:
        await device.publish_many(
            [
                (topics.app_input(service), {"producer": "p", "seq": seq, "data": {}})
                for seq in range(1, inputs + 1)
            ]
        )
    return session


async def first_messages(bus: Bus, count: int, timeout: float = 10.0) -> list[Inbound]:
    """The next ``count`` messages ``bus`` receives (none acknowledged)."""
    received: list[Inbound] = []
    async with asyncio.timeout(timeout):
        async for message in bus.messages():
            received.append(message)
            if len(received) == count:
                break
    return received


async def test_unacknowledged_input_is_redelivered_to_the_next_session_owner(
    infra: FerryConfig,
) -> None:
    session = await queued_session(infra, 6)
    async with Bus(infra.broker, session, session_expiry=600, manual_ack=True) as first:
        seen = await first_messages(first, 6)
        assert [m.payload["seq"] for m in seen] == [1, 2, 3, 4, 5, 6]
        for message in seen[:3]:
            first.ack(message)
    async with Bus(infra.broker, session, session_expiry=600, manual_ack=True) as second:
        again = await first_messages(second, 3)
        assert [m.payload["seq"] for m in again] == [4, 5, 6]
        second.ack_many(again)


async def test_acks_sent_at_once_settle_exactly_the_messages_they_name(
    infra: FerryConfig,
) -> None:
    """``ack_many`` (one write for a checkpoint's worth of PUBACKs) acks what ``ack`` would."""
    session = await queued_session(infra, 500)
    async with Bus(infra.broker, session, session_expiry=600, manual_ack=True) as first:
        received = await first_messages(first, 500)
        assert [m.payload["seq"] for m in received] == list(range(1, 501))
        first.ack_many([m for m in received if m.payload["seq"] % 7 != 0])
    async with Bus(infra.broker, session, session_expiry=600, manual_ack=True) as second:
        again = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                async for message in second.messages():
                    again.append(message.payload["seq"])
                    second.ack(message)
        assert again == list(range(7, 501, 7))


async def test_last_will_marks_a_dead_component_offline(infra: FerryConfig) -> None:
    node = f"edge-{uuid.uuid4().hex[:6]}"
    offline = {"node": node, "status": "offline", "time": 1}
    doomed = Bus(infra.broker, cid("doomed"), will=(topics.node_status(node), offline))
    await doomed.__aenter__()
    await doomed.publish(
        topics.node_status(node), {"node": node, "status": "online", "time": 2}, retain=True
    )
    # Drop the TCP connection without DISCONNECT: the broker must publish the will.
    assert doomed._client is not None
    doomed._client._client.socket().shutdown(socket.SHUT_RDWR)
    async with Bus(infra.broker, cid("watcher")) as watcher:
        await watcher.subscribe(topics.node_status(node))
        async with asyncio.timeout(5):
            async for message in watcher.messages():
                if message.payload["status"] == "offline":
                    break
    await doomed.close()
    assert orjson.dumps(offline)


async def test_a_cleared_retained_topic_is_neither_delivered_nor_reported(
    infra: FerryConfig,
) -> None:
    node = f"edge-{uuid.uuid4().hex[:6]}"
    async with Bus(infra.broker, cid("pub")) as publisher:
        await publisher.publish(
            topics.node_status(node), {"node": node, "status": "online", "time": 1}, retain=True
        )
        await publisher.publish(topics.node_status(node), None, retain=True)  # clear it
        await publisher.publish(
            topics.node_status(node), {"node": node, "status": "offline", "time": 2}
        )
    async with Bus(infra.broker, cid("sub")) as subscriber:
        await subscriber.subscribe(topics.ERRORS)
        await subscriber.subscribe(topics.node_status(node))
        async with Bus(infra.broker, cid("pub2")) as again:
            await again.publish(topics.node_status(node), None, retain=True)
            await again.publish(
                topics.node_status(node), {"node": node, "status": "offline", "time": 3}
            )
        async with asyncio.timeout(5):
            async for message in subscriber.messages():
                assert message.topic != topics.ERRORS, message.payload
                assert message.payload["time"] == 3
                break
