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

FrameCallback = Callable[[Frame], None]


class GuestChannel:
    """A controller's view of one guest: requests with answers, plus a stream of events.

    Requests (hello, start, restore, checkpoint, stop) read frames until their answer
    arrives; every event frame met meanwhile (OUTPUT, DONE, LOG, ERROR, EXITED, FINISHED)
    goes to `on_event` if given, else to an unbounded queue read by `events()`, so nothing
    the guest said is lost while the host waits for a CHECKPOINT. Only one coroutine may
    read at a time: either a request or `events()`/`next_event()`.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_event: FrameCallback | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._on_event = on_event
        self._events: asyncio.Queue[Frame] = asyncio.Queue()
        self._last_error: Frame | None = None
        self.exited: dict[str, Any] | None = None

    # -- sending ------------------------------------------------------------------

    def send(self, ftype: FrameType, body: bytes | dict[str, Any]) -> None:
        """Queue one frame for writing (call drain() to wait for the transport)."""
        self._writer.write(encode_frame(ftype, body))

    async def drain(self) -> None:
        """Wait until the transport accepted what was queued."""
        await self._writer.drain()

    def send_input(self, source: str, seq: int, payload: dict[str, Any]) -> None:
        """Queue one INPUT; its OUTPUTs and DONE arrive as events."""
        self.send(FrameType.INPUT, {"source": source, "seq": seq, "payload": payload})

    # -- receiving ------------------------------------------------------------------

    def _dispatch(self, frame: Frame) -> None:
        if frame.type is FrameType.ERROR:
            self._last_error = frame
        if frame.type is FrameType.EXITED:
            self.exited = frame.json()
        if self._on_event is not None:
            self._on_event(frame)
        else:
            self._events.put_nowait(frame)

    async def _await_answer(self, *answers: FrameType) -> Frame:
        """Read until one of `answers`; events are dispatched; EXITED first means refusal."""
        await self.drain()
        while True:
            frame = await read_frame(self._reader)
            if frame.type in answers:
                return frame
            if frame.type in EVENT_TYPES:
                self._dispatch(frame)
                if frame.type is FrameType.EXITED:
                    raise self._refusal(frame)
                continue
            raise ChannelError(f"unexpected {frame.type.name} from the guest")

    def _refusal(self, exited: Frame) -> GuestError:
        code = exited.json().get("code")
        if self._last_error is not None:
            err = self._last_error.json()
            return GuestError(str(err.get("code")), str(err.get("message")), code)
        return GuestError("exited", "the guest exited", code)

    async def next_event(self) -> Frame:
        """Return the next event frame (queued first, then from the stream)."""
        if not self._events.empty():
            return self._events.get_nowait()
        while True:
            frame = await read_frame(self._reader)
            if frame.type not in EVENT_TYPES:
                raise ChannelError(f"unexpected {frame.type.name} from the guest")
            if frame.type is FrameType.ERROR:
                self._last_error = frame
            if frame.type is FrameType.EXITED:
                self.exited = frame.json()
            if self._on_event is not None:
                self._on_event(frame)
                continue
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

    async def checkpoint(self, time_ms: int) -> bytes:
        """Ask for a checkpoint at the next step boundary; returns the raw document.

        Every INPUT sent before this call is applied (and its DONE dispatched) first.
        """
        self.send(FrameType.CHECKPOINT_REQUEST, {"time_ms": time_ms})
        return (await self._await_answer(FrameType.CHECKPOINT)).body

    async def stop(self) -> dict[str, Any]:
        """Ask the guest to end; returns EXITED's body (code 0 on a clean stop)."""
        self.send(FrameType.STOP, {})
        await self.drain()
        while True:
            frame = await read_frame(self._reader)
            if frame.type not in EVENT_TYPES:
                raise ChannelError(f"unexpected {frame.type.name} from the guest")
            self._dispatch(frame)
            if frame.type is FrameType.EXITED:
                exited: dict[str, Any] = frame.json()
                return exited

    async def close(self) -> None:
        """Close our end of the stream (the guest sees the controller leave)."""
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
