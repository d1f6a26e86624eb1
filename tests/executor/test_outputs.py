"""The output line on the real broker: pipelined batches, in order, and nothing lost or overtaken
when the broker connection fails with several batches in flight.

The subscriber holds a persistent session (clean start off, so Mosquitto keeps it through its
own restart) and records every output's ``seq`` in arrival order; an output may repeat after a
failure, but the first arrival of each one must come in submit order and every submitted output
must arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import signal
import uuid
from collections.abc import AsyncIterator

import pytest

from services.common import topics
from services.common.bus import Bus, now_ms
from services.common.config import FerryConfig
from services.executor import outputs as outputs_module
from services.executor.outputs import OutputLine
from tools.stack import Stack

pytestmark = pytest.mark.asyncio(loop_scope="session")


class Received:
    """Every output seq on one service's output topic, in arrival order (persistent session)."""

    def __init__(self, config: FerryConfig, service: str) -> None:
        self.seqs: list[int] = []
        self._bus = Bus(
            config.broker,
            f"test-line-{uuid.uuid4().hex[:6]}",
            session_expiry=300,
            validate_inbound=False,
        )
        self._service = service
        self._pump: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Received:
        await self._bus.__aenter__()
        await self._bus.subscribe(topics.app_output(self._service), qos=1)
        self._pump = asyncio.create_task(self._collect())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._pump is not None:
            self._pump.cancel()
        await self._bus.close()

    async def _collect(self) -> None:
        async for message in self._bus.messages():
            self.seqs.append(int(message.payload["seq"]))

    async def wait_for(self, n: int, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while len(set(self.seqs)) < n:  # noqa: ASYNC110
                await asyncio.sleep(0.05)

    def assert_all_in_order(self, n: int) -> None:
        firsts = list(dict.fromkeys(self.seqs))
        assert sorted(firsts) == list(range(1, n + 1)), f"lost {n - len(firsts)} of {n}"
        overtaken = [(a, b) for a, b in itertools.pairwise(firsts) if b < a]
        assert not overtaken, f"out of order (first arrivals): {overtaken[:5]}"


def output(service: str, seq: int) -> tuple[str, dict[str, object]]:
    body = {
        "service": service,
        "node": "edge-a",
        "producer": "dev-1",
        "seq": seq,
        "data": {"count": seq},
        "time": now_ms(),
    }
    return topics.app_output(service), body


class Link:
    """A TCP link to the broker that the test can break: for ``stall`` seconds every byte from
    the client is lost in transit (as on a dead network path), then the connection is cut.
    Reconnections go through normally."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._stalled = False
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    if up and self._stalled:
                        continue  # lost in transit
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))

    async def break_(self, stall: float) -> None:
        self._stalled = True
        await asyncio.sleep(stall)
        writers, self._writers = self._writers, []
        for writer in writers:
            writer.close()
        self._stalled = False

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


@pytest.fixture
async def link(infra: FerryConfig) -> AsyncIterator[tuple[Link, FerryConfig]]:
    link = Link(infra.broker.host, infra.broker.port)
    port = await link.start()
    yield link, dataclasses.replace(infra, broker=dataclasses.replace(infra.broker, port=port))
    link.close()


@pytest.fixture
async def line(link: tuple[Link, FerryConfig]) -> AsyncIterator[tuple[OutputLine, Bus]]:
    """An output line whose bus reaches the broker through ``link``."""
    async with Bus(link[1].broker, f"test-sender-{uuid.uuid4().hex[:6]}") as bus:
        outputs = OutputLine(bus)
        outputs.start()
        yield outputs, bus
        await outputs.close()


async def feed(line: OutputLine, service: str, n: int, rate: float) -> None:
    """Submit outputs 1..n at ``rate`` per second, in bursts of one event-loop tick."""
    started = asyncio.get_running_loop().time()
    for seq in range(1, n + 1):
        line.submit(*output(service, seq))
        due = started + seq / rate
        delay = due - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)


async def test_outputs_go_out_pipelined_and_in_order(
    infra: FerryConfig, line: tuple[OutputLine, Bus], monkeypatch: pytest.MonkeyPatch
) -> None:
    # many small batches, each sent as soon as there are a few: the pipeline fills
    monkeypatch.setattr(outputs_module, "BATCH", 50)
    monkeypatch.setattr(outputs_module, "PIPELINE_MIN", 5)
    outputs, _ = line
    service = f"line-{uuid.uuid4().hex[:5]}"
    async with Received(infra, service) as received:
        await feed(outputs, service, 5000, 20000)
        await asyncio.wait_for(outputs.wait_confirmed(), 30)
        await received.wait_for(5000)
    received.assert_all_in_order(5000)
    assert outputs.confirmed == 5000 and outputs.failures == 0
    assert outputs.most_in_flight > 1, "never more than one batch out: not pipelined"


@pytest.mark.parametrize("how", ["link", "restart"])
async def test_a_broker_failure_with_batches_in_flight_loses_and_reorders_nothing(
    infra: FerryConfig,
    link: tuple[Link, FerryConfig],
    line: tuple[OutputLine, Bus],
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    """The sender's connection fails while outputs stream out several batches deep: either
    the link loses 0.3 s of what the sender wrote and is then cut (those batches never reach
    the broker), or Mosquitto restarts (SIGTERM: it keeps what it acknowledged). Every output
    arrives, the first arrivals in submit order, and confirmation reaches the end."""
    monkeypatch.setattr(outputs_module, "BATCH", 50)
    monkeypatch.setattr(outputs_module, "PIPELINE_MIN", 5)
    outputs, bus = line
    service = f"line-{uuid.uuid4().hex[:5]}"
    n = 20000
    async with Received(infra, service) as received:
        feeding = asyncio.create_task(feed(outputs, service, n, 5000))
        await asyncio.sleep(1.0)
        assert outputs.submitted - outputs.confirmed > 0
        generation = bus.generation
        if how == "link":
            await link[0].break_(0.3)
        else:
            status = await Stack(infra).restart("mosquitto", signal.SIGTERM)
            assert status.ready, status.detail
        await feeding
        await asyncio.wait_for(outputs.wait_confirmed(), 60)
        assert bus.generation > generation, "the connection never dropped"
        await received.wait_for(n, timeout=60)
    received.assert_all_in_order(n)
    assert outputs.confirmed == n
    assert outputs.failures >= 1, "no batch failed: the fault missed the line"
    assert outputs.most_in_flight > 1
    print(f"{how}: {outputs.failures} failed batch(es), {len(received.seqs) - n} outputs repeated")
