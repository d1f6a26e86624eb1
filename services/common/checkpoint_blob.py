"""How a checkpoint document is stored as a blob: the JSON itself, or zstd-compressed.

Over a constrained edge link every byte of a migration costs downtime, and a document holding
windows of sensor readings compresses 3-4x. Small documents stay plain (compression would not
pay for itself). Readers need no flag: a document is a JSON object and starts with ``{``; a zstd
frame starts with its magic number — so the first bytes say which it is.

Level 6: on a 1.4 MB document (1 MB of readings) it takes ~19 ms and leaves 354 KB, where zstd 3
leaves 430 KB in ~7 ms and zlib 1 leaves 502 KB in ~11 ms; at 100 Mbit/s the saved bytes already
pay for the extra time, on slower edge links they win outright.

Sealed blobs (when a keyring is given): the packed blob encrypted and authenticated with AES-256-GCM
(``cryptography``), behind a header naming the key id, so keys rotate and old blobs still open.
The associated data binds the blob to its service and its S3 key: a blob of service P restored
into service V, or copied to another key, does not open. A reader of the bucket sees ciphertext.
Layout: ``SEAL_MAGIC | len(key id) | key id | 12-byte nonce | ciphertext+tag``.

Whole-image checkpoints (podman, microvm-snapshot: files of MBs to GBs) are sealed the same way,
in the same layout, but streamed in chunks (``seal_file`` / ``open_file``): AES-GCM is the same
cipher whether fed at once or in pieces, so a sealed image is as bound to its service and key.
"""

from __future__ import annotations

import base64
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

COMPRESS_ABOVE = 1024
LEVEL = 6
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_DOCUMENT = 64 * 1024 * 1024  # far above the 16 MiB channel frame: a bound, not a limit


SEAL_MAGIC = b"FERRYSEAL1"
NONCE_BYTES = 12
TAG_BYTES = 16
FILE_CHUNK = 1024 * 1024


class BlobFormatError(ValueError):
    """The blob is neither a JSON document nor a valid zstd frame of one."""


class BlobSealError(BlobFormatError):
    """A sealed blob that does not open here (wrong service or key, altered), or an unsealed blob
    where only sealed ones are accepted."""


class SealKeyMissing(BlobSealError):
    """The blob is sealed with a key id the keyring does not hold (or there is no keyring)."""

    def __init__(self, key_id: str, where: str) -> None:
        super().__init__(f"checkpoint blob is sealed with key id {key_id!r}, which {where} lacks")
        self.key_id = key_id


@dataclass(frozen=True)
class Keyring:
    """Checkpoint keys by id; ``current`` seals, all open. Only executors (and operators who
    inspect checkpoints) hold the file: one ``<key id> <base64 of 32 bytes>`` per line, current
    key first."""

    current: str
    keys: dict[str, bytes]
    source: str = "the keyring"

    @classmethod
    def load(cls, path: str | Path) -> Keyring:
        keys: dict[str, bytes] = {}
        try:
            lines = Path(path).read_text().split("\n")
        except OSError as exc:
            raise BlobSealError(f"cannot read checkpoint key file {path}: {exc}") from exc
        for number, line in enumerate(lines, 1):
            if not line.strip() or line.startswith("#"):
                continue
            try:
                key_id, encoded = line.split()
                key = base64.b64decode(encoded, validate=True)
            except ValueError as exc:
                raise BlobSealError(f"{path}:{number}: expected '<key id> <base64 key>'") from exc
            if len(key) != 32 or not key_id.isascii() or len(key_id) > 64:
                raise BlobSealError(f"{path}:{number}: a key is 32 bytes, its id ≤ 64 ASCII chars")
            keys[key_id] = key
        if not keys:
            raise BlobSealError(f"checkpoint key file {path} holds no key")
        return cls(next(iter(keys)), keys, f"key file {path}")

    @classmethod
    def configured(cls, path: str) -> Keyring | None:
        """The keyring of config key ``executor.checkpoint_key_file``; None when it is empty."""
        return cls.load(path) if path else None

    @staticmethod
    def create(path: str | Path) -> str:
        """Put a new random key first in the key file at ``path`` (made 0600 if new), keeping the
        older keys so blobs sealed with them still open; returns the new key id."""
        key_id = f"k-{secrets.token_hex(4)}"
        line = f"{key_id} {base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()}\n"
        target = Path(path)
        old = target.read_text() if target.exists() else ""
        fd = os.open(target.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(line + old)
        os.replace(target.with_suffix(".tmp"), target)
        return key_id


def _associated_data(header: bytes, service: str, object_key: str) -> bytes:
    return b"\0".join((header, service.encode(), object_key.encode()))


def pack(
    document: bytes, *, keyring: Keyring | None = None, service: str = "", object_key: str = ""
) -> bytes:
    """The blob to store for ``document``; sealed for ``service`` at S3 key ``object_key`` when
    a keyring is given (unpack must be given the same two)."""
    packed = _compress(document)
    if keyring is None:
        return packed
    key_id = keyring.current.encode()
    header = SEAL_MAGIC + bytes([len(key_id)]) + key_id
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(keyring.keys[keyring.current]).encrypt(
        nonce, packed, _associated_data(header, service, object_key)
    )
    return header + nonce + sealed


def unpack(
    blob: bytes,
    *,
    keyring: Keyring | None = None,
    service: str = "",
    object_key: str = "",
    allow_unsealed: bool = False,
) -> bytes:
    """The document stored in ``blob`` (see the module docstring).

    With a keyring, an unsealed blob is refused unless ``allow_unsealed`` (blobs written before
    sealing was turned on); without one, a sealed blob is refused naming its key id.
    """
    if blob.startswith(SEAL_MAGIC):
        return _compressed_document(_open(blob, keyring, service, object_key))
    if keyring is not None and not allow_unsealed:
        raise BlobSealError(
            "checkpoint blob is not sealed, and this executor accepts sealed blobs only "
            "(executor.allow_unsealed_checkpoints)"
        )
    return _compressed_document(blob)


def _open(blob: bytes, keyring: Keyring | None, service: str, object_key: str) -> bytes:
    at = len(SEAL_MAGIC)
    if len(blob) < at + 1 or len(blob) < at + 1 + blob[at] + NONCE_BYTES + 16:
        raise BlobSealError("sealed checkpoint blob is truncated")
    end = at + 1 + blob[at]
    key_id = blob[at + 1 : end].decode("ascii", "replace")
    if keyring is None:
        raise SealKeyMissing(key_id, "this process (no executor.checkpoint_key_file)")
    key = keyring.keys.get(key_id)
    if key is None:
        raise SealKeyMissing(key_id, keyring.source)
    nonce, sealed = blob[end : end + NONCE_BYTES], blob[end + NONCE_BYTES :]
    try:
        return AESGCM(key).decrypt(nonce, sealed, _associated_data(blob[:end], service, object_key))
    except InvalidTag:
        raise BlobSealError(
            f"sealed checkpoint blob does not open for service {service!r} at {object_key!r}: "
            "it was sealed for another service or S3 key, or has been altered"
        ) from None


def _compress(document: bytes) -> bytes:
    if len(document) <= COMPRESS_ABOVE:
        return document
    packed = zstandard.ZstdCompressor(level=LEVEL, write_checksum=True).compress(document)
    return packed if len(packed) < len(document) else document


def _compressed_document(blob: bytes) -> bytes:
    if blob[:1] == b"{":
        return blob
    if blob[:4] != ZSTD_MAGIC:
        raise BlobFormatError("checkpoint blob is neither a JSON document nor zstd-compressed")
    try:
        return zstandard.ZstdDecompressor().decompress(blob, max_output_size=MAX_DOCUMENT)
    except zstandard.ZstdError as exc:
        raise BlobFormatError(f"checkpoint blob is not a valid zstd frame: {exc}") from exc


def seal_file(source: Path, target: Path, keyring: Keyring, service: str, object_key: str) -> None:
    """Write ``source`` (a whole-image checkpoint) sealed to ``target``, in ``pack``'s layout."""
    key_id = keyring.current.encode()
    header = SEAL_MAGIC + bytes([len(key_id)]) + key_id
    nonce = os.urandom(NONCE_BYTES)
    encryptor = Cipher(algorithms.AES(keyring.keys[keyring.current]), modes.GCM(nonce)).encryptor()
    encryptor.authenticate_additional_data(_associated_data(header, service, object_key))
    with source.open("rb") as plain, target.open("wb") as out:
        out.write(header + nonce)
        while chunk := plain.read(FILE_CHUNK):
            out.write(encryptor.update(chunk))
        out.write(encryptor.finalize() + encryptor.tag)


def open_file(
    source: Path,
    target: Path,
    *,
    keyring: Keyring | None,
    service: str,
    object_key: str,
    allow_unsealed: bool = False,
) -> None:
    """Write the image sealed in ``source`` to ``target``; nothing is left at ``target`` unless
    it opened (right key, service and S3 key, not altered). Unsealed: as ``unpack`` decides."""
    with source.open("rb") as sealed:
        head = sealed.read(len(SEAL_MAGIC) + 1)
        if not head.startswith(SEAL_MAGIC):
            if keyring is not None and not allow_unsealed:
                raise BlobSealError(
                    "checkpoint image is not sealed, and this executor accepts sealed blobs only "
                    "(executor.allow_unsealed_checkpoints)"
                )
            source.replace(target)
            return
        key_id_bytes = sealed.read(head[-1])
        key_id = key_id_bytes.decode("ascii", "replace")
        nonce = sealed.read(NONCE_BYTES)
        body_start = sealed.tell()
        body_end = sealed.seek(0, os.SEEK_END) - TAG_BYTES
        if len(nonce) != NONCE_BYTES or body_end < body_start:
            raise BlobSealError("sealed checkpoint image is truncated")
        if keyring is None:
            raise SealKeyMissing(key_id, "this process (no executor.checkpoint_key_file)")
        key = keyring.keys.get(key_id)
        if key is None:
            raise SealKeyMissing(key_id, keyring.source)
        sealed.seek(body_end)
        tag = sealed.read(TAG_BYTES)
        decryptor = Cipher(algorithms.AES(key), modes.GCM(nonce, tag)).decryptor()
        decryptor.authenticate_additional_data(
            _associated_data(head + key_id_bytes, service, object_key)
        )
        partial = target.with_name(target.name + ".partial")
        sealed.seek(body_start)
        try:
            with partial.open("wb") as out:
                left = body_end - body_start
                while left > 0:
                    chunk = sealed.read(min(FILE_CHUNK, left))
                    left -= len(chunk)
                    out.write(decryptor.update(chunk))
                out.write(decryptor.finalize())
        except InvalidTag:
            partial.unlink(missing_ok=True)
            raise BlobSealError(
                f"sealed checkpoint image does not open for service {service!r} at "
                f"{object_key!r}: it was sealed for another service or S3 key, or has been altered"
            ) from None
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    partial.replace(target)
