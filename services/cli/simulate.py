"""IoT devices for demos, tests and benchmarks: readings with sequence numbers, mobility, checks.

Each simulated device is a producer that publishes ``{"producer", "seq", "data"}`` to a service's
input topic at a steady rate (QoS 1, paho-mqtt in its own network thread so timing does not depend
on anyone's event loop). The simulator also reads the service's outputs and counts, per sequence
number, how often each input was answered: the proof that nothing was lost or applied twice.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import paho.mqtt.client as mqtt

from services.common import topics
from services.common.config import BrokerConfig


@dataclass
class Report:
    """What the simulator sent and what came back."""

    sent: int
    answered: int
    lost: list[tuple[str, int]] = field(default_factory=list)
    duplicated: list[tuple[str, int]] = field(default_factory=list)
    max_gap_ms: float = 0.0
    nodes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "answered": self.answered,
            "lost": len(self.lost),
            "duplicated": len(self.duplicated),
            "max_gap_ms": round(self.max_gap_ms, 2),
            "answered_by_node": self.nodes,
        }


class Simulator:
    """Devices feeding one service (see the module docstring). Use ``start()`` / ``finish()``."""

    def __init__(
        self,
        broker: BrokerConfig,
        service: str,
        *,
        devices: int = 1,
        rate: float = 50.0,
        prefix: str = "dev",
    ) -> None:
        self.service = service
        self.rate = rate
        self.producers = [f"{prefix}-{i + 1}" for i in range(devices)]
        self._sent: dict[str, int] = dict.fromkeys(self.producers, 0)
        self._answers: Counter[tuple[str, int]] = Counter()
        self._answer_times: list[float] = []
        self._nodes: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._broker = broker
        self._client: mqtt.Client | None = None
        self._subscribed = threading.Event()

    def start(self) -> None:
        """Connect, subscribe to the outputs, and start publishing in a background thread."""
        self._client = connect_paho(
            self._broker, f"ferry-sim-{uuid.uuid4().hex[:8]}", on_message=self._on_output
        )
        self._client.on_subscribe = lambda *args: self._subscribed.set()
        self._client.subscribe(topics.app_output(self.service), qos=1)
        if not self._subscribed.wait(10):
            raise TimeoutError("simulator: broker did not confirm the output subscription")
        self._thread = threading.Thread(target=self._publish_loop, daemon=True)
        self._thread.start()

    def send(self, count: int) -> None:
        """Publish ``count`` readings right now (round-robin over devices), waiting for PUBACKs."""
        for producer in itertools.islice(itertools.cycle(self.producers), count):
            self._publish_one(producer).wait_for_publish(10)

    def _publish_one(self, producer: str) -> mqtt.MQTTMessageInfo:
        with self._lock:
            self._sent[producer] += 1
            seq = self._sent[producer]
        reading = {"device": producer, "value": reading_value(producer, seq)}
        body = orjson.dumps(
            {"producer": producer, "seq": seq, "data": reading, "sent": time.time_ns() // 10**6}
        )
        assert self._client is not None, "start() first"
        return self._client.publish(topics.app_input(self.service), body, qos=1)

    def _publish_loop(self) -> None:
        if self.rate <= 0:
            return
        interval = 1.0 / self.rate
        next_at = time.perf_counter()
        for producer in itertools.cycle(self.producers):
            if self._stop.is_set():
                return
            self._publish_one(producer)
            next_at += interval
            delay = next_at - time.perf_counter()
            if delay > 0:
                self._stop.wait(delay)

    def _on_output(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            output = orjson.loads(message.payload)
        except orjson.JSONDecodeError:
            return
        if output.get("producer") is None:
            return
        with self._lock:
            self._answers[(output["producer"], int(output["seq"]))] += 1
            self._answer_times.append(time.perf_counter())
            self._nodes[output.get("node", "?")] += 1

    def stop_sending(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def finish(self, settle: float = 10.0) -> Report:
        """Stop sending, wait up to ``settle`` s for every answer, disconnect, and report."""
        self.stop_sending()
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline and len(self.missing()) > 0:
            time.sleep(0.05)
        report = self.report()
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
        return report

    def missing(self) -> list[tuple[str, int]]:
        with self._lock:
            return [
                (producer, seq)
                for producer, sent in self._sent.items()
                for seq in range(1, sent + 1)
                if self._answers[(producer, seq)] == 0
            ]

    def report(self) -> Report:
        with self._lock:
            gaps = [b - a for a, b in itertools.pairwise(self._answer_times)]
            duplicated = [key for key, count in self._answers.items() if count > 1]
            sent = sum(self._sent.values())
            nodes = dict(self._nodes)
        return Report(
            sent=sent,
            answered=sent - len(self.missing()),
            lost=self.missing(),
            duplicated=duplicated,
            max_gap_ms=max(gaps, default=0.0) * 1000,
            nodes=nodes,
        )


def reading_value(producer: str, seq: int) -> float:
    """A plausible temperature that depends only on (producer, seq), so runs are comparable."""
    return 15.0 + ((seq * 7919 + sum(producer.encode())) % 1500) / 100


def publish_mobility(broker: BrokerConfig, device: str, node: str, cell: str | None = None) -> None:
    """Announce that ``device`` is now in a cell served by ``node`` (one-shot, QoS 1)."""
    client = connect_paho(broker, f"ferry-mobility-{uuid.uuid4().hex[:8]}")
    try:
        event: dict[str, Any] = {"device": device, "node": node, "time": time.time_ns() // 10**6}
        if cell:
            event["cell"] = cell
        client.publish(topics.mobility(device), orjson.dumps(event), qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def connect_paho(
    broker: BrokerConfig,
    client_id: str,
    on_message: Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None] | None = None,
    timeout: float = 10.0,
) -> mqtt.Client:
    """A paho MQTT v5 client, logged in as ``broker`` says, connected, its network loop running.

    Raises ConnectionError naming the broker and the login when the broker refuses or is silent.
    """
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
    )
    if broker.username:
        client.username_pw_set(broker.username, broker.password or None)
    if on_message is not None:
        client.on_message = on_message
    answered = threading.Event()
    reasons: list[Any] = []

    def on_connect(c: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        reasons.append(reason)
        answered.set()

    client.on_connect = on_connect
    where = f"MQTT broker {broker.host}:{broker.port}"
    login = broker.username or "anonymous"
    try:
        client.connect(broker.host, broker.port, keepalive=30)
    except OSError as exc:
        raise ConnectionError(f"{where} unreachable: {exc}") from exc
    client.loop_start()
    if not answered.wait(timeout) or reasons[0].is_failure:
        client.loop_stop()
        reason = reasons[0] if reasons else f"no answer in {timeout:g} s"
        raise ConnectionError(f"{where} refused {client_id!r} logging in as {login!r}: {reason}")
    return client
