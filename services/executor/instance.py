"""One service instance on this node: its guest plus the data plane between the guest and MQTT.

Exactly-once through crashes rests on these rules, enforced here (DESIGN.md, "safe to forget"):
- input is read through the service's own persistent MQTT session (client ``ferry-svc-{service}``)
  and a message is acknowledged only when it is safe to forget: every output it produced has been
  accepted by the broker (``OutputLine``) and a durable checkpoint covering it is stored in S3 and
  recorded by the statestore. Whatever is unacknowledged when this node lets go of the session (or
  dies) is redelivered to the next owner, which restores the latest recorded checkpoint; the
  watermark inside it drops what was already applied;
- a checkpoint is answered by the guest in stream order, so it covers exactly the inputs sent
  before its request (``covers``), and every output of those inputs precedes it;
- the input session never reconnects on its own: the service may have moved meanwhile, and
  taking the session back would take it from the rightful owner. The executor decides
  (``on_session_lost``).

Without periodic checkpoints (``checkpoint_interval = 0``, or a runtime whose capture is a whole
image: ``CaptureForm.periodic``) an input is acknowledged once its outputs are out: a migration
is still lossless, a crash loses the state.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

from services.common import contract, topics
from services.common.blobstore import BlobRef
from services.common.bus import (
    Bus,
    BusError,
    EarlyConnection,
    Inbound,
    RemoteError,
    now_ms,
    open_connection,
)
from services.common.config import BrokerConfig
from services.common.messages import BlobRefDoc
from services.common.states import InstanceState
from services.executor import guest_log
from services.executor.capture import Capture
from services.executor.channel import ChannelError, Frame, FrameType, GuestError
from services.executor.outputs import OutputLine
from services.executor.runtime import Guest, LaunchSpec, Runtime

log = logging.getLogger(__name__)

SESSION_EXPIRY = 7 * 24 * 3600
DRAIN_TIMEOUT = 10.0
SLOW_STAGE = 1.0  # seconds; a slower stage of stopping is logged
# A stop (10 + 2 for the guest + 3 s) answers well within the scheduler's phase timeout (30 s).
LEAVE_TIMEOUT = 10.0
LAST_OUTPUTS_TIMEOUT = 3.0
#: Inputs the broker may deliver before the first is acknowledged (MQTT 5 Receive Maximum):
#: room for a checkpoint interval of input (checkpoint_inputs triggers at half of it), and small
#: enough that what a next owner gets redelivered at once does not swamp it.
RECEIVE_MAXIMUM = 8192
#: Inputs sent to the guest ahead of its DONEs. Bounds the drain before a move's checkpoint
#: (the rest waits in the broker, unacknowledged) without starving a fast guest.
FORWARD_WINDOW = 512
#: A dead letter carries the refused input itself up to this size.
DEAD_LETTER_COPY = 4096
#: A dropped input this far below its producer's watermark looks like a restarted producer.
RESET_GAP = 1000
#: Joins producer and incarnation into the guest's name of a sequence (see ``sequence_of``).
INCARNATION_MARK = "#"


def session_client_id(service: str) -> str:
    """The MQTT client id that owns a service's input session, whichever node serves it."""
    return f"ferry-svc-{service}"


@dataclass(frozen=True)
class CheckpointPolicy:
    """When a serving instance takes a durable checkpoint (0 turns a trigger off)."""

    interval: float = 1.0
    inputs: int = 4000

    @property
    def durable(self) -> bool:
        return self.interval > 0 or self.inputs > 0


#: Makes an instance its service's owner before it forwards input (a restore's claim): True
#: claimed, False another instance owns the service, None not known (statestore unreachable).
Claim = Callable[[], Awaitable[bool | None]]


class Keeper(Protocol):
    """Where checkpoints go: the executor uploads to S3 and records with the statestore."""

    async def upload(self, instance: Instance, capture: Capture, migration: str | None) -> BlobRef:
        """Store the capture; returns its blob reference."""
        ...

    async def record(
        self,
        instance: Instance,
        ref: BlobRef,
        watermark: dict[str, int],
        taken_at: float,
        migration: str | None,
    ) -> None:
        """Make ``ref`` the service's recovery point; RemoteError ``not_owner`` if fenced."""
        ...


@dataclass
class Checkpoint:
    """What a migration checkpoint produced, before upload: the runtime's capture and when and
    how fast it was taken."""

    capture: Capture
    paused_at: float
    drain_ms: float
    checkpoint_ms: float
    #: Inputs sent to the guest before the checkpoint: the ones it covers.
    covers: int = 0


class InstanceError(Exception):
    """The instance cannot do what was asked in its current state; ``code`` is for the reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Applied:
    """An input the guest finished, waiting to be acknowledged."""

    index: int
    output_mark: int
    message: Inbound
    session: Bus


def _ack(entries: list[_Applied]) -> None:
    """Acknowledge ``entries`` at once, per input session (in order within each)."""
    by_session: dict[int, tuple[Bus, list[Inbound]]] = {}
    for entry in entries:
        by_session.setdefault(id(entry.session), (entry.session, []))[1].append(entry.message)
    for session, messages in by_session.values():
        session.ack_many(messages)


@dataclass
class ProducerCounts:
    """What happened to one producer's inputs here (reported in the node status)."""

    applied: int = 0
    dropped: int = 0
    last_seq: int = 0
    #: The highest seq handed to the guest (ahead of ``last_seq`` by what is in flight).
    sent_seq: int = 0
    reset_reported: bool = False

    def summary(self) -> dict[str, int]:
        return {"applied": self.applied, "dropped": self.dropped, "last_seq": self.last_seq}


@dataclass
class _Durability:
    """Bookkeeping of the periodic checkpoints."""

    requested: int = 0
    acknowledged: int = 0
    taken: int = 0
    failed: int = 0
    last_error: str | None = None
    last_ref: BlobRefDoc | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)


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
        keeper: Keeper,
        policy: CheckpointPolicy,
        max_input_bytes: int,
        on_failure: Callable[[Instance], None] | None = None,
        on_session_lost: Callable[[Instance], None] | None = None,
    ) -> None:
        self.node = node
        self.service = service
        self.instance_id = instance_id
        self.app = app
        self.runtime = runtime
        self.spec = spec
        self.state: InstanceState = InstanceState.BOOTING
        self.applied = 0
        self.dropped = 0
        self.refused = 0
        self.producers: dict[str, ProducerCounts] = {}
        self.guest: Guest | None = None
        self.exit_reason: str | None = None
        self.restored_at = 0.0
        self.paused_since: float | None = None
        self._broker = broker
        self._node_bus = node_bus
        self._keeper = keeper
        self._policy = policy if runtime.capture_form.periodic else CheckpointPolicy(0, 0)
        self._max_input_bytes = max_input_bytes
        self._on_failure = on_failure
        self._on_session_lost = on_session_lost
        self._stopping = False
        self._watchdog: asyncio.Task[None] | None = None
        #: The input session's connection, opened while a move's target pre-boots (``boot``).
        self._early_connection: EarlyConnection | None = None
        self._session: Bus | None = None
        self._pump: asyncio.Task[None] | None = None
        self._durable_task: asyncio.Task[None] | None = None
        self._resubscribing: asyncio.Future[None] | None = None  # held: see _open_session
        self._capture = asyncio.Lock()
        self._sent = 0
        self._forwarded: deque[tuple[int, Inbound, Bus]] = deque()
        self._applied: deque[_Applied] = deque()
        #: Redeliveries the guest would drop, not sent to it; acknowledged like applied input.
        self._skipped: deque[_Applied] = deque()
        self._drained = asyncio.Event()
        self._drained.set()
        self._window_open = asyncio.Event()
        self._window_open.set()
        self._durability = _Durability()
        self.outputs = OutputLine(node_bus, self._outputs_confirmed)

    def summary(self) -> dict[str, Any]:
        """This instance as the node status reports it."""
        summary: dict[str, Any] = {
            "service": self.service,
            "instance": self.instance_id,
            "app": self.app,
            "runtime": self.runtime.name,
            "state": self.state,
            "applied": self.applied,
            "dropped": self.dropped,
            "refused": self.refused,
            "unacknowledged": self._sent - self._durability.acknowledged
            if self._policy.durable
            else len(self._applied) + len(self._forwarded),
            "checkpoints": self._durability.taken,
        }
        if self.producers:
            summary["producers"] = {p: c.summary() for p, c in self.producers.items()}
        if self.exit_reason:
            summary["reason"] = self.exit_reason
        return summary

    @property
    def durable_failures(self) -> int:
        """Periodic checkpoints that failed (metrics; the status reports only those taken)."""
        return self._durability.failed

    # -- life cycle -------------------------------------------------------------------------

    async def boot(self, fresh: bool) -> None:
        """Get the guest ready: it waits (state ``waiting``) for START or its state.

        For a migration target the runtime ``prepare``s: a whole-image runtime has no guest to
        boot yet (its capture *is* the guest), only what makes ``restore`` quick.
        """
        self.outputs.start()
        if not fresh:
            # The restore's attach, inside the downtime, then only sends CONNECT (no handshake).
            self._early_connection = open_connection(self._broker, session_client_id(self.service))
        guest = await (self.runtime.launch(self.spec) if fresh else self.runtime.prepare(self.spec))
        if guest is not None:
            self._adopt(guest)
        self.state = InstanceState.WAITING

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
        if self._stopping or self.guest is not guest or self.state == InstanceState.PAUSED:
            return  # ours to end, replaced by a restored copy, or captured on purpose
        log.warning("%s: %s", self.instance_id, reason)
        self.exit_reason = guest_log.explain_guest(
            self.exit_reason or reason, self.spec.workdir, self.runtime
        )
        self.state = InstanceState.FAILED
        self._drained.set()
        await self._let_go()
        if self._on_failure is not None:
            self._on_failure(self)

    async def start_fresh(self, params: dict[str, Any], claim: Claim | None = None) -> None:
        """Start the app with empty state and serve (with ``claim``: see ``attach_input``)."""
        guest = self._require(InstanceState.WAITING)
        await guest.channel.start(params)
        await self.attach_input(claim)

    async def restore(self, capture: Capture, claim: Claim | None = None) -> float:
        """Restore the guest from ``capture`` and take over the input session.

        ``claim`` makes this instance the service's owner (see ``attach_input``). Returns the
        wall-clock time (ms) at which input flows again: the end of downtime.
        """
        if self.state != InstanceState.WAITING:
            raise InstanceError(
                "wrong_state",
                f"instance {self.instance_id} of {self.service} is {self.state}, "
                f"not {InstanceState.WAITING}",
            )
        self._adopt(await self.runtime.restore(self.spec, self.guest, capture))
        for producer, seq in capture.watermark.items():
            self._producer(producer).last_seq = seq
        self.restored_at = time.time() * 1000
        await self.attach_input(claim)
        return time.time() * 1000

    async def checkpoint(self) -> Checkpoint:
        """For a move: stop taking input, let in-flight input finish, capture between steps.

        The session stays open (not forwarding) until ``release``: acknowledgements still need it.
        """
        guest = self._require(InstanceState.SERVING)
        paused_at = time.time() * 1000
        started = time.perf_counter()
        await self._stop_forwarding()
        async with self._capture:
            self.state = InstanceState.PAUSED
            self.paused_since = time.monotonic()
            drained = time.perf_counter()
            covers = self._sent
            capture = await self.runtime.checkpoint(guest, self.spec)
        checkpoint_ms = (time.perf_counter() - drained) * 1000
        drain_ms = (drained - started) * 1000
        return Checkpoint(capture, paused_at, drain_ms, checkpoint_ms, covers)

    async def release(self, covers: int, record: Awaitable[None] | None) -> None:
        """After a move's checkpoint is stored: make it the recovery point, acknowledge what it
        covers, and let go of the session (a no-op for acks the broker no longer expects)."""
        try:
            if record is not None:
                await record
            self.acknowledge(covers)
        except (RemoteError, BusError) as exc:
            # Unacknowledged input is redelivered to the next owner, which drops what its
            # checkpoint's watermark covers: nothing is lost, only sent again.
            log.warning("%s: move checkpoint not recorded (%s)", self.instance_id, exc)
        finally:
            if self.state == InstanceState.PAUSED:
                await self._close_session()

    async def resume(self) -> None:
        """Roll back a checkpoint: the paused guest takes its input session back."""
        if self.state == InstanceState.SERVING:
            return
        guest = self._require(InstanceState.PAUSED)
        self._adopt(await self.runtime.resume(guest, self.spec))
        self.paused_since = None
        await self.attach_input()

    async def stop(self) -> None:
        """Stop the guest for good (idempotent); unacknowledged input stays with the broker."""
        if self.state == InstanceState.STOPPED:
            return
        self._stopping = True
        if self._early_connection is not None:
            self._early_connection.close()
            self._early_connection = None
        try:  # bounded: the whole stop must answer within the scheduler's request timeout
            await asyncio.wait_for(self._let_go(), LEAVE_TIMEOUT)
        except TimeoutError:
            log.error(
                "%s: leaving the input session took over %g s; stopping the guest anyway "
                "(its unacknowledged input stays with the broker)",
                self.instance_id,
                LEAVE_TIMEOUT,
            )
        with self._timed("ending the guest"):
            if self.guest is not None:
                if self.guest.channel.alive:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self.guest.channel.stop(), 2.0)
                await self.runtime.terminate(self.guest)
            else:
                await self.runtime.unprepare(self.spec)
        with self._timed("sending the last outputs"), contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.outputs.wait_confirmed(), LAST_OUTPUTS_TIMEOUT)
        await self.outputs.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.state = InstanceState.STOPPED

    @contextlib.contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        """Log a stage of stopping that took long: a stop must fit the scheduler's timeout."""
        started = time.monotonic()
        yield
        took = time.monotonic() - started
        if took > SLOW_STAGE:
            log.warning("%s: %s took %.1f s", self.instance_id, stage, took)

    def _require(self, state: InstanceState) -> Guest:
        if self.state != state or self.guest is None:
            raise InstanceError(
                "wrong_state",
                f"instance {self.instance_id} of {self.service} is {self.state}, not {state}",
            )
        return self.guest

    # -- data plane -------------------------------------------------------------------------

    async def attach_input(self, claim: Claim | None = None) -> None:
        """Take over the service's persistent input session and start forwarding input.

        With a ``claim`` (a restore), no input is forwarded until it says this instance owns
        the service; it runs alongside the session's connect, so it costs downtime only when
        the statestore is slower than the broker. Claim lost: InstanceError ``fenced``. Claim
        not known (statestore unreachable) or session not open: the instance is ``detached``
        and asks again who owns the service, like one whose session dropped.
        """
        await self._close_session()
        opening = asyncio.ensure_future(self._open_session())
        claiming = asyncio.ensure_future(claim()) if claim is not None else None
        if claiming is not None:
            await asyncio.wait({opening, claiming}, return_when=asyncio.FIRST_COMPLETED)
            if claiming.done() and claiming.result() is not True and not opening.done():
                # Lost (or unanswered) before the session opened: stop opening it, rather than
                # fight the owner for it (each attempt it takes back costs a subscribe timeout).
                opening.cancel()
                with contextlib.suppress(asyncio.CancelledError, BusError):
                    await opening
                await self._detach_unless_fenced(claiming.result(), "the statestore did not answer")
        try:
            session = await opening
        except BusError as exc:
            if claiming is None:
                raise
            await self._detach_unless_fenced(await claiming, f"input session not open: {exc}")
        if claiming is not None:
            owner = await claiming
            if owner is not True:
                await session.close()
                await self._detach_unless_fenced(owner, "the statestore did not answer")
        self._session = session
        self._pump = asyncio.create_task(self._forward_input(session))
        if self._policy.durable and self._durable_task is None:
            self._durable_task = asyncio.create_task(self._keep_durable())
        self.state = InstanceState.SERVING

    async def _detach_unless_fenced(self, owner: bool | None, why: str) -> NoReturn:
        """After a claim that did not end in a serving instance: raise ``fenced`` if another
        instance owns the service, else go ``detached`` (the node asks again who owns it)."""
        if owner is False:
            raise InstanceError(
                "fenced",
                f"instance {self.instance_id} lost its claim on {self.service}: the record "
                "moved on (rolled back, or its source claimed it back); it never served",
            )
        self.state = InstanceState.DETACHED
        if self._on_session_lost is not None:
            self._on_session_lost(self)
        raise InstanceError(
            "detached",
            f"instance {self.instance_id} of {self.service} is restored but not serving yet "
            f"({why}); it serves once the statestore says it owns the service",
        )

    async def _open_session(self) -> Bus:
        """Connect and subscribe the service's input session (nothing is forwarded yet)."""
        for attempt in range(3):
            early, self._early_connection = self._early_connection, None
            session = Bus(
                self._broker,
                session_client_id(self.service),
                session_expiry=SESSION_EXPIRY,
                manual_ack=True,
                connection=early,
                validate_inbound=False,  # checked here, so a refusal names service, producer, seq
                receive_maximum=RECEIVE_MAXIMUM,
                on_lost=self._session_lost,
            )
            await session.__aenter__()
            subscribing = session.subscribe(
                topics.app_input(self.service), topics.app_input_from(self.service, "+")
            )
            if session.session_present:
                # The broker resumed the session with its subscriptions and starts delivering
                # its queue at once; the SUBACK of subscribing again would come only after that
                # backlog (≈ 0.1 s at 5000 inputs/s, inside the downtime). Subscribing again
                # still matters (a session an older executor made), just not before we forward.
                self._resubscribing = asyncio.ensure_future(subscribing)
                self._resubscribing.add_done_callback(
                    functools.partial(self._resubscribed, session=session)
                )
                return session
            try:
                await subscribing
                return session
            except asyncio.CancelledError:
                await session.close()
                raise
            except BusError:
                # Taken from us between connect and subscribe (another client with the same
                # id): try again a couple of times before giving up.
                await session.close()
                if attempt == 2:
                    raise
                await asyncio.sleep(0.1)
        raise AssertionError("unreachable")

    def _resubscribed(self, task: asyncio.Future[None], session: Bus) -> None:
        """A resumed session's subscribe again ended: only a failure of the session still in
        use is news (one closed meanwhile, by a move or a lost claim, fails it as planned; a
        lost connection is handled by ``_session_lost``)."""
        if self._session is not session or task.cancelled():
            return
        if task.exception() is not None:
            log.warning(
                "%s: subscribing its resumed input session again failed: %s",
                self.instance_id,
                task.exception(),
            )

    def _session_lost(self, exc: BaseException) -> None:
        if self.state != InstanceState.SERVING or self._stopping:
            return  # paused for a move: the target took the session over, as planned
        self.state = InstanceState.DETACHED
        if self._pump is not None:
            self._pump.cancel()
        if self._on_session_lost is not None:
            self._on_session_lost(self)

    async def _stop_forwarding(self) -> None:
        """Stop forwarding and wait until every forwarded input is DONE."""
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            self._pump = None
        if self.state == InstanceState.FAILED:
            return  # a dead guest finishes nothing: its unfinished input stays with the broker
        try:
            await asyncio.wait_for(self._drained.wait(), DRAIN_TIMEOUT)
        except TimeoutError:
            log.error("%s: guest did not finish in-flight input", self.instance_id)

    async def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _let_go(self) -> None:
        """Stop forwarding and checkpointing and leave the session (unacked input stays)."""
        if self._durable_task is not None:
            self._durable_task.cancel()
            with (
                self._timed("ending periodic checkpoints"),
                contextlib.suppress(asyncio.CancelledError),
            ):
                await self._durable_task
            self._durable_task = None
        with self._timed("draining in-flight input"):
            await self._stop_forwarding()
        with self._timed("closing the input session"):
            await self._close_session()

    async def _forward_input(self, session: Bus) -> None:
        assert self.guest is not None
        channel = self.guest.channel
        async for message in session.messages():
            refusal = self._refusal(message)
            if refusal is not None:
                await self._dead_letter(session, message, refusal)
                continue
            if self._policy.durable and self._already_applied(message.payload):
                # A takeover redelivers what the last owner had not acknowledged yet (up to a
                # checkpoint interval of input): the restored watermark covers it, so the guest
                # would only drop it. Skipping the round trip keeps it from delaying new input.
                self._sent += 1
                self._skipped.append(_Applied(self._sent, self.outputs.submitted, message, session))
                continue
            if len(self._forwarded) >= FORWARD_WINDOW:
                self._window_open.clear()
                await self._window_open.wait()
            payload = message.payload
            self._sent += 1
            self._forwarded.append((self._sent, message, session))
            self._drained.clear()
            name = sequence_of(payload)
            try:
                channel.send_input(name, payload["seq"], payload["data"])
            except ChannelError as exc:  # e.g. larger than a frame: never reached the guest
                self._forwarded.pop()
                self._sent -= 1
                if not self._forwarded:
                    self._drained.set()
                await self._dead_letter(session, message, str(exc))
                continue
            counts = self._producer(name)
            counts.sent_seq = max(counts.sent_seq, payload["seq"])
            if (
                self._policy.inputs
                and self._sent - self._durability.requested >= self._policy.inputs
            ):
                self._durability.wake.set()

    def _refusal(self, message: Inbound) -> str | None:
        """Why this input must not reach the guest, or None."""
        if message.size > self._max_input_bytes:
            return f"input of {message.size} bytes exceeds the limit of {self._max_input_bytes}"
        try:
            contract.validate(message.topic, message.payload)
        except contract.ContractError as exc:
            return str(exc)
        allowed = topics.producer_of_topic(message.topic)
        if allowed is not None and message.payload["producer"] != allowed:
            return (
                f"producer {message.payload['producer']!r} sent on {message.topic}, which only "
                f"{allowed!r} may use: a publisher speaks only for the producer its topic names"
            )
        return None

    async def _dead_letter(self, session: Bus, message: Inbound, reason: str) -> None:
        """Set a refused input aside where operators look, then acknowledge it."""
        self.refused += 1
        payload = message.payload
        producer = payload.get("producer") if isinstance(payload.get("producer"), str) else None
        seq = payload.get("seq") if isinstance(payload.get("seq"), int) else None
        letter: dict[str, Any] = {
            "service": self.service,
            "node": self.node,
            "producer": producer,
            "seq": seq,
            "reason": reason,
            "size": message.size,
            "time": now_ms(),
        }
        if message.size <= DEAD_LETTER_COPY:
            letter["input"] = payload
        log.warning("%s: refused input %s/%s: %s", self.instance_id, producer, seq, reason)
        try:
            await self._node_bus.publish(topics.app_dead_letters(self.service), letter)
        except BusError as exc:
            log.warning("%s: dead letter not published (%s); input stays queued", self.service, exc)
            return
        reported = await self._node_bus.report(
            message.topic,
            f"{self.service}: input refused: {reason}",
            service=self.service,
            producer=producer,
            seq=seq,
        )
        if reported:  # else it stays queued: set aside again, and reported, on redelivery
            session.ack(message)

    def _producer(self, producer: str) -> ProducerCounts:
        counts = self.producers.get(producer)
        if counts is None:
            counts = self.producers[producer] = ProducerCounts()
        return counts

    def _on_guest_frame(self, frame: Frame) -> None:
        frame_type = frame.type
        if frame_type == FrameType.OUTPUT:
            output = output_message(self.service, self.node, frame.json())
            self.outputs.submit(topics.app_output(self.service), output)
        elif frame_type == FrameType.DONE:
            self._on_done(frame.json())
        elif frame_type == FrameType.LOG:
            log.info("%s: guest: %s", self.instance_id, frame.json().get("msg"))
        elif frame_type == FrameType.ERROR:
            body = frame.json()
            self.exit_reason = str(body.get("message") or body)

    def _on_done(self, body: dict[str, Any]) -> None:
        if self._forwarded:
            index, message, session = self._forwarded.popleft()
            self._applied.append(_Applied(index, self.outputs.submitted, message, session))
        if not self._forwarded:
            self._drained.set()
        if len(self._forwarded) < FORWARD_WINDOW // 2:
            self._window_open.set()
        producer = str(body.get("source"))
        seq = int(body.get("seq") or 0)
        counts = self._producer(producer)
        if body.get("applied"):
            self.applied += 1
            counts.applied += 1
            counts.last_seq = max(counts.last_seq, seq)
            counts.reset_reported = False
        else:
            self._count_drop(producer, counts, seq)
        if not self._policy.durable:
            self._outputs_confirmed(self.outputs.confirmed)

    def _already_applied(self, payload: dict[str, Any]) -> bool:
        """Is this input at or below what this instance knows its guest applied (the restored
        watermark, or an input the guest reported applied)? The guest's own watermark is never
        lower, so it would drop the input; counted as its drop would be."""
        producer = sequence_of(payload)
        counts = self.producers.get(producer)
        seq = int(payload["seq"])
        if counts is None or seq > counts.last_seq:
            return False
        self._count_drop(producer, counts, seq)
        return True

    def _count_drop(self, producer: str, counts: ProducerCounts, seq: int) -> None:
        self.dropped += 1
        counts.dropped += 1
        # Against the highest seq sent, not applied: with up to FORWARD_WINDOW inputs in the
        # guest, a reset that came right behind them looked only as far below as they were.
        watermark = max(counts.last_seq, counts.sent_seq)
        if watermark - seq >= RESET_GAP and not counts.reset_reported:
            counts.reset_reported = True
            self._report_reset(producer, seq, watermark)

    def _report_reset(self, producer: str, seq: int, watermark: int) -> None:
        """A producer far below its watermark has probably restarted its sequence: say so."""
        reason = (
            f"{self.service}: dropping input of {producer} seq {seq}, far below its "
            f"watermark {watermark}: did the producer restart its sequence? Inputs are "
            "applied once per (producer, incarnation, seq); a device that counts from 1 "
            "again after a reboot must send a higher incarnation"
        )
        report = self._node_bus.report(
            topics.app_input(self.service), reason, service=self.service, producer=producer, seq=seq
        )
        task = asyncio.get_running_loop().create_task(report)
        task.add_done_callback(lambda t: t.exception())

    def _outputs_confirmed(self, confirmed: int) -> None:
        """Without durable checkpoints: acknowledge inputs whose outputs are all out."""
        if self._policy.durable:
            return
        done: list[_Applied] = []
        while self._applied and self._applied[0].output_mark <= confirmed:
            done.append(self._applied.popleft())
        if done:
            _ack(done)
            self._durability.acknowledged = done[-1].index

    def acknowledge(self, covers: int) -> None:
        """Acknowledge every input up to number ``covers`` (a stored checkpoint covers them)."""
        done: list[_Applied] = []
        for waiting in (self._applied, self._skipped):
            while waiting and waiting[0].index <= covers:
                done.append(waiting.popleft())
        _ack(done)
        self._durability.acknowledged = max(self._durability.acknowledged, covers)

    # -- durable checkpoints ----------------------------------------------------------------

    async def _keep_durable(self) -> None:
        """Checkpoint a serving guest on the policy's schedule, in the background."""
        durability = self._durability
        interval = self._policy.interval or None
        task = asyncio.current_task()
        while True:
            # A stop cancels this task. Python 3.11's asyncio.wait_for (bus.request's, for the
            # statestore's reply in checkpoint_now) returns a result that arrived in the same
            # step as the cancel instead of raising it: without this check the loop would go
            # on, and the stop wait for it, until the executor exits.
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await durability.wake.wait()
            durability.wake.clear()
            if self.state != InstanceState.SERVING or self._sent == durability.requested:
                continue
            try:
                await self.checkpoint_now()
            except asyncio.CancelledError:
                raise
            except (RemoteError, BusError, ChannelError, GuestError, OSError) as exc:
                durability.failed += 1
                durability.last_error = str(exc)
                log.warning("%s: periodic checkpoint failed: %s", self.instance_id, exc)
            except Exception as exc:
                durability.failed += 1
                durability.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("%s: periodic checkpoint failed", self.instance_id)

    async def checkpoint_now(self) -> BlobRefDoc | None:
        """Take, store and record one checkpoint while serving, then acknowledge what it covers.

        The guest keeps applying input throughout; only the capture itself (one step boundary)
        holds it up. Returns the stored blob reference (None if the instance stopped serving).
        """
        async with self._capture:
            if self.state != InstanceState.SERVING or self.guest is None:
                return None
            covers = self._sent
            self._durability.requested = covers
            taken_at = time.time() * 1000
            # Only runtimes whose capture_form is periodic get here (the policy, checkpoint_now's
            # refusal): their guest answers a CHECKPOINT on its channel without pausing.
            capture = Capture.of_document(await self.guest.channel.checkpoint(now_ms()))
            output_mark = self.outputs.submitted
        ref = await self._keeper.upload(self, capture, None)
        await self.outputs.wait_confirmed(output_mark)
        await self._keeper.record(self, ref, capture.watermark, taken_at, None)
        self.acknowledge(covers)
        self._durability.taken += 1
        self._durability.last_ref = ref.to_dict()
        return self._durability.last_ref


def output_message(service: str, node: str, body: dict[str, Any]) -> dict[str, Any]:
    """A guest's OUTPUT as the wire carries it (app-output.schema.json): the input's producer,
    and its incarnation split back out of the guest's name of the sequence."""
    output: dict[str, Any] = {
        "service": service,
        "node": node,
        "producer": body.get("source"),
        "seq": body.get("seq"),
        "data": body.get("payload") or {},
        "time": now_ms(),
    }
    source = output["producer"]
    if isinstance(source, str) and INCARNATION_MARK in source:
        producer, _, incarnation = source.rpartition(INCARNATION_MARK)
        output["producer"], output["incarnation"] = producer, int(incarnation)
    return output


def sequence_of(payload: dict[str, Any]) -> str:
    """The guest's name of an input's sequence: the producer, or ``producer#incarnation``.

    The guest keeps one watermark per name, so a producer's new incarnation (a reboot that
    counts from 1 again) starts a sequence of its own. ``#`` cannot occur in a producer name.
    """
    incarnation = payload.get("incarnation")
    producer = str(payload["producer"])
    return producer if incarnation is None else f"{producer}{INCARNATION_MARK}{incarnation}"
