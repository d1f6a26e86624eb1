"""The message bus every Ferry service uses: one MQTT v5 connection with validated JSON payloads.

Why a wrapper over aiomqtt: every payload is checked against ``schemas/`` on send and on receive,
a malformed message is reported on ``ferry/v1/errors`` instead of killing the service, requests and
replies use MQTT 5 response topic + correlation data, and a lost broker connection is re-established
with backoff (resubscribing) without the service noticing more than a delay. What a component
``announce``s (its retained status) is published again after every reconnect: a broker that
restarted may have fired the component's last will or lost the retained message.

``manual_ack=True`` keeps QoS 1 messages unacknowledged until the service calls ``ack``; with a
persistent session (``session_expiry`` > 0) anything not acked is redelivered to whichever client
takes the session over next — that is how an app's input survives a migration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import aiomqtt
import orjson
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.client import MQTT_LOG_ERR, PUBACK
from paho.mqtt.client import error_string as mqtt_error
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from services.common import contract, tls, topics
from services.common.config import BrokerConfig

log = logging.getLogger(__name__)

# CONNACK reason codes that no retry can fix: bad client id, bad login, not authorized, banned,
# bad authentication method (MQTT 5, 3.2.2.2).
LOGIN_REFUSED = frozenset({0x85, 0x86, 0x87, 0x8A, 0x8C})
#: s a publish waits for its PUBACK before it counts as failed.
PUBLISH_TIMEOUT = 10.0
#: Bytes taken off the broker connection per read (see ``_FastSocket``).
READ_SIZE = 256 * 1024
#: A PUBACK with reason "success" and no properties (MQTT 5, 3.4.2.1): type, length 2, mid.
_PUBACK = struct.Struct("!BBH")


class BusError(Exception):
    """The broker could not be reached, or a publish/subscribe failed."""


class RequestTimeout(BusError):
    """No reply arrived within the timeout; the request may or may not have been carried out."""


class RemoteError(Exception):
    """The other side answered a request with an error; ``code`` is machine-readable."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details or {}


@dataclass(frozen=True)
class Inbound:
    """One received, decoded and validated message."""

    topic: str
    payload: dict[str, Any]
    retain: bool = False
    response_topic: str | None = None
    correlation: bytes | None = None
    mid: int = 0
    qos: int = 0
    generation: int = 0
    received: float = field(default_factory=time.time)
    #: Bytes of the payload as it came off the wire.
    size: int = 0


#: An early connection older than this is not used: Mosquitto drops a connection that sent no
#: CONNECT after its default keepalive (60 s, times 1.5); a target uses it within seconds.
EARLY_CONNECTION_MAX_AGE = 30.0


class EarlyConnection:
    """A TCP (and TLS) connection to the broker, opened before its ``Bus`` needs it.

    Why: a migration's target connects the service's input session inside the downtime, and
    over TLS the handshake is most of that connect (≈ 2.4 ms resumed on an idle host, far more
    on a busy one). Opened while the target pre-boots, only MQTT's CONNECT is left for the
    downtime. Nothing is sent on it before the ``Bus`` takes it (no session is taken over).
    """

    def __init__(self, task: asyncio.Future[Any]) -> None:
        self._task = task
        self._opened = time.monotonic()

    def take(self) -> Any | None:
        """The socket if it is open and fresh (then it is the caller's), else None (closed)."""
        if not self._task.done() or self._task.cancelled() or self._task.exception():
            self.close()
            return None
        sock = self._task.result()
        if time.monotonic() - self._opened > EARLY_CONNECTION_MAX_AGE or not _still_open(sock):
            with contextlib.suppress(OSError):
                sock.close()
            return None
        return sock

    def close(self) -> None:
        """Drop it unused (a connection never taken is closed; one still opening, once open)."""
        if not self._task.done():
            self._task.add_done_callback(_close_opened)
            return
        _close_opened(self._task)


def _still_open(sock: Any) -> bool:
    """Whether the broker still holds this CONNECT-less connection open: nothing readable but
    TLS session tickets. A closed one would cost its bus a CONNACK timeout, not a quick retry
    (paho reports an end of stream before CONNACK to nobody)."""
    try:
        sock.setblocking(False)  # as paho sets it once it has the socket
        # Over TLS this reads the session tickets; no application data is due before CONNECT.
        data = sock.recv(1) if isinstance(sock, ssl.SSLSocket) else sock.recv(1, socket.MSG_PEEK)
    except (ssl.SSLWantReadError, BlockingIOError):
        return True
    except OSError:
        return False
    del data  # an end of stream (b"") or data before CONNECT: not a connection to use
    return False


def _first_then(sock: Any, create: Callable[[], Any]) -> Callable[[], Any]:
    """paho's socket factory that hands out ``sock`` once, then makes sockets as before."""
    given: list[Any] = [sock]
    return lambda: given.pop() if given else create()


def _close_opened(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is None:
        with contextlib.suppress(OSError):
            task.result().close()


def open_connection(broker: BrokerConfig, client_id: str) -> EarlyConnection:
    """Start opening a connection for a later ``Bus(broker, client_id, connection=...)``,
    made by paho exactly as that bus's own connect would make it (address, TLS, checks)."""
    paho = Bus(broker, client_id)._new_client()._client
    paho.host, paho.port = broker.host, broker.port  # what aiomqtt's connect would set
    task = asyncio.ensure_future(asyncio.to_thread(paho._create_socket))
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a failure: not used
    return EarlyConnection(task)


def now_ms() -> int:
    """Wall clock in integer milliseconds, the timestamp unit of every Ferry payload."""
    return time.time_ns() // 1_000_000


class Bus:
    """An MQTT v5 client for one Ferry component (see the module docstring)."""

    def __init__(
        self,
        broker: BrokerConfig,
        client_id: str,
        *,
        will: tuple[str, dict[str, Any]] | None = None,
        session_expiry: int = 0,
        manual_ack: bool = False,
        validate_inbound: bool = True,
        connect_timeout: float = 30.0,
        receive_maximum: int = 1000,
        on_lost: Callable[[BaseException], None] | None = None,
        on_reconnect: Callable[[], None] | None = None,
        connection: EarlyConnection | None = None,
    ) -> None:
        """``on_lost``: instead of reconnecting after a lost connection, call it and stop.

        A service's input session must not come back on its own: the session may have moved to
        another node meanwhile, and taking it back would take it from the rightful owner.

        ``on_reconnect``: called once the connection came back (and subscribed again), e.g. to
        catch up on the non-retained messages that went by meanwhile.

        ``connection``: a connection ``open_connection`` made earlier, used by the first
        connect if it is still fresh (``EARLY_CONNECTION_MAX_AGE``), else closed.
        """
        self.broker = broker
        self.client_id = client_id
        self.reply_topic = topics.replies(broker.username or "anonymous", client_id)
        # A consuming bus (manual acks: a service's input session, the statestore's) subscribes
        # its reply topic on its first request, if it ever makes one, not on connect: an input
        # session's attach (inside a migration's downtime) saves that round trip.
        self._asks = not manual_ack
        self._will = will
        self._session_expiry = session_expiry
        self._manual_ack = manual_ack
        self._validate_inbound = validate_inbound
        self._connect_timeout = connect_timeout
        self._receive_maximum = receive_maximum
        self._on_lost = on_lost
        self._on_reconnect = on_reconnect
        self._client: aiomqtt.Client | None = None
        self._generation = 0
        #: The last CONNACK's Session Present flag: the broker resumed this client id's session
        #: (its subscriptions and queued messages) rather than starting a new one.
        self.session_present = False
        self._subscriptions: dict[str, int] = {}
        self._announcements: dict[str, Callable[[], dict[str, Any]]] = {}
        self._pending: dict[bytes, asyncio.Future[dict[str, Any]]] = {}
        self._inbox: asyncio.Queue[Inbound] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._closing = False
        self._background: set[asyncio.Task[None]] = set()
        #: PUBACKs ``publish_many`` waits for on the current connection, by message id.
        self._acks: dict[int, tuple[_Batch, int]] = {}
        #: The waits of ``publish`` and ``subscribe`` calls for their PUBACK or SUBACK on the
        #: current connection (``_fail_unconfirmed`` ends them when it drops).
        self._awaiting_broker: set[asyncio.Timeout] = set()
        #: Built once (TLSError here names the bad file before any connection is tried).
        self._tls = tls.broker_context(broker)
        self._early = connection

    async def __aenter__(self) -> Bus:
        await self._connect()
        self._reader = asyncio.create_task(self._read_forever(), name=f"bus-{self.client_id}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Disconnect cleanly (no last will is sent); pending requests fail."""
        self._closing = True
        await self._flush_acks()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.__aexit__(None, None, None)
            self._client = None
        for future in self._pending.values():
            if not future.done():
                future.set_exception(BusError("bus closed"))

    async def _flush_acks(self) -> None:
        """Make sure the broker has read every ack we sent before we let the session go.

        Why: the next owner of a persistent session (a migration's target) can take it over
        while acks of ours still wait unread on the broker's side of the old connection; they
        are then discarded and their inputs redelivered. The broker reads a connection's packets
        in order, so the SUBACK of a subscription we already hold (our reply topic: allowed by
        any ACL, no retained message, nothing delivered) proves it read all of them. Best
        effort: a broker that is gone redelivers anyway.
        """
        if not self._manual_ack or self._client is None:
            return
        # A connection the broker already dropped (the next owner took the session over before
        # the reader noticed) never answers: stop waiting when the reader ends, not after 5 s.
        suback = asyncio.ensure_future(self._client.subscribe(self.reply_topic, qos=1))
        waits: set[asyncio.Future[Any]] = {suback}
        if self._reader is not None:
            waits.add(self._reader)
        await asyncio.wait(waits, timeout=5.0, return_when=asyncio.FIRST_COMPLETED)
        suback.cancel()
        suback.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no noise

    # -- connection -------------------------------------------------------------------------

    def _new_client(self) -> aiomqtt.Client:
        will = None
        if self._will is not None:
            will_topic, will_payload = self._will
            contract.validate(will_topic, will_payload)
            will = aiomqtt.Will(will_topic, orjson.dumps(will_payload), qos=1, retain=True)
        connect_props = Properties(PacketTypes.CONNECT)
        connect_props.SessionExpiryInterval = self._session_expiry
        connect_props.ReceiveMaximum = self._receive_maximum
        client = aiomqtt.Client(
            self.broker.host,
            self.broker.port,
            queue_type=_direct_queue(self._dispatch),
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=will,
            clean_start=self._session_expiry == 0,
            keepalive=self.broker.keepalive,
            username=self.broker.username or None,
            password=self.broker.password or None,
            properties=connect_props,
            timeout=PUBLISH_TIMEOUT,
            # paho leaves Nagle on: a reply queued behind an unacknowledged segment would wait
            # for the broker's delayed ACK (~40 ms), straight into a migration's downtime.
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
            tls_context=self._tls,
        )
        # Many requests in flight at once is normal here (16 parallel migrations): not a warning.
        client.pending_calls_threshold = 1000
        # paho holds back QoS 1 publishes beyond 20 in flight; outputs are pipelined by the
        # thousand, and the broker's Receive Maximum still bounds what it accepts at once.
        client._client.max_inflight_messages_set(0)
        if self._manual_ack:
            # aiomqtt does not expose manual acks; paho (its engine) does, publicly.
            client._client.manual_ack_set(True)
        # PUBACKs of ``publish_many`` go to its batches, every other one to aiomqtt as before.
        acks: dict[int, tuple[_Batch, int]] = {}
        self._acks = acks
        aiomqtt_on_publish: Any = client._client.on_publish

        def on_publish(paho: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
            waiting = acks.pop(mid, None)
            if waiting is not None:
                waiting[0].confirm(waiting[1])
            elif aiomqtt_on_publish is not None:
                aiomqtt_on_publish(paho, userdata, mid, reason, props)

        client._client.on_publish = on_publish
        aiomqtt_on_connect: Any = client._client.on_connect

        def on_connect(paho: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            self.session_present = bool(flags.session_present)
            aiomqtt_on_connect(paho, userdata, flags, reason, props)

        client._client.on_connect = on_connect
        loop = asyncio.get_running_loop()

        def on_log(paho: Any, userdata: Any, level: int, text: str) -> None:
            # A broker that refuses our certificate (TLS 1.3: after the handshake) or a TLS
            # listener reading our plaintext drops the connection before CONNACK; aiomqtt would
            # only time out. Fail the connect now, saying why. Removed once connected.
            if level == MQTT_LOG_ERR and text.startswith("failed to receive on socket"):
                loop.call_soon_threadsafe(_fail_connect, client, text, self._tls is not None)

        client._client.on_log = on_log
        return client

    async def _connect(self) -> None:
        retrying = AsyncRetrying(
            retry=retry_if_exception(
                lambda exc: (
                    isinstance(exc, aiomqtt.MqttError)
                    and not _login_refused(exc)
                    and not tls.is_tls_failure(str(exc))
                )
            ),
            wait=wait_exponential(multiplier=0.05, max=2.0),
            stop=stop_after_delay(self._connect_timeout),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    client = self._new_client()
                    early, self._early = self._early, None
                    sock = early.take() if early is not None else None
                    if sock is not None:
                        paho = client._client
                        paho._create_socket = _first_then(sock, paho._create_socket)  # type: ignore[method-assign]
                    await client.__aenter__()
                    client._client.on_log = None  # paho formats every debug line for it
                    if isinstance(self._tls, tls.ResumingContext):
                        # CONNACK came after the server's session ticket: the next connect
                        # (the next instance's input session) resumes this session.
                        self._tls.remember(client._client._sock)
                    _speed_up(client)
        except aiomqtt.MqttError as exc:
            if _login_refused(exc):
                user = self.broker.username or "anonymous"
                raise BusError(
                    f"MQTT broker {self.broker.host}:{self.broker.port} refused {self.client_id!r} "
                    f"logging in as {user!r}: {exc}; check broker.username and broker.password"
                ) from exc
            if tls.is_tls_failure(str(exc)):
                raise BusError(
                    f"TLS with MQTT broker {self.broker.host}:{self.broker.port} failed for "
                    f"{self.client_id!r}: {exc}; check broker.tls_ca (the broker's CA) and "
                    "broker.tls_cert/tls_key (a client certificate the broker's CA signed)"
                ) from exc
            raise BusError(
                f"cannot connect to MQTT broker {self.broker.host}:{self.broker.port} "
                f"as {self.client_id!r}: {exc}"
            ) from exc
        self._client = client
        self._generation += 1
        _open_queue(client)
        again = dict(self._subscriptions)
        if self._asks:
            again[self.reply_topic] = 1
        if again:
            await self._subscribe_on(client, list(again.items()))

    async def _subscribe_on(self, client: aiomqtt.Client, filters: list[tuple[str, int]]) -> None:
        """Subscribe to all of ``filters`` in one SUBSCRIBE (one round trip), and fail loudly if
        the broker refuses one (an ACL that does not allow it). A connection that drops (or that
        the broker handed to another client) fails it at once, not after aiomqtt's 10 s."""
        names = ", ".join(repr(f) for f, _ in filters)
        wait: asyncio.Timeout | None = None
        try:
            async with asyncio.timeout(None) as wait:  # cut short by _fail_unconfirmed
                self._awaiting_broker.add(wait)
                granted = await client.subscribe(filters)
        except TimeoutError:
            raise BusError(
                f"{self.client_id}: subscribe to {names} failed: the broker connection was lost "
                "before its SUBACK"
            ) from None
        except aiomqtt.MqttError as exc:
            raise BusError(f"{self.client_id}: subscribe to {names} failed: {exc}") from exc
        finally:
            if wait is not None:
                self._awaiting_broker.discard(wait)
        refused = [
            (topic_filter, code)
            for (topic_filter, _), code in zip(filters, granted, strict=False)
            if _reason_value(code) >= 0x80
        ]
        if refused:
            raise BusError(
                f"{self.client_id}: the broker refused the subscription to {refused[0][0]!r} "
                f"({refused[0][1]!s}); not authorized for this login?"
            )

    async def _read_forever(self) -> None:
        while not self._closing:
            client = self._client
            assert client is not None
            try:
                # Messages never wait in aiomqtt's queue (see ``_direct_queue``): this only ends
                # with the MqttError a lost connection raises.
                async for message in client.messages:
                    self._dispatch(message)
            except aiomqtt.MqttError as exc:
                if self._closing:
                    return
                self._fail_unconfirmed()
                with contextlib.suppress(Exception):
                    await client.__aexit__(None, None, None)
                if self._on_lost is not None:
                    log.warning("%s: lost broker connection (%s)", self.client_id, exc)
                    self._client = None
                    self._on_lost(exc)
                    return
                log.warning("%s: lost broker connection (%s); reconnecting", self.client_id, exc)
                await self._connect()
                if self._announcements:
                    self._in_background(self._announce_again())
                if self._on_reconnect is not None:
                    self._on_reconnect()

    def _fail_unconfirmed(self) -> None:
        """The connection is gone: the PUBACKs ``publish_many`` and ``publish`` wait for will
        never come, so they fail now (not confirmed) instead of at PUBLISH_TIMEOUT: a component
        whose broker restarted acts again within the reconnect, not 10 s later."""
        waiting = list(self._acks.values())
        self._acks.clear()  # the old client's callback holds this dict: a late PUBACK is void
        for batch, _index in waiting:
            if not batch.done.done():
                batch.done.set_result(None)
        now = asyncio.get_running_loop().time()
        for wait in self._awaiting_broker:
            wait.reschedule(now)
        self._awaiting_broker.clear()

    async def _announce_again(self) -> None:
        for topic, make_payload in list(self._announcements.items()):
            await self._publish_quietly(topic, make_payload(), retain=True)

    def _dispatch(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        props = message.properties
        response_topic = getattr(props, "ResponseTopic", None) if props else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        if not message.payload and self._validate_inbound:
            # An empty message is how MQTT clears a retained topic: nothing to act on, and not
            # malformed either. Raw listeners (validate_inbound=False) still see it, as {}.
            self._ack_raw(message)
            return
        try:
            payload = orjson.loads(message.payload) if message.payload else {}
            if not isinstance(payload, dict):
                raise contract.ContractError("payload is not a JSON object")
            if self._validate_inbound:
                contract.validate(topic, payload)
        except orjson.JSONDecodeError as exc:
            self._reject(topic, f"not valid JSON: {exc}", response_topic, correlation, message)
            return
        except contract.ContractError as exc:
            self._reject(topic, str(exc), response_topic, correlation, message)
            return
        inbound = Inbound(
            topic=topic,
            payload=payload,
            retain=bool(message.retain),
            response_topic=response_topic,
            correlation=bytes(correlation) if correlation is not None else None,
            mid=message.mid,
            qos=message.qos,
            generation=self._generation,
            size=len(message.payload) if isinstance(message.payload, bytes | bytearray) else 0,
        )
        if topic == self.reply_topic:
            future = self._pending.pop(inbound.correlation or b"", None)
            if future is not None and not future.done():
                future.set_result(payload)
            self.ack(inbound)
            return
        self._inbox.put_nowait(inbound)

    def _reject(
        self,
        topic: str,
        reason: str,
        response_topic: str | None,
        correlation: bytes | None,
        message: aiomqtt.Message,
    ) -> None:
        """Report a bad message where operators look, answer its sender, and drop it."""
        log.warning("%s: rejected message on %s: %s", self.client_id, topic, reason)
        self._in_background(self._report_quietly(topic, reason))
        if response_topic:
            error = {"ok": False, "error": {"code": "invalid_message", "message": reason}}
            self._in_background(self._publish_quietly(response_topic, error, correlation))
        self._ack_raw(message)

    async def report(self, topic: str, reason: str, **about: Any) -> bool:
        """Say what went wrong where operators look: an error report (error-report.schema.json,
        ``about``: service, producer, seq) on ferry/v1/errors from this client, about a message
        on or the state of ``topic``. Best effort: False if it could not be sent."""
        report = {"source": self.client_id, "topic": topic, "reason": reason, **about}
        try:
            await self.publish(topics.ERRORS, {**report, "time": now_ms()})
        except BusError as exc:
            log.warning("%s: error report not sent (%s): %s", self.client_id, exc, reason)
            return False
        return True

    async def _report_quietly(self, topic: str, reason: str) -> None:
        await self.report(topic, reason)

    def _ack_raw(self, message: aiomqtt.Message) -> None:
        """Acknowledge a message that never becomes an Inbound (manual-ack buses)."""
        if self._manual_ack and message.qos > 0 and self._client is not None:
            self._client._client.ack(message.mid, message.qos)

    def _in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _publish_quietly(
        self,
        topic: str,
        payload: dict[str, Any],
        correlation: bytes | None = None,
        retain: bool = False,
    ) -> None:
        try:
            await self.publish(topic, payload, correlation=correlation, retain=retain)
        except Exception as exc:
            log.warning("%s: could not publish to %s: %s", self.client_id, topic, exc)

    # -- publish / subscribe ----------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        payload: dict[str, Any] | None,
        *,
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        expiry: int = 0,
    ) -> None:
        """Validate and publish; ``payload=None`` with ``retain=True`` clears a retained message.

        ``expiry`` (s, MQTT 5 message expiry) makes the broker drop the message if it is still
        queued for an offline subscriber by then.
        """
        if self._client is None:
            raise BusError(f"{self.client_id}: not connected")
        if payload is not None:
            contract.validate(topic, payload)
        props = None
        if response_topic or correlation is not None or expiry:
            props = Properties(PacketTypes.PUBLISH)
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation is not None:
                props.CorrelationData = correlation
            if expiry:
                props.MessageExpiryInterval = expiry
        body = orjson.dumps(payload) if payload is not None else b""
        client = self._client
        wait: asyncio.Timeout | None = None
        try:
            async with asyncio.timeout(None) as wait:  # cut short by _fail_unconfirmed
                self._awaiting_broker.add(wait)
                await client.publish(topic, body, qos=qos, retain=retain, properties=props)
        except TimeoutError:
            raise BusError(
                f"publish to {topic} failed: the broker connection was lost before its PUBACK"
            ) from None
        except aiomqtt.MqttError as exc:
            raise BusError(f"publish to {topic} failed: {exc}") from exc
        finally:
            if wait is not None:
                self._awaiting_broker.discard(wait)

    async def announce(self, topic: str, make_payload: Callable[[], dict[str, Any]]) -> None:
        """Publish ``make_payload()`` retained now, and again after every reconnect.

        For a component's status: ``make_payload`` is called each time, so what is re-announced
        is the current status, not the first one. An invalid payload raises ContractError; a
        publish that fails (the connection dropped while it was in flight) is only logged, since
        the reconnect announces again: it must not take the component down.
        """
        payload = make_payload()
        contract.validate(topic, payload)
        self._announcements[topic] = make_payload
        try:
            await self.publish(topic, payload, retain=True)
        except BusError as exc:
            log.warning(
                "%s: announcing %s failed (%s); again on reconnect", self.client_id, topic, exc
            )

    def withdraw(self, topic: str) -> None:
        """Stop re-announcing ``topic`` (e.g. before publishing a final ``offline``)."""
        self._announcements.pop(topic, None)

    async def publish_many(
        self, messages: Sequence[tuple[str, dict[str, Any]]]
    ) -> list[BaseException | None]:
        """Validate and publish QoS 1 messages in order, then wait for all their PUBACKs at once.

        Why not ``publish`` per message: aiomqtt spends a task, an event and a timer on each and
        scans its pending calls on every call, so a batch of n outputs cost O(n²). Here a batch
        costs one future. Returns one result per message: None (the broker accepted it), a
        ContractError (refused here, not sent) or a BusError (not confirmed: the connection
        failed; everything after the first BusError is unconfirmed too).
        """
        results: list[BaseException | None] = [None] * len(messages)
        client = self._client
        if client is None:
            return [BusError(f"{self.client_id}: not connected")] * len(messages)
        acks = self._acks
        batch = _Batch(results, asyncio.get_running_loop().create_future())
        mids: list[int] = []
        for index, (topic, payload) in enumerate(messages):
            try:
                contract.validate(topic, payload)
            except contract.ContractError as exc:
                results[index] = exc
                continue
            info = client._client.publish(topic, orjson.dumps(payload), qos=1)
            if info.rc != 0:
                failed = BusError(f"publish to {topic} failed: {mqtt_error(info.rc)}")
                results[index:] = [failed] * (len(messages) - index)
                break
            results[index] = BusError(
                f"publish to {topic} not confirmed within {PUBLISH_TIMEOUT:g} s"
            )
            acks[info.mid] = (batch, index)
            mids.append(info.mid)
            batch.remaining += 1
        if batch.remaining:
            try:
                await asyncio.wait_for(asyncio.shield(batch.done), PUBLISH_TIMEOUT)
            except TimeoutError:
                pass
            finally:
                for mid in mids:
                    if acks.get(mid, (None,))[0] is batch:
                        del acks[mid]
        return results

    async def subscribe(self, *topic_filters: str, qos: int = 1) -> None:
        """Subscribe now (all filters in one round trip) and again after every reconnect."""
        if self._client is None:
            raise BusError(f"{self.client_id}: not connected")
        await self._subscribe_on(self._client, [(f, qos) for f in topic_filters])
        self._subscriptions.update(dict.fromkeys(topic_filters, qos))

    async def unsubscribe(self, topic_filter: str) -> None:
        self._subscriptions.pop(topic_filter, None)
        if self._client is not None:
            await self._client.unsubscribe(topic_filter)

    async def messages(self) -> AsyncIterator[Inbound]:
        """Valid messages on this client's subscriptions, in arrival order (replies excluded)."""
        while True:
            yield await self._inbox.get()

    def pending(self) -> int:
        """Received messages not yet taken from ``messages()``."""
        return self._inbox.qsize()

    @property
    def generation(self) -> int:
        """Connections made so far. Messages handed to an earlier one may be lost, so a sender
        that pipelines must not hand more to a new one until those are settled."""
        return self._generation

    def ack(self, message: Inbound) -> None:
        """Acknowledge a QoS 1 message (manual-ack buses only; a no-op otherwise).

        An ack for a message from an earlier connection is dropped: the broker will redeliver it.
        """
        if not self._manual_ack or message.qos == 0 or self._client is None:
            return
        if message.generation != self._generation:
            return
        self._client._client.ack(message.mid, message.qos)

    def ack_many(self, messages: Sequence[Inbound]) -> None:
        """Acknowledge many QoS 1 messages at once, as ``ack`` would each, in their order.

        Why: a durable checkpoint covers up to a checkpoint interval of input (5000 messages at
        5000/s), and paho builds, queues and writes every PUBACK on its own (≈ 15 µs each): a
        move's source then acknowledged too late, and the target got all of it redelivered.
        Here every PUBACK goes to paho as one queued packet: the bytes on the wire are exactly
        those of one ``ack`` per message.
        """
        if not self._manual_ack or self._client is None:
            return
        mids = [m.mid for m in messages if m.qos == 1 and m.generation == self._generation]
        for message in messages:
            if message.qos == 2:
                self.ack(message)
        if mids:
            packet = b"".join([_PUBACK.pack(PUBACK, 2, mid) for mid in mids])
            self._client._client._packet_queue(PUBACK, packet, 0, 0)

    # -- request / reply --------------------------------------------------------------------

    async def request(
        self, topic: str, payload: dict[str, Any], timeout: float | None = None
    ) -> dict[str, Any]:
        """Send a request and wait for its reply; return ``result`` or raise RemoteError."""
        correlation = uuid.uuid4().hex.encode()
        limit = timeout or self.broker.request_timeout
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[correlation] = future
        try:
            if not self._asks:
                if self._client is None:
                    raise BusError(f"{self.client_id}: not connected")
                await self._subscribe_on(self._client, [(self.reply_topic, 1)])
                self._asks = True
            # A request nobody took up in time is void: the broker must not deliver it later.
            await self.publish(
                topic,
                payload,
                response_topic=self.reply_topic,
                correlation=correlation,
                expiry=max(1, math.ceil(limit)),
            )
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns a reply that arrives
            # in the same step as a cancel of the caller and drops the cancel.
            async with asyncio.timeout(limit):
                reply = await future
        except TimeoutError:
            raise RequestTimeout(f"no reply on {topic} within {limit:g} s") from None
        finally:
            self._pending.pop(correlation, None)
        if not reply.get("ok"):
            error = reply.get("error") or {}
            raise RemoteError(
                error.get("code", "unknown"), error.get("message", ""), error.get("details")
            )
        result: dict[str, Any] = reply.get("result") or {}
        return result

    async def reply(
        self,
        request: Inbound,
        result: Mapping[str, Any] | None = None,
        *,
        error: RemoteError | None = None,
    ) -> None:
        """Answer a request on its response topic (a request without one gets nothing)."""
        if not request.response_topic:
            return
        body: dict[str, Any]
        if error is None:
            body = {"ok": True, "result": result or {}}
        else:
            body = {"ok": False, "error": {"code": error.code, "message": error.message}}
            if error.details:
                body["error"]["details"] = error.details
        await self.publish(request.response_topic, body, correlation=request.correlation)


class _Batch:
    """The messages of one ``publish_many`` call still waiting for their PUBACK."""

    __slots__ = ("done", "remaining", "results")

    def __init__(self, results: list[BaseException | None], done: asyncio.Future[None]) -> None:
        self.results = results
        self.done = done
        self.remaining = 0

    def confirm(self, index: int) -> None:
        self.results[index] = None
        self.remaining -= 1
        if self.remaining == 0 and not self.done.done():
            self.done.set_result(None)


def _direct_queue(dispatch: Callable[[aiomqtt.Message], None]) -> type[asyncio.Queue[Any]]:
    """aiomqtt's message queue (its public ``queue_type`` hook) that hands messages straight on.

    Why: aiomqtt's message iterator spends a task and an ``asyncio.wait`` (two event-loop
    iterations) on every message, so a burst of input was taken one message per iteration and
    nothing downstream could batch. This queue calls ``dispatch`` as paho decodes each message,
    in arrival order, on the loop thread. Until the bus made the client current (``_open_queue``)
    it holds them, so each one is stamped with the generation of the connection it came on.
    """

    class DirectQueue(asyncio.Queue[Any]):
        def __init__(self, maxsize: int = 0) -> None:
            super().__init__()
            self.held: list[aiomqtt.Message] | None = []

        def put_nowait(self, item: aiomqtt.Message) -> None:
            if self.held is not None:
                self.held.append(item)
            else:
                dispatch(item)

        def open(self) -> None:
            held, self.held = self.held or [], None
            for item in held:
                dispatch(item)

    return DirectQueue


def _open_queue(client: aiomqtt.Client) -> None:
    """Dispatch what arrived before the client became current, then every message at once."""
    queue = client._queue
    if hasattr(queue, "open"):
        queue.open()


class _FastSocket:
    """paho's socket, read in large chunks and written corked for one event-loop iteration.

    Why: paho reads every packet with at least three ``recv`` calls (type byte, each length
    byte, body) and aiomqtt's reader handles one packet per wake-up of the event loop; it
    writes every packet with its own ``send``, which with TCP_NODELAY is a segment (and a
    wake-up of the broker) each. Here ``recv`` is served from one large read, and ``pending``
    (the hook aiomqtt already uses for TLS buffers) makes its reader handle every packet
    buffered before it returns; ``send`` corks the socket until the end of the current
    loop iteration, so what paho writes in one iteration leaves in as few segments as the
    kernel can. Bytes and their order are exactly paho's: only the syscalls change.

    Over TLS one read returns one record, and Mosquitto writes each packet as a record of its
    own: without reading on until the kernel has nothing more, the reader would again take one
    packet per wake-up of the loop (measured at 5000 inputs/s: 26 % more executor CPU per input
    than plaintext, p99 latency 147 ms against 28 ms). So a TLS read takes every record there
    is (up to ``READ_SIZE``); an end of stream or an error met after some data is kept for the
    next ``recv``, once paho has had the data before it.
    """

    def __init__(self, sock: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._sock = sock
        self._loop = loop
        self._thread = threading.get_ident()
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._data = b""
        self._pos = 0
        self._corked = False
        #: What ended a TLS read after data: b"" (end of stream) or the exception, told next.
        self._after: bytes | BaseException | None = None

    def recv(self, size: int) -> bytes:
        if self._pos < len(self._data):
            chunk = self._data[self._pos : self._pos + size]
            self._pos += len(chunk)
            return chunk
        data = self._read_on() if self._tls else self._sock.recv(max(size, READ_SIZE))
        if len(data) <= size:
            self._data, self._pos = b"", 0
            return data
        self._data, self._pos = data, size
        return data[:size]

    def _read_on(self) -> bytes:
        """Every TLS record readable now, joined (the first read raises as a plain one would)."""
        if self._after is not None:
            after, self._after = self._after, None
            if isinstance(after, BaseException):
                raise after
            return after
        first: bytes = self._sock.recv(READ_SIZE)
        if not first:
            return first
        chunks, total = [first], len(first)
        while total < READ_SIZE:
            try:
                more: bytes = self._sock.recv(READ_SIZE)
            except (ssl.SSLWantReadError, BlockingIOError):
                break
            except Exception as exc:  # told after the data before it
                self._after = exc
                break
            if not more:
                self._after = b""
                break
            chunks.append(more)
            total += len(more)
        return first if len(chunks) == 1 else b"".join(chunks)

    def pending(self) -> int:
        """Bytes read from the kernel that paho has not taken yet (the TLS layer's too)."""
        buffered = len(self._data) - self._pos
        if self._tls:
            buffered += self._sock.pending() + (self._after is not None)
        return buffered

    def send(self, data: bytes | bytearray | memoryview) -> int:
        if not self._corked:
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
                self._corked = True
                if threading.get_ident() == self._thread:
                    self._loop.call_soon(self._uncork)
                else:
                    self._loop.call_soon_threadsafe(self._uncork)
        sent: int = self._sock.send(data)
        return sent

    def _uncork(self) -> None:
        """Let everything corked go now (clearing TCP_CORK pushes the pending segments)."""
        self._corked = False
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)

    def close(self) -> None:
        """Push what is corked before closing (as paho does after DISCONNECT): a close with
        unread input resets the connection and would drop unsent bytes, the last acks too."""
        if self._corked:
            self._uncork()
        self._sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _speed_up(client: aiomqtt.Client) -> None:
    """Swap paho's fresh socket for a ``_FastSocket`` (TCP or TLS over TCP; else a no-op).

    Called right after CONNACK, in the loop thread, before the reader ever runs again: nothing
    is buffered outside the TLS layer yet (which the wrapper reads through), so no byte can be
    skipped or read twice.
    """
    paho = client._client
    sock = paho._sock
    if (
        isinstance(sock, socket.socket)
        and type(sock) in (socket.socket, ssl.SSLSocket)
        and sock.type == socket.SOCK_STREAM
        and hasattr(socket, "TCP_CORK")
    ):
        paho._sock = _FastSocket(sock, asyncio.get_running_loop())


def _fail_connect(client: aiomqtt.Client, text: str, over_tls: bool) -> None:
    """End a connect that lost its connection before CONNACK, with paho's reason."""
    if client._connected.done():
        return
    reason = text.removeprefix("failed to receive on socket: ")
    if tls.is_tls_failure(reason):
        message = f"the broker refused the TLS handshake: {reason}"
    elif over_tls:
        message = f"connection lost before CONNACK ({reason})"
    else:
        message = (
            f"connection lost before CONNACK ({reason}); a TLS-only listener drops a plaintext "
            "client (broker.tls)"
        )
    client._connected.set_exception(aiomqtt.MqttError(message))


def _login_refused(exc: BaseException) -> bool:
    return isinstance(exc, MqttConnectError) and _reason_value(exc.rc) in LOGIN_REFUSED


def _reason_value(code: Any) -> int:
    """A paho ``ReasonCode`` (MQTT 5) or plain int as its number."""
    return int(getattr(code, "value", code) or 0)
