"""One service instance on this node: its guest plus the data plane between the guest and MQTT.

Lossless hand-over rests on two rules enforced here:
- input is read through the service's own persistent MQTT session (client ``ferry-svc-{service}``)
  and each message is acknowledged only after the guest reported it ``DONE``; whatever is not
  acknowledged when this node lets go of the session is redelivered to the next owner;
- a checkpoint is requested only after input forwarding stopped, and the guest answers it in stream
  order, so the document covers exactly the inputs acknowledged here. The watermark inside the
  document makes the next owner drop any redelivered input that was already applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from services.common import topics
from services.common.bus import Bus, Inbound, now_ms
from services.common.config import BrokerConfig
from services.executor import guest_log
from services.executor.channel import Frame, FrameType
from services.executor.runtime import Guest, LaunchSpec, Runtime

log = logging.getLogger(__name__)

SESSION_EXPIRY = 7 * 24 * 3600
DRAIN_TIMEOUT = 10.0


def session_client_id(service: str) -> str:
    """The MQTT client id that owns a service's input session, whichever node serves it."""
    return f"ferry-svc-{service}"


@dataclass
class Checkpoint:
    """What a checkpoint produced, before upload: an app-level document or a whole image file."""

    document: bytes | None
    image_file: Path | None
    watermark: dict[str, int]
    paused_at: float
    drain_ms: float
    checkpoint_ms: float


class InstanceError(Exception):
    """The instance cannot do what was asked in its current state; ``code`` is for the reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Instance:
    """A guest serving one service on this node (see the module docstring)."""

    def __init__(
        self,
        *,
        node: str,
        service: str,
        instance_id: str,
        app: str,
        runtime: Runtime,
        spec: LaunchSpec,
        broker: BrokerConfig,
        node_bus: Bus,
        on_failure: Callable[[Instance], None] | None = None,
    ) -> None:
        self.node = node
        self._on_failure = on_failure
        self._stopping = False
        self._watchdog: asyncio.Task[None] | None = None
        self.service = service
        self.instance_id = instance_id
        self.app = app
        self.runtime = runtime
        self.spec = spec
        self.state = "booting"
        self.applied = 0
        self.dropped = 0
        self.guest: Guest | None = None
        self._broker = broker
        self._node_bus = node_bus
        self._session: Bus | None = None
        self._pump: asyncio.Task[None] | None = None
        self._in_flight: deque[Inbound] = deque()
        self._drained = asyncio.Event()
        self._drained.set()
        self._outputs: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._publisher: asyncio.Task[None] | None = None
        self.exit_reason: str | None = None
        self.restored_at = 0.0

    def summary(self) -> dict[str, Any]:
        """This instance as the node status reports it."""
        return {
            "service": self.service,
            "instance": self.instance_id,
            "app": self.app,
            "runtime": self.runtime.name,
            "state": self.state,
            "applied": self.applied,
            **({"reason": self.exit_reason} if self.state == "failed" and self.exit_reason else {}),
        }

    # -- life cycle -------------------------------------------------------------------------

    async def boot(self, fresh: bool) -> None:
        """Get the guest ready: it waits (state ``waiting``) for START or its state.

        A whole-image runtime has nothing to boot for a migration target (its state *is* the
        guest): ``prepare`` only readies what makes ``launch_from`` quick.
        """
        self._publisher = asyncio.create_task(self._publish_outputs())
        if self.runtime.whole_image and not fresh:
            await self.runtime.prepare(self.spec)
        else:
            self._adopt(await self.runtime.launch(self.spec))
        self.state = "waiting"

    def _adopt(self, guest: Guest) -> None:
        self.guest = guest
        guest.channel.on_event = self._on_guest_frame
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = asyncio.create_task(self._watch(guest))

    async def _watch(self, guest: Guest) -> None:
        """Notice a guest that ends on its own (crash, app failure) and report it once."""
        try:
            exited = await guest.channel.wait_exited()
            reason = f"guest exited: {exited}"
        except Exception as exc:
            reason = f"guest channel lost: {exc}"
        if self._stopping or self.guest is not guest or self.state == "paused":
            return  # ours to end, replaced by a restored copy, or captured on purpose
        log.warning("%s: %s", self.instance_id, reason)
        self.exit_reason = guest_log.explain_guest(reason, self.spec.workdir, self.runtime)
        self.state = "failed"
        self._drained.set()
        if self._on_failure is not None:
            self._on_failure(self)

    async def start_fresh(self, params: dict[str, Any]) -> None:
        guest = self._require("waiting")
        await guest.channel.start(params)
        await self.attach_input()

    async def restore(self, document: bytes) -> float:
        """Hand the state to the waiting guest and take over the input session.

        Returns the wall-clock time (ms) at which input flows again: the end of downtime.
        """
        guest = self._require("waiting")
        await guest.channel.restore(document)
        self.restored_at = time.time() * 1000
        await self.attach_input()
        return time.time() * 1000

    async def restore_image(self, image_file: Path) -> float:
        """Whole-image runtimes: rebuild the guest from its image, then take over the input."""
        if self.state != "waiting":
            raise InstanceError("wrong_state", f"instance {self.instance_id} is {self.state}")
        self._adopt(await self.runtime.launch_from(self.spec, image_file))
        self.restored_at = time.time() * 1000
        await self.attach_input()
        return time.time() * 1000

    async def checkpoint(self) -> Checkpoint:
        """Stop taking input, let in-flight input finish, and capture the state between steps."""
        guest = self._require("serving")
        paused_at = time.time() * 1000
        started = time.perf_counter()
        await self.detach_input()
        self.state = "paused"
        drained = time.perf_counter()
        document: bytes | None = None
        image_file: Path | None = None
        if self.runtime.whole_image:
            image_file = await self.runtime.capture(guest, self.spec)
            watermark: dict[str, int] = {}
        else:
            document = await guest.channel.checkpoint(now_ms(), pause=True)
            watermark = _watermark_of(document)
        checkpoint_ms = (time.perf_counter() - drained) * 1000
        drain_ms = (drained - started) * 1000
        return Checkpoint(document, image_file, watermark, paused_at, drain_ms, checkpoint_ms)

    async def resume(self) -> None:
        """Roll back a checkpoint: the paused guest takes its input session back."""
        if self.state == "serving":
            return
        guest = self._require("paused")
        if self.runtime.whole_image:
            self._adopt(await self.runtime.resume_captured(guest, self.spec))
        else:
            await guest.channel.resume()
        await self.attach_input()

    async def stop(self) -> None:
        """Stop the guest for good (idempotent); unacknowledged input stays with the broker."""
        if self.state == "stopped":
            return
        self._stopping = True
        await self.detach_input()
        if self.guest is not None:
            if self.guest.channel.alive:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.guest.channel.stop(), 2.0)
            await self.runtime.terminate(self.guest)
        else:
            await self.runtime.unprepare(self.spec)
        if self._publisher is not None:
            await self._outputs.join()
            self._publisher.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.state = "stopped"

    def _require(self, state: str) -> Guest:
        if self.state != state or self.guest is None:
            raise InstanceError(
                "wrong_state",
                f"instance {self.instance_id} of {self.service} is {self.state}, not {state}",
            )
        return self.guest

    # -- data plane -------------------------------------------------------------------------

    async def attach_input(self) -> None:
        """Take over the service's persistent input session and start forwarding input."""
        self._session = Bus(
            self._broker,
            session_client_id(self.service),
            session_expiry=SESSION_EXPIRY,
            manual_ack=True,
        )
        await self._session.__aenter__()
        await self._session.subscribe(topics.app_input(self.service), qos=1)
        self._pump = asyncio.create_task(self._forward_input(self._session))
        self.state = "serving"

    async def detach_input(self) -> None:
        """Stop forwarding, wait for every forwarded input to be DONE (and acked), let go."""
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            self._pump = None
        try:
            await asyncio.wait_for(self._drained.wait(), DRAIN_TIMEOUT)
        except TimeoutError:
            log.error("%s: guest did not finish in-flight input", self.instance_id)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _forward_input(self, session: Bus) -> None:
        assert self.guest is not None
        channel = self.guest.channel
        async for message in session.messages():
            payload = message.payload
            self._in_flight.append(message)
            self._drained.clear()
            channel.send_input(payload["producer"], payload["seq"], payload["data"])

    def _on_guest_frame(self, frame: Frame) -> None:
        frame_type, body = frame.type, frame.json()
        if frame_type == FrameType.OUTPUT:
            self._outputs.put_nowait(body)
        elif frame_type == FrameType.DONE:
            message = self._in_flight.popleft() if self._in_flight else None
            if message is not None and self._session is not None:
                self._session.ack(message)
            if not self._in_flight:
                self._drained.set()
            if body.get("applied"):
                self.applied += 1
            else:
                self.dropped += 1
        elif frame_type == FrameType.LOG:
            log.info("%s: guest: %s", self.instance_id, body.get("msg"))
        elif frame_type == FrameType.ERROR:
            self.exit_reason = str(body.get("message") or body)

    async def _publish_outputs(self) -> None:
        """Publish guest outputs in the order the guest produced them."""
        while True:
            body = await self._outputs.get()
            try:
                await self._node_bus.publish(
                    topics.app_output(self.service),
                    {
                        "service": self.service,
                        "node": self.node,
                        "producer": body.get("source"),
                        "seq": body.get("seq"),
                        "data": body.get("payload") or {},
                        "time": now_ms(),
                    },
                )
            except Exception as exc:
                log.warning("%s: output not published: %s", self.instance_id, exc)
            finally:
                self._outputs.task_done()


def _watermark_of(document: bytes) -> dict[str, int]:
    try:
        watermark = orjson.loads(document).get("watermark") or {}
    except (orjson.JSONDecodeError, AttributeError):
        return {}
    return {str(k): int(v) for k, v in watermark.items()}
