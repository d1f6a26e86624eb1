"""Captures: both forms are stored sealed and fetched back the same way through the real S3
store (Swift), and a capture sealed for another service does not open."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from services.common import checkpoint_blob
from services.common.blobstore import BlobStore
from services.common.config import FerryConfig
from services.executor.capture import Capture, CaptureForm, watermark_of


def test_a_document_carries_its_watermark() -> None:
    document = orjson.dumps({"format": "ferry-checkpoint", "watermark": {"sensor": 7}})
    capture = Capture.of_document(document)
    assert capture.form is CaptureForm.DOCUMENT and capture.document == document
    assert capture.watermark == {"sensor": 7}
    assert watermark_of(b"not json") == {} and watermark_of(b"[1, 2]") == {}
    with pytest.raises(TypeError):
        _ = capture.image_file


def test_only_documents_can_be_taken_while_serving(tmp_path: Path) -> None:
    image = Capture(tmp_path / "snapshot.bin")
    assert image.form is CaptureForm.IMAGE and image.watermark == {}
    assert CaptureForm.DOCUMENT.periodic and not CaptureForm.IMAGE.periodic
    assert (CaptureForm.DOCUMENT.suffix, CaptureForm.IMAGE.suffix) == (".json", ".img")
    with pytest.raises(TypeError):
        _ = image.document


@pytest.mark.parametrize("form", list(CaptureForm))
async def test_sealed_capture_round_trips_and_opens_only_for_its_service(
    infra: FerryConfig, tmp_path: Path, form: CaptureForm
) -> None:
    store = BlobStore(infra.s3)
    keyring = checkpoint_blob.Keyring("k1", {"k1": os.urandom(32)})
    if form is CaptureForm.DOCUMENT:
        capture = Capture.of_document(orjson.dumps({"watermark": {"a": 3}, "vars": {}}))
    else:
        image = tmp_path / "source" / "snapshot.bin"
        image.parent.mkdir()
        image.write_bytes(os.urandom(300_000))
        capture = Capture(image)
    key = f"checkpoints/svc/test-capture/{form}{form.suffix}"
    ref = await capture.store(store, key, keyring=keyring, service="svc")
    raw = await store.get_bytes(ref)
    assert raw.startswith(checkpoint_blob.SEAL_MAGIC)  # sealed, whichever form

    target = tmp_path / "target"
    target.mkdir()
    fetched = await form.fetch(
        store, ref, keyring=keyring, service="svc", allow_unsealed=False, workdir=target
    )
    assert fetched.form is form and fetched.watermark == capture.watermark
    if form is CaptureForm.DOCUMENT:
        assert fetched.document == capture.document
    else:
        assert fetched.image_file.parent == target
        assert fetched.image_file.read_bytes() == capture.image_file.read_bytes()
        fetched.image_file.unlink()

    with pytest.raises(checkpoint_blob.BlobSealError):
        await form.fetch(
            store, ref, keyring=keyring, service="other", allow_unsealed=False, workdir=target
        )
    assert list(target.iterdir()) == []  # nothing half-opened left behind
