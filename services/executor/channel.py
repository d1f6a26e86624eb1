"""The host side of the guest channel (unikernel/PROTOCOL.md), over asyncio streams.

The framing is the single source of truth in PROTOCOL.md; this module mirrors it so the
executor (and tests) can drive any Ferry guest — a unix process or a microvm — through
one (StreamReader, StreamWriter) pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import orjson

__all__ = [
    "MAX_FRAME_LEN",
    "ChannelClosed",
    "ChannelError",
    "Frame",
    "FrameType",
    "GuestChannel",
    "GuestError",
    "encode_frame",
    "read_frame",
]

#: Largest value of the length field (type byte + body), as in PROTOCOL.md.
MAX_FRAME_LEN = 16 * 1024 * 1024

_HEADER = struct.Struct("<IB")


class FrameType(IntEnum):
    """Frame type codes of protocol version 1."""

    HELLO = 0x01
    START = 0x02
    RESTORE = 0x03
    READY = 0x04
    INPUT = 0x05
    OUTPUT = 0x06
    DONE = 0x07
    CHECKPOINT_REQUEST = 0x08
    CHECKPOINT = 0x09
    STOP = 0x0A
    LOG = 0x0B
    ERROR = 0x0C
    EXITED = 0x0D
    FINISHED = 0x0E
    RESUME = 0x0F


class ChannelError(Exception):
    """The byte stream broke the framing (bad length, unknown type, bad JSON) or ended."""


class ChannelClosed(ChannelError):
    """The guest closed the stream (at a frame boundary or inside a frame)."""


class GuestError(Exception):
    """The guest refused a request: it sent ERROR (and usually EXITED) instead of an answer.

    `code` is the guest's snake_case error code (e.g. ``bad_document``, ``wrong_app``),
    `exit_code` the code of the EXITED frame that followed, if one arrived.
    """

    def __init__(self, code: str, message: str, exit_code: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.exit_code = exit_code


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame: its type and raw body (a UTF-8 JSON object)."""

    type: FrameType
    body: bytes

    def json(self) -> Any:
        """Decode the body; raises ChannelError when it is not JSON."""
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError as exc:
            raise ChannelError(f"{self.type.name} body is not JSON: {exc}") from exc


def encode_frame(ftype: FrameType, body: bytes | dict[str, Any]) -> bytes:
    """Return the wire bytes of one frame; a dict body is serialised with orjson."""
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    length = len(raw) + 1
    if length > MAX_FRAME_LEN:
        raise ChannelError(f"frame of {length} bytes exceeds {MAX_FRAME_LEN}")
    return _HEADER.pack(length, int(ftype)) + raw


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    """Read exactly one frame, or raise ChannelError/ChannelClosed; never guesses."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        raise ChannelClosed(
            "channel closed" if not exc.partial else "channel closed inside a frame header"
        ) from exc
    length, code = _HEADER.unpack(header)
    if length < 1 or length > MAX_FRAME_LEN:
        raise ChannelError(f"bad frame length {length}")
    try:
        ftype = FrameType(code)
    except ValueError as exc:
        raise ChannelError(f"unknown frame type 0x{code:02x}") from exc
    try:
        body = await reader.readexactly(length - 1)
    except asyncio.IncompleteReadError as exc:
        raise ChannelClosed(f"channel closed inside a {ftype.name} frame") from exc
    return Frame(ftype, body)


#: Frames the guest sends on its own, not as the answer to a request.
EVENT_TYPES = frozenset(
    {
        FrameType.OUTPUT,
        FrameType.DONE,
        FrameType.LOG,
        FrameType.ERROR,
        FrameType.EXITED,
        FrameType.FINISHED,
    }
)

#: Frames that answer a host request.
ANSWER_TYPES = frozenset({FrameType.HELLO, FrameType.READY, FrameType.CHECKPOINT})

FrameCallback = Callable[[Frame], None]


class GuestChannel:
    """A controller's view of one guest: requests with answers, plus a stream of events.

    One reader task owns the stream (started on first use), so events keep flowing while the
    host is not waiting for anything — the executor's input pump relies on that. Requests (hello,
    start, restore, checkpoint, stop) wait for their answer frame; every event frame (OUTPUT,
    DONE, LOG, ERROR, EXITED, FINISHED) goes to ``on_event`` if set, else to an unbounded queue
    read by ``events()``/``next_event()``, so nothing the guest says is lost while the host waits
    for a CHECKPOINT. One request at a time; an answer that arrives before it is asked for (HELLO
    right after boot) is kept until it is.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_event: FrameCallback | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.on_event = on_event
        self._events: asyncio.Queue[Frame | None] = asyncio.Queue()
        self._unclaimed: list[Frame] = []
        self._waiter: tuple[frozenset[FrameType], asyncio.Future[Frame]] | None = None
        self._last_error: Frame | None = None
        self._read_task: asyncio.Task[None] | None = None
        self._failure: ChannelError | None = None
        self._ended = asyncio.Event()
        self.exited: dict[str, Any] | None = None
        self._outbox: list[bytes] = []

    @property
    def alive(self) -> bool:
        """False once the stream ended or broke."""
        return self._failure is None

    # -- sending ------------------------------------------------------------------

    def send(self, ftype: FrameType, body: bytes | dict[str, Any]) -> None:
        """Queue one frame for writing (call drain() to wait for the transport).

        Frames queued in one event-loop iteration go out in one write, at the end of it: one
        syscall (and one wake-up of the guest) per batch of inputs instead of one per input.
        Order is kept; a frame too large raises here, before anything is queued.
        """
        self._ensure_reading()
        frame = encode_frame(ftype, body)
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(frame)

    def _flush(self) -> None:
        """Hand every queued frame to the transport at once."""
        if not self._outbox:
            return
        frames, self._outbox = self._outbox, []
        if self._writer.is_closing():
            return
        self._writer.write(frames[0] if len(frames) == 1 else b"".join(frames))

    async def drain(self) -> None:
        """Wait until the transport accepted what was queued."""
        self._flush()
        await self._writer.drain()

    def send_input(self, source: str, seq: int, payload: dict[str, Any]) -> None:
        """Queue one INPUT; its OUTPUTs and DONE arrive as events."""
        self.send(FrameType.INPUT, {"source": source, "seq": seq, "payload": payload})

    # -- receiving ------------------------------------------------------------------

    def _ensure_reading(self) -> None:
        if self._read_task is None:
            self._read_task = asyncio.get_running_loop().create_task(self._read_forever())

    async def _read_forever(self) -> None:
        try:
            while True:
                frame = await read_frame(self._reader)
                if frame.type in EVENT_TYPES:
                    self._dispatch(frame)
                    continue
                waiter = self._waiter
                if waiter is not None and frame.type in waiter[0]:
                    self._waiter = None
                    if not waiter[1].done():
                        waiter[1].set_result(frame)
                elif frame.type in ANSWER_TYPES:
                    self._unclaimed.append(frame)
                else:
                    raise ChannelError(f"unexpected {frame.type.name} from the guest")
        except ChannelError as exc:
            self._fail(exc)
        except (ConnectionError, OSError) as exc:
            self._fail(ChannelClosed(f"channel lost: {exc}"))

    def _fail(self, exc: ChannelError) -> None:
        self._failure = exc
        self._ended.set()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter[1].done():
            waiter[1].set_exception(exc)
        self._events.put_nowait(None)

    def _dispatch(self, frame: Frame) -> None:
        if frame.type is FrameType.ERROR:
            self._last_error = frame
        if frame.type is FrameType.EXITED:
            self.exited = frame.json()
            self._ended.set()
        if self.on_event is not None:
            self.on_event(frame)
        else:
            self._events.put_nowait(frame)
        waiter = self._waiter
        if frame.type is FrameType.EXITED and waiter is not None:
            self._waiter = None
            if not waiter[1].done():
                waiter[1].set_exception(self._refusal(frame))

    async def _await_answer(self, *answers: FrameType) -> Frame:
        """Wait for one of ``answers``; EXITED first means the guest refused."""
        self._ensure_reading()
        for frame in self._unclaimed:
            if frame.type in answers:
                self._unclaimed.remove(frame)
                return frame
        if self._failure is not None:
            raise self._failure
        if self.exited is not None:
            raise GuestError("exited", f"the guest already exited: {self.exited}")
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._waiter = (frozenset(answers), future)
        await self.drain()
        try:
            return await future
        finally:
            if self._waiter is not None and self._waiter[1] is future:
                self._waiter = None

    def _refusal(self, exited: Frame) -> GuestError:
        code = exited.json().get("code")
        if self._last_error is not None:
            err = self._last_error.json()
            return GuestError(str(err.get("code")), str(err.get("message")), code)
        return GuestError("exited", "the guest exited", code)

    async def next_event(self) -> Frame:
        """Return the next event frame; ChannelClosed once the stream has ended."""
        self._ensure_reading()
        frame = await self._events.get()
        if frame is None:
            self._events.put_nowait(None)
            raise self._failure or ChannelClosed("channel closed")
        return frame

    async def events(self) -> AsyncIterator[Frame]:
        """Iterate over event frames until the guest exits or closes the channel."""
        while True:
            try:
                frame = await self.next_event()
            except ChannelClosed:
                return
            yield frame
            if frame.type is FrameType.EXITED:
                return

    # -- requests -------------------------------------------------------------------

    async def hello(self) -> dict[str, Any]:
        """Wait for the guest's HELLO (sent on boot and on every reconnect)."""
        frame = await self._await_answer(FrameType.HELLO)
        hello: dict[str, Any] = frame.json()
        if hello.get("protocol") != 1:
            raise ChannelError(f"unsupported protocol {hello.get('protocol')!r}")
        return hello

    async def start(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Fresh start with app parameters; returns READY's body."""
        self.send(FrameType.START, {"params": params or {}})
        ready: dict[str, Any] = (await self._await_answer(FrameType.READY)).json()
        return ready

    async def restore(self, document: bytes) -> dict[str, Any]:
        """Hand a checkpoint document to a waiting guest; returns READY's body.

        Raises GuestError (code bad_document, wrong_app, ...) if the guest refuses it.
        """
        self.send(FrameType.RESTORE, document)
        ready: dict[str, Any] = (await self._await_answer(FrameType.READY)).json()
        return ready

    async def checkpoint(self, time_ms: int, pause: bool = False) -> bytes:
        """Ask for a checkpoint at the next step boundary; returns the raw document.

        Every INPUT sent before this call is applied (and its DONE dispatched) first. With
        ``pause``, a procedural guest then runs no step until ``resume()``: the checkpoint is
        about to move, and a step run here would run again where it lands.
        """
        body: dict[str, Any] = {"time_ms": time_ms}
        if pause:
            body["pause"] = True
        self.send(FrameType.CHECKPOINT_REQUEST, body)
        return (await self._await_answer(FrameType.CHECKPOINT)).body

    async def resume(self) -> dict[str, Any]:
        """Undo a pausing checkpoint (the move was called off); returns READY's body."""
        self.send(FrameType.RESUME, {})
        ready: dict[str, Any] = (await self._await_answer(FrameType.READY)).json()
        return ready

    async def stop(self) -> dict[str, Any]:
        """Ask the guest to end; returns EXITED's body (code 0 on a clean stop)."""
        self.send(FrameType.STOP, {})
        await self.drain()
        return await self.wait_exited()

    async def wait_exited(self) -> dict[str, Any]:
        """EXITED's body once the guest said it; ChannelError if the stream ended without it."""
        self._ensure_reading()
        await self._ended.wait()
        if self.exited is None:
            raise self._failure or ChannelClosed("channel closed")
        return self.exited

    async def close(self) -> None:
        """Close our end of the stream (the guest sees the controller leave)."""
        if self._read_task is not None:
            self._read_task.cancel()
        self._flush()
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
