"""App images in the S3 store: one manifest per app naming the blob of each build target.

``ferry image push`` uploads ``unikernel/build/<target>/<app>`` builds and rewrites
``images/<app>/manifest.json``; the scheduler reads it at deploy time and hands the executor a
verified ``BlobRef``. The ``unix`` build serves the unix and podman runtimes, the ``microvm`` build
(``<app>.elf``) the microvm and microvm-snapshot runtimes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import orjson

from services.common.blobstore import BlobNotFound, BlobRef, BlobStore

TARGET_OF_RUNTIME = {
    "unix": "unix",
    "podman": "unix",
    "microvm": "microvm",
    "microvm-snapshot": "microvm",
}


class ImageNotFound(LookupError):
    """No image of that app (or not for that target) has been pushed."""


def manifest_key(app: str) -> str:
    return f"images/{app}/manifest.json"


def build_file(build_dir: Path, target: str, app: str) -> Path:
    """Where ``make -C unikernel`` leaves an app's build for a target."""
    return build_dir / target / (f"{app}.elf" if target == "microvm" else app)


async def push(store: BlobStore, app: str, build_dir: Path) -> dict[str, BlobRef]:
    """Upload every target built for ``app`` and publish the manifest; returns it."""
    manifest: dict[str, BlobRef] = {}
    for target in ("unix", "microvm"):
        path = build_file(build_dir, target, app)
        if path.is_file():
            data = path.read_bytes()
            ref = await store.put_bytes(
                f"images/{app}/{target}/{hashlib.sha256(data).hexdigest()}",
                data,
                "application/octet-stream",
            )
            manifest[target] = ref
    if not manifest:
        raise ImageNotFound(f"no build of {app!r} under {build_dir} (run make -C unikernel)")
    body = orjson.dumps({target: ref.to_dict() for target, ref in manifest.items()})
    await store.put_bytes(manifest_key(app), body)
    return manifest


async def resolve(store: BlobStore, app: str, runtime: str) -> BlobRef:
    """The image blob a runtime needs for ``app``, from the app's manifest."""
    target = TARGET_OF_RUNTIME[runtime]
    try:
        ref = await store.stat(manifest_key(app))
        manifest = orjson.loads(await store.get_bytes(ref))
    except BlobNotFound:
        raise ImageNotFound(f"no image of app {app!r}: run `ferry image push {app}`") from None
    if target not in manifest:
        raise ImageNotFound(f"app {app!r} has no {target} build (needed by runtime {runtime})")
    return BlobRef.from_dict(manifest[target])
