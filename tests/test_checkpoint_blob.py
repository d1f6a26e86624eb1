"""Checkpoint blobs: plain for small documents, zstd above, told apart by their first bytes."""

from __future__ import annotations

import orjson
import pytest

from services.common import checkpoint_blob


def document(values: int) -> bytes:
    window = [f"{(i * 2654435761) % 2**64:016x}" for i in range(values)]
    return orjson.dumps({"format": "ferry-checkpoint", "vars": {"w": {"bits": window}}})


def test_small_documents_stay_plain() -> None:
    small = document(4)
    assert checkpoint_blob.pack(small) == small
    assert checkpoint_blob.unpack(small) == small


def test_large_documents_shrink_and_round_trip() -> None:
    large = document(20_000)
    packed = checkpoint_blob.pack(large)
    assert len(packed) < len(large) * 0.7
    assert packed[:4] == checkpoint_blob.ZSTD_MAGIC
    assert checkpoint_blob.unpack(packed) == large


def test_a_damaged_stream_is_an_error_not_garbage() -> None:
    packed = bytearray(checkpoint_blob.pack(document(20_000)))
    packed[len(packed) // 2] ^= 0xFF
    with pytest.raises(checkpoint_blob.BlobFormatError):
        checkpoint_blob.unpack(bytes(packed))


def test_anything_else_is_refused() -> None:
    with pytest.raises(checkpoint_blob.BlobFormatError):
        checkpoint_blob.unpack(b"PK\x03\x04 not a checkpoint")
