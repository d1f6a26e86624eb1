"""What Mosquitto's persistence settings cost: QoS 1 publishes/s into a persistent session.

``python -m bench.broker_persistence [--messages N]`` starts a private Mosquitto per setting (the
stack's own generated config, only the autosave lines differ), and for each: a producer
publishes N QoS 1 messages pipelined (up to ``PRODUCER_WINDOW`` in flight) to a topic a
persistent session (session expiry, clean_start false) subscribes to, with that subscriber
offline (everything is queued) and online (acknowledging each delivery). The rate counts until
the last PUBACK. The helpers here (``Producer``, ``Session``) are also what
``tests/stack/test_broker_durability.py`` uses against the real stack.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tools.stack import mosquitto
from tools.stack import mqtt as stack_mqtt
from tools.stack.ports import free_ports

PRODUCER_WINDOW = 1000
SESSION_EXPIRY_S = 3600


def _connect(
    client_id: str,
    host: str,
    port: int,
    *,
    persistent: bool,
    on_message: mqtt.CallbackOnMessage | None = None,
) -> mqtt.Client:
    """A connected paho v5 client (network loop running, TCP_NODELAY on).

    ``on_message`` is set before connecting: a resumed session's queue arrives right after CONNACK.
    """
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
    )
    if on_message is not None:
        client.on_message = on_message
    connected = threading.Event()
    failure: list[str] = []

    def on_connect(c: mqtt.Client, u: object, flags: object, rc: object, props: object) -> None:
        if getattr(rc, "is_failure", False):
            failure.append(str(rc))
        connected.set()

    client.on_connect = on_connect
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = SESSION_EXPIRY_S if persistent else 0
    props.ReceiveMaximum = 65535
    client.max_inflight_messages_set(PRODUCER_WINDOW)
    client.max_queued_messages_set(0)
    client.connect(host, port, keepalive=30, clean_start=not persistent, properties=props)
    sock = client.socket()
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.loop_start()
    if not connected.wait(10) or failure:
        client.loop_stop()
        raise ConnectionError(f"{client_id}: no CONNACK from {host}:{port} {failure}")
    return client


def payload(seq: int) -> bytes:
    """An input of the usual size (about 100 bytes)."""
    return json.dumps(
        {"producer": "bench", "seq": seq, "data": {"value": seq, "pad": "x" * 40}}
    ).encode()


class Producer:
    """Publishes QoS 1 messages pipelined and counts PUBACKs."""

    def __init__(self, host: str, port: int) -> None:
        self.client = _connect(
            f"bench-producer-{uuid.uuid4().hex[:8]}", host, port, persistent=False
        )
        self._acked = 0
        self._lock = threading.Condition()
        self.client.on_publish = self._on_publish

    def _on_publish(self, c: mqtt.Client, u: object, mid: int, rc: object, p: object) -> None:
        with self._lock:
            self._acked += 1
            self._lock.notify_all()

    def publish(self, topic: str, count: int, first: int = 1, timeout: float = 600.0) -> float:
        """Publish seqs first..first+count-1 and wait for every PUBACK; returns the seconds."""
        with self._lock:
            self._acked = 0
        started = time.monotonic()
        for seq in range(first, first + count):
            info = self.client.publish(topic, payload(seq), qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise ConnectionError(f"publish {seq} failed: {mqtt.error_string(info.rc)}")
        with self._lock:
            if not self._lock.wait_for(lambda: self._acked >= count, timeout):
                raise TimeoutError(f"{self._acked} of {count} PUBACKs after {timeout:.0f} s")
        return time.monotonic() - started

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Session:
    """A persistent MQTT session subscribed to one topic: the way a Ferry service takes input."""

    def __init__(self, host: str, port: int, topic: str, client_id: str | None = None) -> None:
        self.host, self.port, self.topic = host, port, topic
        self.client_id = client_id or f"bench-session-{uuid.uuid4().hex[:8]}"
        self.seqs: list[int] = []
        self._lock = threading.Condition()
        self.client: mqtt.Client | None = None

    def connect(self) -> None:
        """Connect (taking the session over), subscribe, and acknowledge whatever arrives."""
        self.client = _connect(
            self.client_id, self.host, self.port, persistent=True, on_message=self._on_message
        )
        subscribed = threading.Event()
        self.client.on_subscribe = lambda c, u, mid, codes, p: subscribed.set()
        self.client.subscribe(self.topic, qos=1)
        if not subscribed.wait(10):
            raise TimeoutError(f"{self.client_id}: no SUBACK")

    def _on_message(self, c: mqtt.Client, u: object, message: mqtt.MQTTMessage) -> None:
        seq = json.loads(message.payload)["seq"]
        with self._lock:
            self.seqs.append(seq)
            self._lock.notify_all()

    def wait_for(self, count: int, timeout: float) -> set[int]:
        """The distinct seqs received once ``count`` distinct ones arrived or ``timeout`` passed."""
        with self._lock:
            self._lock.wait_for(lambda: len(set(self.seqs)) >= count, timeout)
            return set(self.seqs)

    def disconnect(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None


@dataclass
class Broker:
    """A private Mosquitto on a free port, with the stack's config and its own data dir."""

    directory: Path
    autosave_on_changes: bool
    autosave_interval: int
    host: str = "127.0.0.1"
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if not self.port:
            self.port = free_ports(self.host, 1)[0]
        log = self.directory / "mosquitto.log"
        conf = mosquitto.write_config(
            self.directory,
            self.host,
            self.port,
            log,
            autosave_on_changes=self.autosave_on_changes,
            autosave_interval=self.autosave_interval,
        )
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                mosquitto.argv("mosquitto", conf), stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 10
        while not stack_mqtt.round_trip(self.host, self.port).ready:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto did not start; see {log}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def db_bytes(self) -> int:
        db = self.directory / "data" / "mosquitto.db"
        return db.stat().st_size if db.exists() else 0


SETTINGS = {
    "every 30 s (old)": (False, 30),
    "every 100 changes": (True, 100),
    "every change": (True, 1),
}


def publish_all(producers: list[Producer], topic: str, count: int) -> float:
    """Every producer publishes ``count / len(producers)`` at once; seconds until the last PUBACK.

    Several connections matter: Mosquitto reads one packet per ready connection per loop pass
    and saves once per pass, so concurrent producers share a snapshot.
    """
    share = count // len(producers)
    started = time.monotonic()
    threads = [
        threading.Thread(target=p.publish, args=(topic, share, 1 + i * share))
        for i, p in enumerate(producers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.monotonic() - started


def measure(
    name: str, on_changes: bool, interval: int, count: int, root: Path, connections: int = 1
) -> dict[str, object]:
    """Publish rates into an offline and an online persistent session with one setting."""
    broker = Broker(
        root / name.replace(" ", "-").replace("(", "").replace(")", ""), on_changes, interval
    )
    broker.start()
    try:
        producers = [Producer(broker.host, broker.port) for _ in range(connections)]
        count -= count % connections
        topic = f"bench/{uuid.uuid4().hex[:6]}"
        offline = Session(broker.host, broker.port, topic)
        offline.connect()
        offline.disconnect()
        seconds_offline = publish_all(producers, topic, count)
        db_after_offline = broker.db_bytes()
        offline.connect()  # drain the queue so the online run starts from an empty session
        drained = len(offline.wait_for(count, 120))
        offline.seqs.clear()
        seconds_online = publish_all(producers, topic, count)
        delivered = len(offline.wait_for(count, 120))
        offline.disconnect()
        for producer in producers:
            producer.close()
    finally:
        broker.kill()
    return {
        "setting": name,
        "messages": count,
        "producers": connections,
        "offline_per_s": round(count / seconds_offline),
        "online_per_s": round(count / seconds_online),
        "drained": drained,
        "delivered_online": delivered,
        "db_bytes_with_queue": db_after_offline,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.broker_persistence", description=__doc__)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--setting", choices=list(SETTINGS), action="append")
    parser.add_argument("--producers", type=int, default=1, help="producer connections")
    parser.add_argument("--root", type=Path, help="where the brokers' data dirs go (e.g. /dev/shm)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ferry-broker-bench-", dir=args.root) as tmp:
        for name in args.setting or list(SETTINGS):
            on_changes, interval = SETTINGS[name]
            row = measure(name, on_changes, interval, args.messages, Path(tmp), args.producers)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
