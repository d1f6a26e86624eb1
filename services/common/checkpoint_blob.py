"""How a checkpoint document is stored as a blob: the JSON itself, or zlib-compressed.

Over a constrained edge link every byte of a migration costs downtime, and a document holding
kilobytes of float windows compresses 2-3x. Small documents stay plain (compression would not pay
for itself). Readers need no flag: a document is a JSON object and starts with ``{``; a zlib
stream (RFC 1950) starts with ``x`` (0x78) — so the first byte says which it is.
"""

from __future__ import annotations

import zlib

COMPRESS_ABOVE = 1024
LEVEL = 1  # fastest: the point is fewer bytes on the link, not the smallest possible blob


class BlobFormatError(ValueError):
    """The blob is neither a JSON document nor a valid zlib stream of one."""


def pack(document: bytes) -> bytes:
    """The blob to store for ``document``."""
    if len(document) <= COMPRESS_ABOVE:
        return document
    packed = zlib.compress(document, LEVEL)
    return packed if len(packed) < len(document) else document


def unpack(blob: bytes) -> bytes:
    """The document stored in ``blob`` (see the module docstring)."""
    if blob[:1] != b"x":
        return blob
    try:
        return zlib.decompress(blob)
    except zlib.error as exc:
        raise BlobFormatError(f"checkpoint blob is not a valid zlib stream: {exc}") from exc
