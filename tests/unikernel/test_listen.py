"""--listen mode: a controller may leave and a new one reconnect; the guest keeps its state."""

from __future__ import annotations

import asyncio
import re

import orjson
from conftest import UNIX_BUILD

from services.executor.channel import Frame, FrameType, GuestChannel


async def connect(port: int, events: list[Frame]) -> GuestChannel:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return GuestChannel(reader, writer, on_event=events.append)


async def test_reconnect_keeps_state() -> None:
    proc = await asyncio.create_subprocess_exec(
        str(UNIX_BUILD / "counter"),
        "--listen",
        "127.0.0.1:0",
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        line = (await asyncio.wait_for(proc.stderr.readline(), 10)).decode()
        port = int(re.search(r"port (\d+)", line).group(1))  # type: ignore[union-attr]
        events: list[Frame] = []

        chan = await connect(port, events)
        assert (await chan.hello())["state"] == "waiting"
        await chan.start({})
        for seq in (1, 2, 3):
            chan.send_input("a", seq, {"value": seq})
        await chan.checkpoint(1)
        await chan.close()

        chan = await connect(port, events)
        assert (await chan.hello())["state"] == "running"
        chan.send_input("a", 3, {"value": 100})  # already applied before the drop
        chan.send_input("a", 4, {"value": 4})
        doc = orjson.loads(await chan.checkpoint(2))
        assert doc["watermark"] == {"a": 4}
        assert doc["vars"]["count/a"] == {"type": "int64", "value": 4}
        done = [f.json()["applied"] for f in events if f.type is FrameType.DONE]
        assert done == [True, True, True, False, True]
        assert (await chan.stop())["code"] == 0
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
