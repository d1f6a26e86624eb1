"""Small paho-mqtt helpers for the stack's own checks (blocking; run them in a thread).

Why paho and not ``services.common.bus``: these checks must work before any Ferry schema or
service exists, and must not depend on the code they are checking.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import uuid
from collections.abc import Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from tools.stack.probes import Probe


def _client(prefix: str, tls: ssl.SSLContext | None = None) -> mqtt.Client:
    """``tls``: the context of a TLS listener (``services.common.tls.broker_context``)."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"ferry-stack-{prefix}-{uuid.uuid4().hex[:8]}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    if tls is not None:
        client.tls_set_context(tls)
    return client


def round_trip(
    host: str, port: int, timeout: float = 2.0, tls: ssl.SSLContext | None = None
) -> Probe:
    """Ready when an MQTT v5 client can connect, subscribe, publish and receive its message."""
    client = _client("probe", tls)
    topic = f"ferry-stack/probe/{uuid.uuid4().hex}"
    connected, subscribed, received = threading.Event(), threading.Event(), threading.Event()
    client.on_connect = lambda c, u, f, rc, p: connected.set() if not rc.is_failure else None
    client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
    client.on_message = lambda c, u, msg: received.set() if msg.topic == topic else None
    try:
        client.connect(host, port, keepalive=10)
    except OSError as exc:
        return Probe(False, f"no MQTT listener on {host}:{port} ({exc.strerror or exc})")
    client.loop_start()
    try:
        if not connected.wait(timeout):
            return Probe(False, "no CONNACK")
        client.subscribe(topic, qos=1)
        if not subscribed.wait(timeout):
            return Probe(False, "no SUBACK")
        client.publish(topic, b"ping", qos=1)
        if not received.wait(timeout):
            return Probe(False, "published message did not come back")
        return Probe(True, f"MQTT v5 round trip on {host}:{port}")
    finally:
        client.disconnect()
        client.loop_stop()


def clear_retained(
    host: str,
    port: int,
    topics: Sequence[str],
    timeout: float = 5.0,
    tls: ssl.SSLContext | None = None,
) -> None:
    """Delete retained messages on ``topics``, so a stale ``online`` from a previous run of the
    (persistent) broker cannot pass for a freshly started service."""
    client = _client("clear", tls)
    client.connect(host, port, keepalive=10)
    client.loop_start()
    try:
        infos = [client.publish(topic, b"", qos=1, retain=True) for topic in topics]
        for info in infos:
            info.wait_for_publish(timeout)
    finally:
        client.disconnect()
        client.loop_stop()


class StatusWatcher:
    """Follows retained status topics and keeps the latest decoded payload of each.

    ``changed`` is set (on the event loop) whenever a message arrives, so waiters need not poll.
    """

    def __init__(
        self, host: str, port: int, topics: Sequence[str], tls: ssl.SSLContext | None = None
    ) -> None:
        self._host, self._port, self._topics = host, port, list(topics)
        self._latest: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._client = _client("status", tls)
        self._subscribed = asyncio.Event()
        self.changed = asyncio.Event()

    async def start(self, timeout: float = 5.0) -> None:
        """Connect and subscribe; returns once the broker acknowledged the subscription."""
        loop = asyncio.get_running_loop()
        if not self._topics:
            return

        def on_connect(c: mqtt.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
            if not rc.is_failure:
                c.subscribe([(topic, 1) for topic in self._topics])

        def on_subscribe(c: mqtt.Client, u: Any, mid: int, rcs: Any, p: Any) -> None:
            loop.call_soon_threadsafe(self._subscribed.set)

        def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
            with self._lock:
                if not msg.payload:
                    self._latest.pop(msg.topic, None)
                else:
                    try:
                        payload = json.loads(msg.payload)
                    except ValueError:
                        payload = {"status": "<not JSON>", "raw": msg.payload[:80].decode("latin1")}
                    self._latest[msg.topic] = payload if isinstance(payload, dict) else {}
            loop.call_soon_threadsafe(self.changed.set)

        self._client.on_connect = on_connect
        self._client.on_subscribe = on_subscribe
        self._client.on_message = on_message
        await asyncio.to_thread(self._client.connect, self._host, self._port, 10)
        self._client.loop_start()
        await asyncio.wait_for(self._subscribed.wait(), timeout)

    def latest(self, topic: str) -> dict[str, Any] | None:
        with self._lock:
            return self._latest.get(topic)

    async def close(self) -> None:
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)
