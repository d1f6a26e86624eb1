"""Fixtures for driving the real unix guest binaries through services/executor/channel.py."""

from __future__ import annotations

import asyncio
import base64
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

REPO = Path(__file__).resolve().parents[2]
UNIKERNEL = REPO / "unikernel"
UNIX_BUILD = UNIKERNEL / "build" / "unix"
sys.path.insert(0, str(REPO))

from services.executor.channel import Frame, FrameType, GuestChannel  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def built() -> Path:
    """Build every app for unix once per session (make is incremental)."""
    subprocess.run(["make", "-C", str(UNIKERNEL), "-j2", "unix"], check=True, capture_output=True)
    return UNIX_BUILD


@dataclass
class Guest:
    """A guest process plus the channel to it."""

    proc: asyncio.subprocess.Process
    chan: GuestChannel
    hello: dict[str, Any]
    events: list[Frame] = field(default_factory=list)

    def take(self, ftype: FrameType) -> list[dict[str, Any]]:
        """Remove and return the bodies of the collected events of one type."""
        out = [f.json() for f in self.events if f.type is ftype]
        self.events[:] = [
            f for f in self.events if f.type is not ftype
        ]  # the collector appends here
        return out

    async def wait(self) -> int:
        return await asyncio.wait_for(self.proc.wait(), 10)


@asynccontextmanager
async def spawn(app: str) -> AsyncIterator[Guest]:
    """Run build/unix/<app> --fd N on one end of a socketpair; yield it after HELLO."""
    host, guest = socket.socketpair()
    proc = await asyncio.create_subprocess_exec(
        str(UNIX_BUILD / app),
        "--fd",
        str(guest.fileno()),
        pass_fds=(guest.fileno(),),
        stderr=asyncio.subprocess.DEVNULL,
    )
    guest.close()
    reader, writer = await asyncio.open_connection(sock=host, limit=64 * 1024 * 1024)
    events: list[Frame] = []
    chan = GuestChannel(reader, writer, on_event=events.append)
    try:
        hello = await asyncio.wait_for(chan.hello(), 10)
        g = Guest(proc, chan, hello, events)
        yield g
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        writer.close()


SpawnFn = Callable[[str], Any]


@pytest.fixture
def spawn_guest() -> SpawnFn:
    return spawn


async def drive_inputs(g: Guest, inputs: list[tuple[str, int, dict[str, Any]]]) -> None:
    """Send inputs and wait until each has its DONE (checkpoint is a barrier)."""
    for source, seq, payload in inputs:
        g.chan.send_input(source, seq, payload)
    await g.chan.checkpoint(0)


def f64_list_bits(b64: str) -> list[str]:
    """The 16-hex-digit bit patterns of a format_version 2 float64_list (base64, LE bytes)."""
    raw = base64.b64decode(b64, validate=True)
    assert len(raw) % 8 == 0
    return [raw[i : i + 8][::-1].hex() for i in range(0, len(raw), 8)]


def to_format_v1(doc: bytes) -> bytes:
    """Rewrites a format_version 2 checkpoint as the equivalent version 1 document."""
    d = orjson.loads(doc)
    assert d["format_version"] == 2
    d["format_version"] = 1
    for section in ("params", "vars"):
        for value in d[section].values():
            if value["type"] == "float64_list":
                value["bits"] = f64_list_bits(value.pop("base64"))
    return orjson.dumps(d)
