"""A node's local cache of app images, filled from the S3 store and verified by sha256.

Images are immutable and named by digest, so a cached file is valid for as long as it exists;
a fetch happens once per digest even when several starts ask for it at the same time.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from services.common.blobstore import BlobRef, BlobStore


class ImageCache:
    """Local, verified copies of image blobs, one file per sha256."""

    def __init__(self, directory: Path, store: BlobStore) -> None:
        self.directory = directory
        self.store = store
        self._locks: dict[str, asyncio.Lock] = {}

    async def path_for(self, ref: BlobRef) -> Path:
        """The local file holding ``ref``, fetching and verifying it first if needed."""
        path = self.directory / ref.sha256
        async with self._locks.setdefault(ref.sha256, asyncio.Lock()):
            if not path.exists():
                self.directory.mkdir(parents=True, exist_ok=True)
                await self.store.get_file(ref, path)
                path.chmod(0o755)
        return path
