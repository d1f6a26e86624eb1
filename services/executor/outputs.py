"""A service's outputs on their way to the broker: pipelined, in order, confirmed, retried.

Why this exists: an input may be acknowledged to the broker only once every output it produced
has been accepted by the broker (DESIGN.md, "outputs before acks"), and a migration's checkpoint
completes only when every output of every applied input is out. Publishing one message per round
trip cannot keep up with thousands of inputs per second, so outputs go out in batches: every
output waiting is handed to the MQTT client at once (paho writes them in call order, so the
broker sees them in guest order), and a batch is confirmed when every PUBACK arrived. Up to
``IN_FLIGHT`` batches are out at once: outputs that arrive while a batch waits for its PUBACKs
go out at once instead of a round trip later (with one batch in flight, an output waited for the
round trip of the batch before it and then its own: 0.1 to 1 s at 5000/s on a busy host).
Confirmation stays in order: a batch counts only once every batch before it is confirmed.

A failed publish (the broker connection dropped) stops the line: nothing after it is confirmed,
and from the first unconfirmed output on the rest is sent again, in order, once the bus is back
and every batch still out has settled. Batches in flight are only ever on one connection: one
handed to a new connection while an earlier one may still be lost on the old one would overtake
it. So an output may repeat after a broker failure, but it is never lost and never overtaken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.common.bus import Bus, BusError

log = logging.getLogger(__name__)

#: Most outputs handed to the client per batch.
BATCH = 2000
#: Most batches out at once (waiting for their PUBACKs).
IN_FLIGHT = 3
#: While a batch is out, another goes out only once this many outputs wait: a handful would
#: cost more in per-batch work than it saves, and waits for the batch ahead instead.
PIPELINE_MIN = 100
#: Pause before sending again after a failed publish (the bus reconnects meanwhile).
RETRY_PAUSE = 0.2

_Output = tuple[int, str, dict[str, Any]]


@dataclass
class _Batch:
    """Outputs handed to the client together, on the connection of ``generation``."""

    outputs: list[_Output]
    generation: int
    task: asyncio.Task[list[BaseException | None]]


class OutputLine:
    """Outputs numbered 1, 2, 3 … in the order ``submit`` saw them (see the module docstring)."""

    def __init__(self, bus: Bus, on_confirmed: Callable[[int], None] | None = None) -> None:
        self._bus = bus
        self._on_confirmed = on_confirmed
        #: Every output not yet confirmed, oldest first; the first ``_handed`` are out.
        self._waiting: deque[_Output] = deque()
        self._handed = 0
        self._out: deque[_Batch] = deque()
        self.submitted = 0
        self.confirmed = 0
        self.failures = 0
        self.dropped = 0
        #: Most batches seen out at once (how deep the pipeline actually got).
        self.most_in_flight = 0
        self._wake = asyncio.Event()
        self._progress = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="outputs")

    async def close(self) -> None:
        """Stop sending; whatever is unconfirmed is dropped (the caller decided it may be)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def submit(self, topic: str, payload: dict[str, Any]) -> int:
        """Queue one output; returns its number (confirmation comes in that order)."""
        self.submitted += 1
        self._waiting.append((self.submitted, topic, payload))
        self._wake.set()
        return self.submitted

    async def wait_confirmed(self, number: int | None = None) -> None:
        """Return once every output up to ``number`` (default: all submitted so far) is out."""
        target = self.submitted if number is None else number
        async with self._progress:
            await self._progress.wait_for(lambda: self.confirmed >= target)

    async def _run(self) -> None:
        try:
            while True:
                self._hand_out()
                if self._out and self._out[0].task.done():
                    if not await self._settle(self._out.popleft()):
                        await self._after_failure()
                    continue
                self._wake.clear()
                if (self._out and self._out[0].task.done()) or self._can_hand_out():
                    continue
                await self._wake.wait()  # a new output, or a batch settled
        finally:
            for batch in self._out:
                batch.task.cancel()

    def _can_hand_out(self) -> bool:
        ready = len(self._waiting) - self._handed
        if not self._out:
            return ready > 0
        return (
            ready >= PIPELINE_MIN
            and len(self._out) < IN_FLIGHT
            and self._out[-1].generation == self._bus.generation
        )

    def _hand_out(self) -> None:
        """Start batches of what is waiting while the pipeline has room (same connection)."""
        while self._can_hand_out():
            end = min(self._handed + BATCH, len(self._waiting))
            outputs = [self._waiting[i] for i in range(self._handed, end)]
            generation = self._bus.generation
            task = asyncio.create_task(self._publish(outputs, generation))
            task.add_done_callback(lambda _task: self._wake.set())
            self._out.append(_Batch(outputs, generation, task))
            self._handed = end
            self.most_in_flight = max(self.most_in_flight, len(self._out))

    async def _publish(self, outputs: list[_Output], generation: int) -> list[BaseException | None]:
        """Hand ``outputs`` to the client, unless the connection changed since they were
        batched (tasks start in creation order, so batches reach paho in order)."""
        if self._bus.generation != generation:
            return [BusError("the broker connection changed")] * len(outputs)
        return await self._bus.publish_many([(topic, payload) for _, topic, payload in outputs])

    async def _settle(self, batch: _Batch) -> bool:
        """Confirm the oldest batch's outputs up to its first failure; False if there was one."""
        try:
            results = batch.task.result()
        except Exception as exc:  # unexpected: count it as the broker's, so it is sent again
            results = [BusError(f"publish failed: {exc!r}")] * len(batch.outputs)
        done = 0
        for (number, topic, _), result in zip(batch.outputs, results, strict=True):
            if isinstance(result, BusError):
                break
            if isinstance(result, BaseException):
                # Not the broker's fault (e.g. an output the contract refuses): sending it
                # again cannot help, and holding it would stop the service's line for good.
                log.error("output %d on %s dropped: %s", number, topic, result)
                self.dropped += 1
            done += 1
        for _ in range(done):
            self._waiting.popleft()
        self._handed -= done
        if done:
            await self._advance(batch.outputs[done - 1][0])
        if done == len(batch.outputs):
            return True
        self.failures += 1
        log.warning(
            "output %d not accepted by the broker (%s); sending again from there",
            batch.outputs[done][0],
            results[done],
        )
        return False

    async def _after_failure(self) -> None:
        """Let every batch still out settle (nothing of theirs counts), then resend from the
        first unconfirmed output."""
        batches, self._out = list(self._out), deque()
        await asyncio.gather(*(b.task for b in batches), return_exceptions=True)
        self._handed = 0
        await asyncio.sleep(RETRY_PAUSE)

    async def _advance(self, confirmed: int) -> None:
        self.confirmed = confirmed
        if self._on_confirmed is not None:
            self._on_confirmed(confirmed)
        async with self._progress:
            self._progress.notify_all()
