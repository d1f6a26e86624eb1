"""A service's outputs on their way to the broker: pipelined, in order, confirmed, retried.

Why this exists: an input may be acknowledged to the broker only once every output it produced
has been accepted by the broker (DESIGN.md, "outputs before acks"), and a migration's checkpoint
completes only when every output of every applied input is out. Publishing one message per round
trip cannot keep up with thousands of inputs per second, so outputs go out in batches: every
output waiting is handed to the MQTT client at once (paho writes them in call order, so the
broker sees them in guest order), and the batch is confirmed when every PUBACK arrived.

A failed publish (the broker connection dropped) stops the line: nothing after it is confirmed,
and from the first unconfirmed output on the rest is sent again, in order, once the bus is back.
So an output may repeat after a broker failure, but it is never lost and never overtaken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from services.common.bus import Bus, BusError

log = logging.getLogger(__name__)

#: Most outputs handed to the client per round trip.
BATCH = 2000
#: Pause before sending again after a failed publish (the bus reconnects meanwhile).
RETRY_PAUSE = 0.2


class OutputLine:
    """Outputs numbered 1, 2, 3 … in the order ``submit`` saw them (see the module docstring)."""

    def __init__(self, bus: Bus, on_confirmed: Callable[[int], None] | None = None) -> None:
        self._bus = bus
        self._on_confirmed = on_confirmed
        self._waiting: deque[tuple[int, str, dict[str, Any]]] = deque()
        self.submitted = 0
        self.confirmed = 0
        self.failures = 0
        self.dropped = 0
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
        while True:
            if not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = [self._waiting[i] for i in range(min(BATCH, len(self._waiting)))]
            # Handed to paho in order (so the broker receives them in order), confirmed together.
            results = await self._bus.publish_many(
                [(topic, payload) for _, topic, payload in batch]
            )
            done = 0
            for (number, topic, _), result in zip(batch, results, strict=True):
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
            if done:
                await self._advance(batch[done - 1][0])
            if done < len(batch):
                self.failures += 1
                log.warning(
                    "output %d not accepted by the broker (%s); sending again from there",
                    batch[done][0],
                    results[done],
                )
                await asyncio.sleep(RETRY_PAUSE)

    async def _advance(self, confirmed: int) -> None:
        self.confirmed = confirmed
        if self._on_confirmed is not None:
            self._on_confirmed(confirmed)
        async with self._progress:
            self._progress.notify_all()
