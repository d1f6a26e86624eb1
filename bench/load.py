"""Steady input for the ``recovery`` and ``rate`` scenarios, and what the outputs prove.

``Feeder`` is one MQTT client (paho, its own network thread) that publishes one producer's
inputs to a ``counter`` service at a fixed rate and records, per sequence number, when it was
published and every output that came back (arrival time, the app's ``count``, the node). The
``counter`` app answers input n of a device with ``count`` = n when every input was applied
exactly once, so the outputs alone prove loss and double application per seq:

- an output with ``count`` < seq: seq - count earlier inputs are missing from the state (lost);
- an output with ``count`` > seq: count - seq inputs were applied twice;
- an output repeated for the same seq with the same count: a re-sent output (allowed after a
  crash, never after a planned move), not a double application.

``judge`` and ``latencies`` are pure (unit-tested in ``tests/bench/test_load.py``).
"""

from __future__ import annotations

import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt

from bench import stats
from services.common import topics
from services.common.config import BrokerConfig
from tools.cli.simulate import connect_paho, mosquitto_login_options

#: Publishing granularity: every tick publishes what is due (a sleep per message cannot keep
#: 5000/s on a loaded 2-core machine).
TICK_S = 0.002


@dataclass(frozen=True)
class Output:
    """One output as the client received it (``at``: ``time.time()`` on arrival)."""

    seq: int
    count: int | None
    node: str
    at: float


@dataclass
class Verdict:
    """What the outputs of one producer prove (see the module docstring)."""

    sent: int
    answered: int  # distinct seqs with at least one output
    lost: int  # inputs missing from the state at the end (and never-answered tail)
    applied_twice: int  # largest count - seq over all outputs (0 = none applied twice)
    mismatched: int  # outputs whose count ≠ seq
    repeated: int  # seqs answered more than once (re-sent outputs)
    unanswered: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "answered": self.answered,
            "lost": self.lost,
            "applied_twice": self.applied_twice,
            "mismatched": self.mismatched,
            "repeated": self.repeated,
            "unanswered": len(self.unanswered),
            "unanswered_first": self.unanswered[:10],
        }


def judge(sent: int, outputs: Iterable[Output]) -> Verdict:
    """Loss and double application of inputs 1..``sent`` judged by the counter's outputs.

    ``lost`` = inputs never answered after the last answered one + (seq - count) of the
    last output of the highest answered seq: what the final state lacks, however it was lost.
    """
    by_seq: dict[int, list[Output]] = {}
    mismatched = 0
    twice = 0
    for out in outputs:
        by_seq.setdefault(out.seq, []).append(out)
        if out.count is not None and out.count != out.seq:
            mismatched += 1
            twice = max(twice, out.count - out.seq)
    unanswered = [s for s in range(1, sent + 1) if s not in by_seq]
    lost = 0
    if by_seq:
        top = max(by_seq)
        last = by_seq[top][-1]
        lost = max(0, sent - top) + max(0, top - (last.count if last.count is not None else 0))
    else:
        lost = sent
    return Verdict(
        sent=sent,
        answered=len(by_seq),
        lost=lost,
        applied_twice=twice,
        mismatched=mismatched,
        repeated=sum(1 for outs in by_seq.values() if len(outs) > 1),
        unanswered=unanswered,
    )


def latencies(sent_at: Sequence[float], outputs: Iterable[Output]) -> list[float]:
    """Input → first output latency (ms) of every answered seq; ``sent_at[i]`` is seq i+1's."""
    first: dict[int, float] = {}
    for out in outputs:
        if out.seq not in first or out.at < first[out.seq]:
            first[out.seq] = out.at
    return [(at - sent_at[seq - 1]) * 1000 for seq, at in first.items() if 1 <= seq <= len(sent_at)]


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``bench.stats``); None without values."""
    return stats.percentile(values, q) if values else None


class Feeder:
    """One producer feeding one service at ``rate`` inputs/s (see the module docstring)."""

    def __init__(self, broker: BrokerConfig, service: str, producer: str, rate: float) -> None:
        self.service = service
        self.producer = producer
        self.rate = rate
        self.sent_at: list[float] = []
        self.outputs: list[Output] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._subscribed = threading.Event()
        self._client = connect_paho(
            broker, f"ferry-bench-{uuid.uuid4().hex[:8]}", on_message=self._on_output
        )
        self._client.on_subscribe = lambda *args: self._subscribed.set()
        self._client.subscribe(topics.app_output(service), qos=1)
        if not self._subscribed.wait(10):
            raise TimeoutError("feeder: broker did not confirm the output subscription")

    def _on_output(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        out = self._output_of(message.payload, time.time())
        if out is not None:
            with self._lock:
                self.outputs.append(out)

    def _output_of(self, payload: bytes, at: float) -> Output | None:
        """This producer's output in ``payload`` (an ``.../out`` message), arrived at ``at``."""
        try:
            body = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(body, dict) or body.get("producer") != self.producer:
            return None  # another producer's output
        data = body.get("data") or {}
        count = data.get("count") if isinstance(data, dict) else None
        return Output(
            int(body.get("seq") or 0),
            count if isinstance(count, int) else None,
            str(body.get("node")),
            at,
        )

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="feeder")
        self._thread.start()

    def _loop(self) -> None:
        topic = topics.app_input(self.service)
        started = time.perf_counter()
        while not self._stop.is_set():
            due = int((time.perf_counter() - started) * self.rate)
            while len(self.sent_at) < due and not self._stop.is_set():
                seq = len(self.sent_at) + 1
                body = orjson.dumps(
                    {
                        "producer": self.producer,
                        "seq": seq,
                        "data": {"device": self.producer, "value": float(seq % 100)},
                    }
                )
                self.sent_at.append(time.time())
                self._client.publish(topic, body, qos=1)
            self._stop.wait(TICK_S)

    def stop_sending(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def snapshot(self) -> list[Output]:
        with self._lock:
            return list(self.outputs)

    def answered(self) -> int:
        return len({o.seq for o in self.snapshot()})

    def first_output_from(self, not_node: str, after: float) -> Output | None:
        """The earliest output from another node than ``not_node`` that arrived after ``after``."""
        found = [o for o in self.snapshot() if o.node != not_node and o.at >= after]
        return min(found, key=lambda o: o.at) if found else None

    def settle(self, timeout: float) -> None:
        """Wait until every sent seq was answered (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.answered() < len(self.sent_at):
            time.sleep(0.05)

    def close(self) -> None:
        self.stop_sending()
        self._client.disconnect()
        self._client.loop_stop()


class LeanFeeder(Feeder):
    """``Feeder``'s producer, with its outputs recorded by ``mosquitto_sub`` (C) instead.

    Why: the Feeder receives every output in the same Python process that publishes, and at
    5000/s that client, not the service, is what saturates a 2-core machine (its latencies are
    then the harness's own). ``mosquitto_sub`` stamps each output as it arrives (``%U``).
    """

    def __init__(self, broker: BrokerConfig, service: str, producer: str, rate: float) -> None:
        self.service = service
        self.producer = producer
        self.rate = rate
        self.sent_at = []
        self.outputs = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self._log = Path(tempfile.mkstemp(prefix="ferry-bench-out-")[1])
        self._parsed = 0  # bytes of the log already parsed into self.outputs
        self._closed = False
        argv = ["mosquitto_sub", *mosquitto_login_options(broker), "-V", "mqttv5", "-q", "1"]
        argv += ["-i", f"ferry-bench-sub-{uuid.uuid4().hex[:8]}", "-t", topics.app_output(service)]
        # One line per output, flushed as it arrives: its arrival time, then the message.
        self._sub = subprocess.Popen([*argv, "-F", "%U %p"], stdout=self._log.open("wb"))
        # mosquitto_sub says nothing once subscribed (-d would, at three lines per output);
        # outputs it missed would show as lost, never as a better latency.
        time.sleep(0.5)
        if self._sub.poll() is not None:
            raise ConnectionError(f"mosquitto_sub ended at once (exit {self._sub.returncode})")
        self._client = connect_paho(broker, f"ferry-bench-{uuid.uuid4().hex[:8]}")

    def snapshot(self) -> list[Output]:
        with self._lock:
            if self._closed:  # everything was parsed
                return list(self.outputs)
            with self._log.open("rb") as log:
                log.seek(self._parsed)
                tail = log.read()
            complete = tail.rpartition(b"\n")[0]  # a last line may still be being written
            self._parsed += len(complete) + 1 if complete else 0
            for line in complete.splitlines():
                at, _, payload = line.partition(b" ")
                out = self._output_of(payload, float(at))
                if out is not None:
                    self.outputs.append(out)
            return list(self.outputs)

    def close(self) -> None:
        """Stop sending and recording; ``snapshot`` still has every output recorded."""
        self.stop_sending()
        self._sub.terminate()
        self._sub.wait(5)
        self.snapshot()  # what it wrote before it ended
        self._closed = True
        super().close()
        self._log.unlink(missing_ok=True)
