"""The blob store against the real S3 endpoint (Swift s3api): verified round trips."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from services.common.blobstore import BlobNotFound, BlobRef, BlobStore, IntegrityError
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
