"""Podman + CRIU runtime: a counter service survives checkpoint-export → restore-import.

Uses the real app `unikernel/build/unix/counter` when it is built and static, else a tiny
stand-in compiled here that speaks the same subset of unikernel/PROTOCOL.md. Skips only when
CRIU >= 4.1 cannot be made to work (deploy/install-criu.sh is tried first).
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.executor.channel import Frame, FrameType, encode_frame, read_frame
from services.executor.runtimes import podman_cli as podman

ROOT = Path(__file__).resolve().parents[1]
REAL_COUNTER = ROOT / "unikernel" / "build" / "unix" / "counter"
IMAGE = "localhost/ferry-test-counter:latest"

# HELLO, START -> READY, INPUT -> OUTPUT {"total"} + DONE, with one watermark per source.
STANDIN_C = r"""
#include <arpa/inet.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static long long total, watermark;
static int started;

static int get(int fd, void *buf, size_t n) {
    for (char *p = buf; n; ) {
        ssize_t r = read(fd, p, n);
        if (r <= 0) return -1;
        p += r; n -= (size_t)r;
    }
    return 0;
}

static void put(int fd, int type, const char *body) {
    uint32_t len = (uint32_t)strlen(body) + 1;
    unsigned char head[5];
    memcpy(head, &len, 4);  /* x86-64: little-endian, as the protocol wants */
    head[4] = (unsigned char)type;
    if (write(fd, head, 5) != 5 || write(fd, body, len - 1) != (ssize_t)(len - 1)) return;
}

int main(int argc, char **argv) {
    static char body[65536];
    char host[64], out[256];
    int port, one = 1, s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET};
    if (argc != 3 || strcmp(argv[1], "--listen") || sscanf(argv[2], "%63[^:]:%d", host, &port) != 2)
        return 2;
    a.sin_port = htons((uint16_t)port);
    inet_pton(AF_INET, host, &a.sin_addr);
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 4)) { perror("listen"); return 1; }
    for (;;) {
        int c = accept(s, NULL, NULL);
        unsigned char head[5];
        uint32_t len;
        if (c < 0) continue;
        snprintf(out, sizeof out, "{\"protocol\":1,\"app\":\"counter\",\"app_version\":\"1.0.0\","
                 "\"mode\":\"event\",\"platform\":\"unix\",\"state\":\"%s\"}",
                 started ? "running" : "waiting");
        put(c, 1, out);
        while (!get(c, head, 5)) {
            memcpy(&len, head, 4);
            if (len < 1 || len > sizeof body || get(c, body, len - 1)) break;
            body[len - 1] = 0;
            if (head[4] == 2) {
                started = 1;
                put(c, 4, "{\"step\":\"input\",\"restored\":false}");
            } else if (head[4] == 5) {
                char *p = strstr(body, "\"seq\":");
                long long seq = p ? atoll(p + 6) : 0;
                int applied = seq > watermark;
                if (applied) {
                    watermark = seq;
                    snprintf(out, sizeof out, "{\"source\":\"t\",\"seq\":%lld,\"payload\":"
                             "{\"total\":%lld}}", seq, ++total);
                    put(c, 6, out);
                }
                snprintf(out, sizeof out, "{\"source\":\"t\",\"seq\":%lld,\"applied\":%s}",
                         seq, applied ? "true" : "false");
                put(c, 7, out);
            }
        }
        close(c);
    }
}
"""


def _is_static_elf(path: Path) -> bool:
    """True for an x86-64 ELF without a PT_INTERP program header (no dynamic loader)."""
    data = path.read_bytes()
    if data[:5] != b"\x7fELF\x02":
        return False
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != 3 for i in range(phnum))


async def _podman_out(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "podman", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"podman {' '.join(args)}: {err.decode()}"
    return out.decode().strip()


@pytest.fixture(scope="module")
async def counter_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ok, reason = await podman.criu_available()
    if not ok and reason != "rootful podman and criu need root":
        install = await asyncio.create_subprocess_exec(
            "bash",
            str(ROOT / "deploy" / "install-criu.sh"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await install.communicate()
        ok, reason = await podman.criu_available()
        reason += "\ninstall-criu.sh said:\n" + out.decode(errors="replace")[-2000:]
    if not ok:
        pytest.skip(f"CRIU >= 4.1 is not usable here: {reason}")
    podman.become_subreaper()
    if REAL_COUNTER.is_file() and _is_static_elf(REAL_COUNTER):
        return REAL_COUNTER
    build = tmp_path_factory.mktemp("standin")
    (build / "counter.c").write_text(STANDIN_C)
    gcc = await asyncio.create_subprocess_exec(
        "gcc", "-static", "-O2", "-o", str(build / "counter"), str(build / "counter.c")
    )
    assert await gcc.wait() == 0, "gcc -static failed (is libc6-dev installed?)"
    return build / "counter"


@pytest.fixture(scope="module")
async def counter_image(counter_binary: Path) -> AsyncIterator[str]:
    """The counter's image ID; the tag goes afterwards (it may alias the executor's image)."""
    yield await podman.build_image(counter_binary, IMAGE)
    await _podman_out("rmi", "--ignore", IMAGE)


class Controller:
    """The host end of one channel connection, just enough for this test."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> tuple[Controller, dict[str, Any]]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        self = cls(reader, writer)
        hello = await self.expect(FrameType.HELLO)
        return self, hello

    async def next_frame(self) -> Frame:
        """The next frame that is not a LOG."""
        while True:
            frame = await asyncio.wait_for(read_frame(self.reader), 10)
            if frame.type != FrameType.LOG:
                return frame

    async def expect(self, ftype: FrameType) -> dict[str, Any]:
        frame = await self.next_frame()
        assert frame.type == ftype, f"expected {ftype.name}, got {frame.type.name}: {frame.body!r}"
        body: dict[str, Any] = frame.json()
        return body

    async def send(self, ftype: FrameType, body: dict[str, Any]) -> None:
        self.writer.write(encode_frame(ftype, body))
        await self.writer.drain()

    async def input(self, seq: int) -> tuple[int | None, bool]:
        """Sends INPUT `seq`; returns (total from its OUTPUT or None, DONE's applied)."""
        await self.send(FrameType.INPUT, {"source": "t", "seq": seq, "payload": {"value": 1}})
        frame = await self.next_frame()
        total = None
        if frame.type == FrameType.OUTPUT:
            total = frame.json()["payload"]["total"]
            frame = await self.next_frame()
        assert frame.type == FrameType.DONE, frame
        return total, bool(frame.json()["applied"])

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


@pytest.fixture
async def names() -> AsyncIterator[tuple[str, str]]:
    prefix = f"ferry-test-{uuid.uuid4().hex[:8]}"
    pair = (f"{prefix}-src", f"{prefix}-dst")
    yield pair
    for name in pair:
        await podman.remove(name)


async def test_counter_continues_after_checkpoint_export_and_restore_import(
    counter_image: str, names: tuple[str, str], tmp_path: Path
) -> None:
    source, target = names
    port = podman.free_port()
    await podman.run(source, counter_image, ["--listen", f"127.0.0.1:{port}"], port)
    ctl, hello = await Controller.connect(port)
    assert hello["state"] == "waiting"
    await ctl.send(FrameType.START, {"params": {}})
    await ctl.expect(FrameType.READY)
    assert [await ctl.input(seq) for seq in (1, 2, 3)] == [(1, True), (2, True), (3, True)]

    # The controller stays connected across the checkpoint: it must not block the dump.
    started = time.perf_counter()
    checkpoint = await podman.checkpoint_export(source, tmp_path / "counter.tar.zst")
    await podman.remove(source)
    restore = await podman.restore_import(checkpoint.archive, target, port)
    ctl2, hello = await Controller.connect(port)
    assert await ctl2.input(4) == (4, True)
    downtime = time.perf_counter() - started
    await ctl.close()

    assert hello["state"] == "running"
    assert await ctl2.input(2) == (None, False), "the watermark did not survive"
    await ctl2.close()
    print(
        f"\npodman: archive {checkpoint.size_bytes} B, checkpoint {checkpoint.seconds:.3f} s, "
        f"restore {restore.seconds:.3f} s, downtime {downtime:.3f} s"
    )


async def test_restore_of_corrupt_archive_raises_podman_error(
    counter_image: str, names: tuple[str, str], tmp_path: Path
) -> None:
    archive = tmp_path / "corrupt.tar.zst"
    archive.write_bytes(b"this is not a checkpoint archive\n" * 100)
    with pytest.raises(podman.PodmanError) as info:
        await podman.restore_import(archive, names[1], podman.free_port())
    error = info.value
    assert error.returncode not in (0, None)
    assert error.cmd[:3] == ["podman", "container", "restore"]
    assert str(archive) in str(error) and error.stderr_tail
    exists = await asyncio.create_subprocess_exec("podman", "container", "exists", names[1])
    assert await exists.wait() == 1, "a failed restore must not leave a container behind"


async def test_build_image_gives_the_same_id_for_the_same_binary(
    counter_binary: Path, counter_image: str, tmp_path: Path
) -> None:
    # A checkpoint restores only on a node holding the very image ID it names, so a node that
    # builds the image from its own copy of the binary must arrive at the same ID.
    binary = tmp_path / "counter"
    binary.write_bytes(counter_binary.read_bytes() + uuid.uuid4().bytes)  # an image of its own
    tag = f"localhost/ferry-test-{uuid.uuid4().hex[:8]}:latest"
    try:
        first = await podman.build_image(binary, tag)
        assert await _podman_out("image", "inspect", "--format", "{{.Id}}", tag) == first
        await _podman_out("rmi", tag)
        assert first not in await _podman_out("image", "ls", "-q", "--no-trunc")
        # The other node's copy: another mtime, and the tag naming some other image.
        os.utime(binary, (1, 1))
        await _podman_out("tag", counter_image, tag)
        assert await podman.build_image(binary, tag) == first
        assert await _podman_out("image", "inspect", "--format", "{{.Id}}", tag) == first
    finally:
        await _podman_out("rmi", "--ignore", tag)
