"""What a runtime's checkpoint produces and its restore consumes: one ``Capture`` for every runtime.

An app-level runtime captures the guest's own checkpoint document (KBs, in memory, the
producers' watermark inside it); a whole-image runtime captures the whole guest into a file
(a VM snapshot, a CRIU archive: MBs), with no watermark the executor could read. A runtime says
which it produces with its ``capture_form``; how each form is stored, fetched and sealed lives
here, so the executor handles both alike. Both are sealed by ``checkpoint_blob``: a document is
packed in memory, an image streamed through ``seal_file``.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import orjson

from services.common import checkpoint_blob
from services.common.blobstore import BlobRef, BlobStore

#: Where a fetched image is written in the instance's workdir.
INCOMING_IMAGE = "incoming.img"


class CaptureForm(StrEnum):
    """The two forms a guest's captured state takes (see the module docstring)."""

    DOCUMENT = "document"
    IMAGE = "image"

    @property
    def suffix(self) -> str:
        """The S3 key's suffix of a stored capture of this form."""
        return ".json" if self is CaptureForm.DOCUMENT else ".img"

    @property
    def periodic(self) -> bool:
        """Whether a serving guest can be captured without pausing it, so periodic and fresh
        checkpoints are possible: its own document, yes; an image freezes the whole guest, so it
        is taken only when the service moves."""
        return self is CaptureForm.DOCUMENT

    async def fetch(
        self,
        store: BlobStore,
        ref: BlobRef,
        *,
        keyring: checkpoint_blob.Keyring | None,
        service: str,
        allow_unsealed: bool,
        workdir: Path,
    ) -> Capture:
        """Fetch a stored capture of this form and open its seal (an image lands in
        ``workdir``); ``checkpoint_blob`` errors if it was altered or sealed for another."""
        if self is CaptureForm.DOCUMENT:
            document = checkpoint_blob.unpack(
                await store.get_bytes(ref),
                keyring=keyring,
                service=service,
                object_key=ref.key,
                allow_unsealed=allow_unsealed,
            )
            return Capture.of_document(document)
        image_file = workdir / INCOMING_IMAGE
        fetched = image_file.with_name(image_file.name + ".sealed")
        await store.get_file(ref, fetched)
        try:
            await asyncio.to_thread(
                functools.partial(
                    checkpoint_blob.open_file,
                    fetched,
                    image_file,
                    keyring=keyring,
                    service=service,
                    object_key=ref.key,
                    allow_unsealed=allow_unsealed,
                )
            )
        finally:
            fetched.unlink(missing_ok=True)
        return Capture(image_file)


@dataclass(frozen=True)
class Capture:
    """A guest's captured state: its checkpoint document (``bytes``) or its image file
    (``Path``), and the producers' watermark it covers (empty for an image: only the guest
    knows it)."""

    state: bytes | Path
    watermark: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of_document(cls, document: bytes) -> Capture:
        """A document capture, its watermark read from the document."""
        return cls(document, watermark_of(document))

    @property
    def form(self) -> CaptureForm:
        return CaptureForm.DOCUMENT if isinstance(self.state, bytes) else CaptureForm.IMAGE

    @property
    def document(self) -> bytes:
        """The checkpoint document (a runtime of the document form restores it)."""
        if not isinstance(self.state, bytes):
            raise TypeError(f"an image capture ({self.state}) has no checkpoint document")
        return self.state

    @property
    def image_file(self) -> Path:
        """The image file (a runtime of the image form restores it)."""
        if not isinstance(self.state, Path):
            raise TypeError("a document capture has no image file")
        return self.state

    async def store(
        self,
        store: BlobStore,
        key: str,
        *,
        keyring: checkpoint_blob.Keyring | None,
        service: str,
    ) -> BlobRef:
        """Store this capture at ``key``, sealed for ``service`` when the node holds keys."""
        if isinstance(self.state, bytes):
            blob = checkpoint_blob.pack(
                self.state, keyring=keyring, service=service, object_key=key
            )
            return await store.put_bytes(key, blob)
        if keyring is None:
            return await store.put_file(key, self.state)
        sealed = self.state.with_name(self.state.name + ".sealed")
        try:
            await asyncio.to_thread(
                checkpoint_blob.seal_file, self.state, sealed, keyring, service, key
            )
            return await store.put_file(key, sealed)
        finally:
            sealed.unlink(missing_ok=True)


def watermark_of(document: bytes) -> dict[str, int]:
    """The producers' watermark a checkpoint document carries ({} if it has none, or is not
    a JSON object)."""
    try:
        watermark = orjson.loads(document).get("watermark") or {}
    except (orjson.JSONDecodeError, AttributeError):
        return {}
    return {str(k): int(v) for k, v in watermark.items()}
