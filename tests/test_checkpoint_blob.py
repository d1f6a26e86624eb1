"""Checkpoint blobs: plain for small documents, zstd above, told apart by their first bytes."""

from __future__ import annotations

from pathlib import Path

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


# -- sealing -------------------------------------------------------------------------------


@pytest.fixture
def keyring(tmp_path: Path) -> checkpoint_blob.Keyring:
    checkpoint_blob.Keyring.create(tmp_path / "checkpoint.keys")
    return checkpoint_blob.Keyring.load(tmp_path / "checkpoint.keys")


P_KEY, V_KEY = "checkpoints/p/m-1/1.json", "checkpoints/v/m-2/1.json"


@pytest.mark.parametrize("values", [4, 20_000])
def test_a_sealed_blob_shows_no_state_and_opens_for_its_service_only(
    keyring: checkpoint_blob.Keyring, values: int
) -> None:
    plain = document(values)
    sealed = checkpoint_blob.pack(plain, keyring=keyring, service="p", object_key=P_KEY)
    assert b"ferry-checkpoint" not in sealed and plain[:64] not in sealed
    assert keyring.current.encode() in sealed[:32]  # the header names its key id
    opened = checkpoint_blob.unpack(sealed, keyring=keyring, service="p", object_key=P_KEY)
    assert opened == plain
    # the attack of issue 12: service V pointed at service P's blob
    with pytest.raises(checkpoint_blob.BlobSealError, match="another service"):
        checkpoint_blob.unpack(sealed, keyring=keyring, service="v", object_key=P_KEY)
    with pytest.raises(checkpoint_blob.BlobSealError, match="another service"):
        checkpoint_blob.unpack(sealed, keyring=keyring, service="p", object_key=V_KEY)
    altered = bytearray(sealed)
    altered[-20] ^= 1
    with pytest.raises(checkpoint_blob.BlobSealError):
        checkpoint_blob.unpack(bytes(altered), keyring=keyring, service="p", object_key=P_KEY)


def test_a_missing_key_or_keyring_is_a_clear_error_naming_the_key_id(
    keyring: checkpoint_blob.Keyring, tmp_path: Path
) -> None:
    sealed = checkpoint_blob.pack(document(4), keyring=keyring, service="p", object_key=P_KEY)
    with pytest.raises(checkpoint_blob.SealKeyMissing, match=keyring.current):
        checkpoint_blob.unpack(sealed, service="p", object_key=P_KEY)
    checkpoint_blob.Keyring.create(tmp_path / "other.keys")
    other = checkpoint_blob.Keyring.load(tmp_path / "other.keys")
    with pytest.raises(checkpoint_blob.SealKeyMissing, match=f"{keyring.current}.*other.keys"):
        checkpoint_blob.unpack(sealed, keyring=other, service="p", object_key=P_KEY)


def test_rotated_keys_still_open_old_blobs_and_seal_with_the_new_one(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.keys"
    old_id = checkpoint_blob.Keyring.create(path)
    old = checkpoint_blob.pack(
        document(4), keyring=checkpoint_blob.Keyring.load(path), service="p", object_key=P_KEY
    )
    new_id = checkpoint_blob.Keyring.create(path)
    rotated = checkpoint_blob.Keyring.load(path)
    assert rotated.current == new_id and set(rotated.keys) == {old_id, new_id}
    assert checkpoint_blob.unpack(old, keyring=rotated, service="p", object_key=P_KEY)
    fresh = checkpoint_blob.pack(document(4), keyring=rotated, service="p", object_key=P_KEY)
    assert new_id.encode() in fresh[:32]
    assert path.stat().st_mode & 0o077 == 0


def test_unsealed_blobs_are_refused_with_a_keyring_unless_allowed(
    keyring: checkpoint_blob.Keyring,
) -> None:
    plain = document(20_000)
    old = checkpoint_blob.pack(plain)
    with pytest.raises(checkpoint_blob.BlobSealError, match="not sealed"):
        checkpoint_blob.unpack(old, keyring=keyring, service="p", object_key=P_KEY)
    assert checkpoint_blob.unpack(old, keyring=keyring, allow_unsealed=True) == plain
    assert checkpoint_blob.unpack(old) == plain  # no keyring configured: as before


def test_a_bad_key_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.keys"
    path.write_text("k-1 not-base64!\n")
    with pytest.raises(checkpoint_blob.BlobSealError, match=r"checkpoint\.keys:1"):
        checkpoint_blob.Keyring.load(path)
    with pytest.raises(checkpoint_blob.BlobSealError, match="cannot read"):
        checkpoint_blob.Keyring.load(tmp_path / "absent.keys")
    assert checkpoint_blob.Keyring.configured("") is None


# -- whole-image checkpoints, sealed as streams --------------------------------------------------


def image(tmp_path: Path, size: int = 3 * 1024 * 1024 + 17) -> tuple[Path, bytes]:
    """A stand-in for a podman/microvm image: readable text (so plaintext would show) of a few
    MB, more than one chunk."""
    content = (b"STATE counter=42 producer=dev-1 " * (size // 32 + 1))[:size]
    path = tmp_path / "image.img"
    path.write_bytes(content)
    return path, content


def test_a_sealed_image_shows_no_state_and_opens_for_its_service_and_key_only(
    tmp_path: Path, keyring: checkpoint_blob.Keyring
) -> None:
    source, content = image(tmp_path)
    sealed, opened = tmp_path / "sealed", tmp_path / "opened"
    checkpoint_blob.seal_file(source, sealed, keyring, "svc", "checkpoints/svc/m-1/1.json.img")
    data = sealed.read_bytes()
    assert data.startswith(checkpoint_blob.SEAL_MAGIC) and b"STATE" not in data
    assert (
        len(data)
        == len(content)
        + len(checkpoint_blob.SEAL_MAGIC)
        + 1
        + len(keyring.current)
        + checkpoint_blob.NONCE_BYTES
        + checkpoint_blob.TAG_BYTES
    )
    for service, key in (("other", "checkpoints/svc/m-1/1.json.img"), ("svc", "elsewhere.img")):
        with pytest.raises(checkpoint_blob.BlobSealError, match="does not open"):
            checkpoint_blob.open_file(
                sealed, opened, keyring=keyring, service=service, object_key=key
            )
        assert not opened.exists() and not list(tmp_path.glob("*.partial"))
    checkpoint_blob.open_file(
        sealed, opened, keyring=keyring, service="svc", object_key="checkpoints/svc/m-1/1.json.img"
    )
    assert opened.read_bytes() == content


def test_an_altered_or_truncated_image_does_not_open(
    tmp_path: Path, keyring: checkpoint_blob.Keyring
) -> None:
    source, _ = image(tmp_path)
    sealed, opened = tmp_path / "sealed", tmp_path / "opened"
    checkpoint_blob.seal_file(source, sealed, keyring, "svc", "k.img")
    data = bytearray(sealed.read_bytes())
    data[len(data) // 2] ^= 1
    sealed.write_bytes(bytes(data))
    with pytest.raises(checkpoint_blob.BlobSealError, match="altered"):
        checkpoint_blob.open_file(
            sealed, opened, keyring=keyring, service="svc", object_key="k.img"
        )
    sealed.write_bytes(bytes(data[:20]))
    with pytest.raises(checkpoint_blob.BlobSealError, match="truncated"):
        checkpoint_blob.open_file(
            sealed, opened, keyring=keyring, service="svc", object_key="k.img"
        )
    assert not opened.exists()


def test_an_image_sealed_under_an_unknown_key_or_unsealed_is_refused_clearly(
    tmp_path: Path, keyring: checkpoint_blob.Keyring
) -> None:
    source, content = image(tmp_path, 1000)
    sealed, opened = tmp_path / "sealed", tmp_path / "opened"
    checkpoint_blob.seal_file(source, sealed, keyring, "svc", "k.img")
    with pytest.raises(checkpoint_blob.SealKeyMissing, match=keyring.current):
        checkpoint_blob.open_file(sealed, opened, keyring=None, service="svc", object_key="k.img")
    with pytest.raises(checkpoint_blob.BlobSealError, match="not sealed"):
        checkpoint_blob.open_file(source, opened, keyring=keyring, service="svc", object_key="k")
    checkpoint_blob.open_file(
        source, opened, keyring=keyring, service="svc", object_key="k", allow_unsealed=True
    )
    assert opened.read_bytes() == content
