"""IoT devices for demos, tests and benchmarks: readings with sequence numbers, mobility, checks.

Each simulated device is a producer that publishes ``{"producer", "seq", "data"}`` to a service's
input topic at a steady rate (QoS 1, paho-mqtt in its own network thread so timing does not depend
on anyone's event loop). The simulator also reads the service's outputs and counts, per sequence
number, how often each input was answered: the proof that nothing was lost or applied twice, for
an app that answers every input (``expect_outputs``). For an app that answers only some inputs
(alerts), an input without an answer proves nothing: the simulator then judges loss by the
executors' own count of applied inputs (``applied`` per instance in ``nodes/+/heartbeat``,
``nodes/+/changes`` and ``nodes/+/status``), and says so when it has no such count.
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

from services.common import tls, topics
from services.common.config import BrokerConfig


@dataclass
class Report:
    """What the simulator sent and what came back.

    ``lost`` and ``duplicated`` are per input, judged by the outputs (``judged_by == "outputs"``);
    with ``judged_by == "applied"`` loss is ``sent - applied`` by the executors' count; ``None``:
    not judged (no count was heard).
    """

    sent: int
    answered: int
    lost: list[tuple[str, int]] = field(default_factory=list)
    duplicated: list[tuple[str, int]] = field(default_factory=list)
    max_gap_ms: float = 0.0
    nodes: dict[str, int] = field(default_factory=dict)
    outputs: int = 0
    applied: int | None = None
    judged_by: str | None = "outputs"

    @property
    def lost_count(self) -> int | None:
        if self.judged_by == "outputs":
            return len(self.lost)
        if self.judged_by == "applied" and self.applied is not None:
            return max(0, self.sent - self.applied)
        return None

    @property
    def ok(self) -> bool:
        """Nothing lost or applied twice, as far as it could be judged."""
        return not self.lost_count and not self.duplicated

    def verdict(self) -> str:
        lost = self.lost_count
        if lost is None:
            return (
                f"loss not judged: {self.answered} of {self.sent} inputs were answered and no "
                "executor count of applied inputs was heard; use --expect-outputs for an app "
                "that answers every input"
            )
        how = "inputs without an answer" if self.judged_by == "outputs" else "sent - applied"
        if lost or self.duplicated:
            return f"lost {lost} ({how}), answered twice {len(self.duplicated)}"
        return f"nothing lost ({how} = 0)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "applied": self.applied,
            "outputs": self.outputs,
            "answered": self.answered,
            "lost": self.lost_count,
            "duplicated": len(self.duplicated),
            "judged_by": self.judged_by,
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
        expect_outputs: bool = True,
        start_sending: bool = True,
        producers: list[str] | None = None,
    ) -> None:
        self.service = service
        self.expect_outputs = expect_outputs
        self._outputs = 0
        # instance id -> (first applied count heard before any input was sent, latest count)
        self._applied: dict[str, list[int]] = {}
        self._counted = threading.Event()
        self._start_sending = start_sending
        self.rate = rate
        # Named like a device login when playing one (its ACL lets it write only in/<login>).
        self.producers = producers or [f"{prefix}-{i + 1}" for i in range(devices)]
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
        #: Publishes waiting for their PUBACK, and whether new readings may go out (see
        #: ``_after_reconnect``).
        self._unacked = 0
        self._in_order = threading.Event()
        self._in_order.set()

    def start(self) -> None:
        """Connect, subscribe to the outputs, and start publishing in a background thread."""
        self._client = connect_paho(
            self._broker, f"ferry-sim-{uuid.uuid4().hex[:8]}", on_message=self._on_output
        )
        self._client.on_subscribe = lambda *args: self._subscribed.set()
        self._client.on_publish = self._on_puback
        self._client.on_disconnect = lambda *args: self._in_order.clear()
        self._client.subscribe(
            [
                (topics.app_output(self.service), 1),
                (topics.node_heartbeat("+"), 0),
                (topics.node_status("+"), 1),
                # A source's final count comes with its change to paused, after its last input.
                (topics.node_changes("+"), 1),
            ]
        )
        if not self._subscribed.wait(10):
            raise TimeoutError("simulator: broker did not confirm the output subscription")
        if self._start_sending:
            self.start_sending()

    def start_sending(self) -> None:
        """Start publishing at ``rate`` in a background thread (``start()`` does, by default)."""
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
        with self._lock:
            self._unacked += 1
        # Each device on its own input topic, as real devices do (asyncapi.yaml appInputFrom).
        topic = topics.app_input_from(self.service, producer)
        return self._client.publish(topic, body, qos=1)

    def _on_puback(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._lock:
            self._unacked -= 1

    def _after_reconnect(self) -> None:
        """Hold new readings until what was unacknowledged at the disconnect is acknowledged.

        Why: paho sends its backlog again only once the CONNACK is in, but a publish made
        between its CONNECT and the CONNACK goes out at once, ahead of that backlog; the service
        would then drop the backlog as below the producer's watermark (a real device must keep
        its readings in order too). Readings held meanwhile go out afterwards, in order.
        """
        assert self._client is not None
        while not self._stop.is_set():
            with self._lock:
                caught_up = self._unacked <= 0
            if self._client.is_connected() and caught_up:
                self._in_order.set()
                return
            self._stop.wait(0.01)

    def _publish_loop(self) -> None:
        if self.rate <= 0:
            return
        interval = 1.0 / self.rate
        next_at = time.perf_counter()
        for producer in itertools.cycle(self.producers):
            if self._stop.is_set():
                return
            if not self._in_order.is_set():
                self._after_reconnect()
            self._publish_one(producer)
            next_at += interval
            delay = next_at - time.perf_counter()
            if delay > 0:
                self._stop.wait(delay)

    def wait_for_count(self, timeout: float) -> bool:
        """Wait for an executor's count of this service's applied inputs (a heartbeat)."""
        return self._counted.wait(timeout)

    def _on_count(self, counts: dict[str, Any], fresh: bool) -> None:
        """Applied counts by instance from a heartbeat (fresh) or a node status (maybe stale)."""
        with self._lock:
            started = any(self._sent.values())
            for instance, count in counts.items():
                if instance.rpartition(".")[0] != self.service or not isinstance(count, int):
                    continue
                seen = self._applied.get(instance)
                if seen is None:
                    if not fresh and not started:
                        continue  # a retained status may be old: no baseline from it
                    # An instance first heard of after sending began is new (a migration
                    # target, counting from 0); one heard of before gives the baseline.
                    self._applied[instance] = [count if not started else 0, count]
                else:
                    seen[1] = max(seen[1], count)
                if fresh:
                    self._counted.set()

    def applied(self) -> int | None:
        """Inputs applied by this service's instances since sending began, or None if unknown."""
        with self._lock:
            if not self._applied:
                return None
            return sum(latest - first for first, latest in self._applied.values())

    def _on_output(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            output = orjson.loads(message.payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(output, dict):
            return
        if message.topic.endswith("/heartbeat"):
            self._on_count(output.get("applied") or {}, fresh=True)
            return
        if message.topic.endswith("/changes"):
            instance = output.get("instance") or {}
            if isinstance(instance.get("instance"), str):
                self._on_count({instance["instance"]: instance.get("applied")}, fresh=True)
            return
        if message.topic.endswith("/status"):
            counts = {i.get("instance"): i.get("applied") for i in output.get("instances") or []}
            self._on_count({k: v for k, v in counts.items() if isinstance(k, str)}, fresh=False)
            return
        with self._lock:
            self._outputs += 1
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
        while time.monotonic() < deadline and not self._settled():
            time.sleep(0.05)
        report = self.report()
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
        return report

    def _settled(self) -> bool:
        if self.expect_outputs:
            return not self.missing()
        applied = self.applied()
        with self._lock:
            sent = sum(self._sent.values())
        if applied is None:
            return not self._counted.is_set()
        return applied >= sent

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
            outputs = self._outputs
        missing = self.missing()
        applied = self.applied()
        if self.expect_outputs:
            judged_by: str | None = "outputs"
        else:
            judged_by = "applied" if applied is not None else None
        return Report(
            sent=sent,
            answered=sent - len(missing),
            lost=missing if self.expect_outputs else [],
            duplicated=duplicated if self.expect_outputs else [],
            max_gap_ms=max(gaps, default=0.0) * 1000,
            nodes=nodes,
            outputs=outputs,
            applied=applied,
            judged_by=judged_by,
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


def mosquitto_login_options(broker: BrokerConfig, password: str | None = None) -> list[str]:
    """The ``mosquitto_pub`` / ``mosquitto_sub`` options that reach and log in to ``broker`` as
    ``connect_paho`` does: host, port, the login (``password`` is what ``-P`` gets, by default
    ``broker.password``) and the TLS files."""
    options = ["-h", broker.host, "-p", str(broker.port)]
    if broker.username and broker.password:  # a password login; else a certificate's CN
        options += ["-u", broker.username, "-P", password or broker.password]
    if broker.tls:
        options += ["--cafile", broker.tls_ca] if broker.tls_ca else ["--capath", "/etc/ssl/certs"]
        if broker.tls_cert:
            options += ["--cert", broker.tls_cert, "--key", broker.tls_key or ""]
    return options


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
    dropped: list[str] = []

    def on_log(c: mqtt.Client, userdata: Any, level: int, text: str) -> None:
        # The connection dropped before CONNACK (a broker refusing our certificate).
        if level == mqtt.MQTT_LOG_ERR and text.startswith("failed to receive on socket"):
            dropped.append(text.removeprefix("failed to receive on socket: "))
            answered.set()

    client.on_log = on_log
    context = tls.broker_context(broker)
    if context is not None:
        client.tls_set_context(context)
    where = f"MQTT broker {broker.host}:{broker.port}"
    login = broker.username or "anonymous"
    try:
        client.connect(broker.host, broker.port, keepalive=30)
    except OSError as exc:
        if tls.is_tls_failure(str(exc)):
            raise ConnectionError(
                f"TLS with {where} failed: {exc}; check broker.tls_ca and broker.tls_cert/tls_key"
            ) from exc
        raise ConnectionError(f"{where} unreachable: {exc}") from exc
    client.loop_start()
    if not answered.wait(timeout) or not reasons or reasons[0].is_failure:
        client.loop_stop()
        if dropped and (context is not None or tls.is_tls_failure(dropped[0])):
            raise ConnectionError(
                f"TLS with {where}: the broker refused the handshake of {client_id!r}: "
                f"{dropped[0]}; check broker.tls_cert/tls_key (a certificate its CA signed)"
            )
        if dropped:
            reason: Any = (
                f"connection lost before CONNACK ({dropped[0]}); a TLS-only listener drops a "
                "plaintext client (broker.tls)"
            )
        else:
            reason = reasons[0] if reasons else f"no answer in {timeout:g} s"
        raise ConnectionError(f"{where} refused {client_id!r} logging in as {login!r}: {reason}")
    client.on_log = None
    return client
