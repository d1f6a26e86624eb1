"""Checkpoint and image blobs in the S3 store (MinIO in production, Swift s3api locally).

Every blob is addressed by a ``BlobRef`` carrying its sha256 and size, recorded at upload; a
download whose bytes do not hash to the recorded digest raises ``IntegrityError`` and is never
handed on. The minio client is synchronous, so every call runs in a worker thread: the event loop
of a service never waits on the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
from minio import Minio
from minio.error import S3Error

from services.common import tls
from services.common.config import S3Config
from services.common.messages import BlobRefDoc

log = logging.getLogger(__name__)

MULTIPART_PART_SIZE = 16 * 1024 * 1024
#: Broken downloads in a row, each without a single new byte, before a download gives up.
STALLED_ATTEMPTS = 3
SHA256_META = "sha256"


class BlobError(Exception):
    """The store could not be reached or refused the operation."""


class BlobNotFound(BlobError):
    """No object under that key."""


class IntegrityError(BlobError):
    """The bytes fetched do not match the digest or size recorded at upload."""


class LocalFileError(BlobError):
    """A local file could not be read or written (a full disk, permissions): the store is fine."""


@dataclass(frozen=True)
class BlobRef:
    """Where a blob lives and what its bytes must hash to (the ``blob_ref`` schema)."""

    bucket: str
    key: str
    sha256: str
    size: int

    def to_dict(self) -> BlobRefDoc:
        return BlobRefDoc(bucket=self.bucket, key=self.key, sha256=self.sha256, size=self.size)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BlobRef:
        return cls(str(data["bucket"]), str(data["key"]), str(data["sha256"]), int(data["size"]))


def _ssl_reason(exc: BaseException) -> str:
    """The innermost SSL error of a urllib3 failure (its message wraps it in retry noise)."""
    seen: BaseException | None = exc
    while seen is not None:
        reason = getattr(seen, "reason", None)
        if isinstance(reason, BaseException):
            seen = reason
            continue
        break
    return str(seen or exc)


class BlobStore:
    """Async put/get/stat/delete of verified blobs in one bucket."""

    def __init__(self, config: S3Config) -> None:
        self.config = config
        self.bucket = config.bucket
        # One limit for connect and read: urllib3 keeps the *connect* timeout on the socket while
        # it sends a request body, so a short one would cut off any upload that takes longer
        # (an 8 MB blob needs ~7 s at 10 Mbit/s). Phases are bounded by the scheduler anyway.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=config.timeout, read=config.timeout),
            maxsize=16,
            retries=urllib3.Retry(total=3, backoff_factor=0.1, status_forcelist=(500, 502, 503)),
            **tls.urllib3_options(config),
        )
        self._client = Minio(
            config.endpoint,
            access_key=config.access_key,
            secret_key=config.secret_key,
            region=config.region,
            secure=config.secure,
            http_client=http,
        )
        self._bucket_ready = False
        self._last_request = float("-inf")

    def idle_for(self) -> float:
        """Seconds since this client's last request ended (inf before the first)."""
        return time.monotonic() - self._last_request

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except S3Error as exc:
            if exc.code in {"NoSuchKey", "NoSuchObject"}:
                raise BlobNotFound(f"s3://{self.bucket}/{exc.object_name}: not found") from exc
            raise BlobError(f"S3 {exc.code}: {exc.message} ({self.config.endpoint})") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            if tls.is_tls_failure(str(exc)):
                raise BlobError(
                    f"TLS with S3 store https://{self.config.endpoint} failed: {_ssl_reason(exc)}; "
                    "check s3.ca (the CA that signed the store's certificate)"
                ) from exc
            raise BlobError(f"S3 store at {self.config.endpoint} unreachable: {exc}") from exc
        finally:
            self._last_request = time.monotonic()

    async def ensure_bucket(self) -> None:
        """Create the bucket on first use (idempotent)."""
        if self._bucket_ready:
            return
        if not await self._call(self._client.bucket_exists, self.bucket):
            try:
                await self._call(self._client.make_bucket, self.bucket, self.config.region)
            except BlobError as exc:
                if "BucketAlreadyOwnedByYou" not in str(exc):
                    raise
        self._bucket_ready = True

    async def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/json"
    ) -> BlobRef:
        """Upload ``data`` and return its reference (sha256 computed here, stored as metadata)."""
        await self.ensure_bucket()
        digest = hashlib.sha256(data).hexdigest()
        await self._call(
            self._client.put_object,
            self.bucket,
            key,
            io.BytesIO(data),
            len(data),
            content_type=content_type,
            metadata={SHA256_META: digest},
            part_size=MULTIPART_PART_SIZE,
        )
        return BlobRef(self.bucket, key, digest, len(data))

    async def put_file(
        self, key: str, path: Path, content_type: str = "application/octet-stream"
    ) -> BlobRef:
        """Upload a file (multipart above 16 MiB) and return its reference."""
        await self.ensure_bucket()
        with _local_file(path, "read"):
            digest = await asyncio.to_thread(_sha256_file, path)
        await self._call(
            self._client.fput_object,
            self.bucket,
            key,
            str(path),
            content_type=content_type,
            metadata={SHA256_META: digest},
            part_size=MULTIPART_PART_SIZE,
        )
        size = (await asyncio.to_thread(path.stat)).st_size
        return BlobRef(self.bucket, key, digest, size)

    async def get_bytes(self, ref: BlobRef) -> bytes:
        """Download and verify; raise IntegrityError rather than return bytes that do not match."""
        data: bytes = await self._call(self._read_object, ref.bucket, ref.key)
        _verify(ref, len(data), hashlib.sha256(data).hexdigest())
        return data

    def _read_object(self, bucket: str, key: str) -> bytes:
        response = self._client.get_object(bucket, key)
        try:
            return bytes(response.read())
        finally:
            response.close()
            response.release_conn()

    async def get_file(self, ref: BlobRef, path: Path) -> None:
        """Download to ``path`` atomically: the file appears only once verified, and nothing is
        left behind when it cannot be (a full disk gets its space back)."""
        partial = path.with_name(path.name + ".partial")
        try:
            await self._call(self._download, ref, partial)
            with _local_file(partial, "read"):
                digest = await asyncio.to_thread(_sha256_file, partial)
                _verify(ref, partial.stat().st_size, digest)
                partial.replace(path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

    def _download(self, ref: BlobRef, partial: Path) -> None:
        """Write the object to ``partial``, resuming with a range request where a transfer broke.

        Why: over a constrained edge link a large blob takes minutes, and one dropped connection
        must cost neither the bytes already moved nor the migration waiting for them. A download
        gives up after ``STALLED_ATTEMPTS`` breaks in a row that brought nothing new.
        """
        with _local_file(partial, "write"):
            partial.unlink(missing_ok=True)
            partial.touch()
        stalled = 0
        while True:
            offset = partial.stat().st_size
            try:
                response = self._client.get_object(ref.bucket, ref.key, offset=offset)
                try:
                    # The stream's network errors reach us as urllib3 errors, never as OSError,
                    # so an OSError in here is the local file's.
                    with _local_file(partial, "write"), partial.open("ab") as out:
                        for chunk in response.stream(amt=64 * 1024):
                            out.write(chunk)
                finally:
                    response.close()
                    response.release_conn()
                return  # the caller verifies size and digest
            except urllib3.exceptions.HTTPError as exc:
                received = partial.stat().st_size
                stalled = 0 if received > offset else stalled + 1
                if received >= ref.size or stalled >= STALLED_ATTEMPTS:
                    raise
                log.warning(
                    "s3://%s/%s: transfer broke at %d of %d bytes (%s); resuming",
                    ref.bucket,
                    ref.key,
                    received,
                    ref.size,
                    exc,
                )

    async def stat(self, key: str) -> BlobRef:
        """The reference of a stored blob, from its recorded metadata."""
        info = await self._call(self._client.stat_object, self.bucket, key)
        metadata = {k.lower(): v for k, v in (info.metadata or {}).items()}
        digest = metadata.get(f"x-amz-meta-{SHA256_META}", "")
        return BlobRef(self.bucket, key, digest, int(info.size or 0))

    async def delete(self, key: str, bucket: str | None = None) -> None:
        """Delete one object (of ``bucket``, default this store's); a missing one is no error."""
        await self._call(self._client.remove_object, bucket or self.bucket, key)

    async def list_keys(self, prefix: str) -> list[str]:
        def collect() -> list[str]:
            objects = self._client.list_objects(self.bucket, prefix=prefix, recursive=True)
            return [o.object_name for o in objects if o.object_name]

        await self.ensure_bucket()
        keys: list[str] = await self._call(collect)
        return keys


@contextlib.contextmanager
def _local_file(path: Path, doing: str) -> Iterator[None]:
    """Turn an OSError on a local file into LocalFileError naming the file, so that a full disk
    is never reported as an unreachable store."""
    try:
        yield
    except OSError as exc:
        raise LocalFileError(f"cannot {doing} {path}: {exc.strerror or exc}") from exc


def _verify(ref: BlobRef, size: int, digest: str) -> None:
    if size != ref.size or digest != ref.sha256:
        raise IntegrityError(
            f"s3://{ref.bucket}/{ref.key}: expected sha256 {ref.sha256[:12]}… ({ref.size} B), "
            f"got {digest[:12]}… ({size} B): the blob is corrupt or was replaced"
        )


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
