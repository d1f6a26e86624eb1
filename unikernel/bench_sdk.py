"""Guest SDK benchmark: boot-to-ready, checkpoint size/time and restore time by state size.

Sweeps the aggregator's window (8 bytes per sample, one sensor) from ~1 KB to ~1 MB of
state, on the unix target and, when build/microvm/aggregator.elf exists, on the microvm
target under QEMU (TCG). Prints a table and, with --json, one JSON object per row.

    make -C unikernel && .venv/bin/python unikernel/bench_sdk.py [--runs 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from services.executor.channel import GuestChannel  # noqa: E402

WINDOWS = [128, 1024, 8192, 32768, 131072]
STREAM_LIMIT = 64 * 1024 * 1024


@asynccontextmanager
async def unix_guest(app: str) -> AsyncIterator[GuestChannel]:
    """A unix guest on a socketpair (--fd)."""
    host, guest = socket.socketpair()
    proc = await asyncio.create_subprocess_exec(
        str(HERE / "build" / "unix" / app), "--fd", str(guest.fileno()),
        pass_fds=(guest.fileno(),), stderr=asyncio.subprocess.DEVNULL,
    )
    guest.close()
    reader, writer = await asyncio.open_connection(sock=host, limit=STREAM_LIMIT)
    try:
        yield GuestChannel(reader, writer, on_event=lambda f: None)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        writer.close()


@asynccontextmanager
async def microvm_guest(app: str) -> AsyncIterator[GuestChannel]:
    """A microvm guest under QEMU TCG; its virtio console is a unix socket we connect to."""
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "ch0.sock")
        proc = await asyncio.create_subprocess_exec(
            "qemu-system-x86_64", "-M", "microvm", "-accel", "tcg", "-m", "256",
            "-nodefaults", "-nographic", "-no-reboot",
            "-kernel", str(HERE / "build" / "microvm" / f"{app}.elf"),
            "-chardev", f"socket,id=ch0,path={sock},server=on,wait=off",
            "-device", "virtio-serial-device", "-device", "virtserialport,chardev=ch0,nr=1",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            for attempt in range(2500):          # QEMU creates, then listens on, the socket
                try:
                    reader, writer = await asyncio.open_unix_connection(
                        sock, limit=STREAM_LIMIT
                    )
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if attempt == 2499:
                        raise
                    await asyncio.sleep(0.002)
            try:
                yield GuestChannel(reader, writer, on_event=lambda f: None)
            finally:
                writer.close()
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


GUESTS = {"unix": unix_guest, "microvm": microvm_guest}


async def boot_to_ready(target: str) -> float:
    """Spawn → HELLO → START → READY, in ms."""
    t0 = time.perf_counter()
    async with GUESTS[target]("counter") as chan:
        await asyncio.wait_for(chan.hello(), 60)
        await chan.start({})
        return (time.perf_counter() - t0) * 1e3


async def state_row(target: str, window: int) -> dict[str, Any]:
    """Fill one sensor's window, checkpoint, restore into a fresh guest; times in ms."""
    async with GUESTS[target]("aggregator") as chan:
        await asyncio.wait_for(chan.hello(), 60)
        await chan.start({"window": window, "threshold": 50})
        for seq in range(1, 33):
            chan.send_input("s1", seq, {"sensor": "s1", "value": seq * 1.25})
        await chan.checkpoint(0)                      # barrier: inputs applied
        t0 = time.perf_counter()
        doc = await chan.checkpoint(int(time.time() * 1000))
        checkpoint_ms = (time.perf_counter() - t0) * 1e3
    async with GUESTS[target]("aggregator") as chan:
        await asyncio.wait_for(chan.hello(), 60)
        t0 = time.perf_counter()
        await chan.restore(doc)
        restore_ms = (time.perf_counter() - t0) * 1e3
    assert orjson.loads(doc)["watermark"] == {"s1": 32}
    return {
        "target": target, "window": window, "state_bytes": window * 8,
        "doc_bytes": len(doc), "checkpoint_ms": checkpoint_ms, "restore_ms": restore_ms,
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per point (median reported)")
    ap.add_argument("--json", action="store_true", help="also print JSON lines")
    args = ap.parse_args()

    targets = ["unix"]
    if (HERE / "build" / "microvm" / "aggregator.elf").exists():
        targets.append("microvm")
    rows: list[dict[str, Any]] = []
    for target in targets:
        boots = [await boot_to_ready(target) for _ in range(args.runs)]
        rows.append({"target": target, "metric": "boot_to_ready_ms",
                     "median": statistics.median(boots)})
        print(f"{target:8} boot-to-ready  median {statistics.median(boots):8.2f} ms")
        print(f"{'target':8} {'window':>7} {'state':>9} {'document':>10} "
              f"{'checkpoint':>11} {'restore':>9}")
        for window in WINDOWS:
            runs = [await state_row(target, window) for _ in range(args.runs)]
            row = dict(runs[0])
            row["checkpoint_ms"] = statistics.median(r["checkpoint_ms"] for r in runs)
            row["restore_ms"] = statistics.median(r["restore_ms"] for r in runs)
            rows.append(row)
            print(f"{target:8} {window:7d} {row['state_bytes']:9d} {row['doc_bytes']:10d} "
                  f"{row['checkpoint_ms']:9.2f}ms {row['restore_ms']:7.2f}ms")
    if args.json:
        for row in rows:
            print(orjson.dumps(row).decode())


if __name__ == "__main__":
    asyncio.run(main())
