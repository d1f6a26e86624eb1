"""The blob store against the real S3 endpoint (Swift s3api): verified round trips."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import uuid
from pathlib import Path

import pytest

from services.common.blobstore import (
    BlobNotFound,
    BlobRef,
    BlobStore,
    IntegrityError,
    LocalFileError,
)
from services.common.config import FerryConfig


async def test_put_get_stat_delete_round_trip(infra: FerryConfig) -> None:
    store = BlobStore(infra.s3)
    key = f"test/{uuid.uuid4().hex}.json"
    ref = await store.put_bytes(key, b'{"hello": 1}')
    assert ref.size == 12 and len(ref.sha256) == 64
    assert await store.get_bytes(ref) == b'{"hello": 1}'
    assert await store.stat(key) == ref
    assert key in await store.list_keys("test/")
    await store.delete(key)
    with pytest.raises(BlobNotFound):
        await store.get_bytes(ref)


async def test_a_replaced_or_corrupt_blob_is_never_returned(infra: FerryConfig) -> None:
    store = BlobStore(infra.s3)
    key = f"test/{uuid.uuid4().hex}"
    ref = await store.put_bytes(key, b"original state")
    await store.put_bytes(key, b"tampered state")
    with pytest.raises(IntegrityError, match="corrupt or was replaced"):
        await store.get_bytes(ref)
    forged = BlobRef(ref.bucket, key, "0" * 64, ref.size)
    with pytest.raises(IntegrityError):
        await store.get_bytes(forged)


async def test_large_files_go_multipart_and_verify(infra: FerryConfig, tmp_path: Path) -> None:
    store = BlobStore(infra.s3)
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(20 * 1024 * 1024))
    ref = await store.put_file(f"test/{uuid.uuid4().hex}.bin", source)
    target = tmp_path / "copy.bin"
    await store.get_file(ref, target)
    assert target.read_bytes() == source.read_bytes()
    bad = BlobRef(ref.bucket, ref.key, "f" * 64, ref.size)
    with pytest.raises(IntegrityError):
        await store.get_file(bad, tmp_path / "never.bin")
    assert not (tmp_path / "never.bin").exists()
    assert not (tmp_path / "never.bin.partial").exists()


class BreakingLink:
    """A TCP relay in front of the real S3 endpoint that drops its first connection after
    ``cut`` response bytes, as a flaky edge link would; it records each request's headers."""

    def __init__(self, endpoint: str, cut: int) -> None:
        host, port = endpoint.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.cut = cut
        self.connections = 0
        self.requests = b""
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        budget = self.cut if self.connections == 1 else None
        server_r, server_w = await asyncio.open_connection(*self.upstream)

        async def upstream() -> None:
            while data := await client_r.read(65536):
                self.requests += data
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            nonlocal budget
            while data := await server_r.read(65536):
                if budget is not None:
                    data = data[:budget]
                    budget -= len(data)
                client_w.write(data)
                await client_w.drain()
                if budget == 0:
                    return

        pumps = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in pumps:
            pump.cancel()
        client_w.close()
        server_w.close()


async def test_a_broken_download_resumes_where_it_stopped(
    infra: FerryConfig, tmp_path: Path
) -> None:
    store = BlobStore(infra.s3)
    ref = await store.put_bytes(f"test/{uuid.uuid4().hex}", os.urandom(3 * 1024 * 1024))
    link = BreakingLink(infra.s3.endpoint, cut=1024 * 1024)
    async with link as endpoint:
        flaky = BlobStore(dataclasses.replace(infra.s3, endpoint=endpoint))
        await flaky.get_file(ref, tmp_path / "blob")
    assert (tmp_path / "blob").read_bytes() == await store.get_bytes(ref)
    assert link.connections == 2
    assert re.search(rb"[Rr]ange: bytes=\d{6,}-", link.requests)  # picked up past the break
    assert not (tmp_path / "blob.partial").exists()


async def test_a_full_local_disk_is_named_as_such_and_left_empty(
    infra: FerryConfig, tiny_disk: Path
) -> None:
    store = BlobStore(infra.s3)
    ref = await store.put_bytes(f"test/{uuid.uuid4().hex}", os.urandom(256 * 1024))
    with pytest.raises(LocalFileError, match=r"cannot write .*tiny-disk.*No space left on device"):
        await store.get_file(ref, tiny_disk / "blob")
    assert list(tiny_disk.iterdir()) == []  # the partial download gave its space back
