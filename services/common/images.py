"""App images in the S3 store: one manifest per app naming the blob of each build target.

``ferry image push`` uploads ``unikernel/build/<target>/<app>`` builds and rewrites
``images/<app>/manifest.json``; the scheduler reads it at deploy time and hands the executor a
verified ``BlobRef``. The ``unix`` build serves the unix and podman runtimes, the ``microvm`` build
(``<app>.elf``) the microvm and microvm-snapshot runtimes.

The manifest's ``app`` member is what the app says of itself in its HELLO (name, version, mode and
its declared ``params``): push boots the unix build for a moment to ask it, so the C declaration
stays the one source of truth.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import struct
import subprocess
from pathlib import Path
from typing import Any

import orjson

from services.common.blobstore import BlobNotFound, BlobRef, BlobStore

TARGET_OF_RUNTIME = {
    "unix": "unix",
    "podman": "unix",
    "microvm": "microvm",
    "microvm-snapshot": "microvm",
}


HELLO_TIMEOUT = 10.0


class ImageNotFound(LookupError):
    """No image of that app (or not for that target) has been pushed."""


def read_hello(binary: Path, timeout: float = HELLO_TIMEOUT) -> dict[str, Any]:
    """The HELLO of a unix build (PROTOCOL.md), read by running it on a socketpair for a moment."""
    ours, theirs = socket.socketpair()
    ours.settimeout(timeout)
    with ours:
        try:
            guest = subprocess.Popen(
                [str(binary), "--fd", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        try:
            length, kind = struct.unpack("<IB", _read_exactly(ours, 5))
            body = _read_exactly(ours, length - 1)
        finally:
            guest.kill()
            guest.wait()
    if kind != 0x01:
        raise ImageNotFound(f"{binary} did not start with HELLO (frame type {kind:#x})")
    hello: dict[str, Any] = orjson.loads(body)
    return hello


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ImageNotFound("the app ended before its HELLO")
        data += chunk
    return data


def app_info(hello: dict[str, Any]) -> dict[str, Any]:
    """What the manifest keeps of a HELLO; ``params`` only when the app declares them."""
    info = {
        "name": hello.get("app"),
        "version": hello.get("app_version"),
        "mode": hello.get("mode"),
    }
    if isinstance(hello.get("params"), list):
        info["params"] = hello["params"]
    return info


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
    document: dict[str, Any] = {target: ref.to_dict() for target, ref in manifest.items()}
    unix = build_file(build_dir, "unix", app)
    if unix.is_file():
        try:
            hello = await asyncio.to_thread(read_hello, unix)
        except (OSError, ValueError, struct.error) as exc:
            raise ImageNotFound(f"{unix} did not say HELLO: {exc}") from exc
        document["app"] = app_info(hello)
    body = orjson.dumps(document)
    await store.put_bytes(manifest_key(app), body)
    return manifest


async def describe(store: BlobStore, app: str) -> dict[str, Any]:
    """An app's manifest: ``{target: blob_ref, …, "app": {name, version, mode, params?}}``."""
    try:
        ref = await store.stat(manifest_key(app))
        manifest: dict[str, Any] = orjson.loads(await store.get_bytes(ref))
    except BlobNotFound:
        raise ImageNotFound(f"no image of app {app!r}: run `ferry image push {app}`") from None
    return manifest


def declared_params(manifest: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The app's parameter declarations, or None if it declares none (older SDK)."""
    params = (manifest.get("app") or {}).get("params")
    return params if isinstance(params, list) else None


async def resolve(store: BlobStore, app: str, runtime: str) -> BlobRef:
    """The image blob a runtime needs for ``app``, from the app's manifest."""
    target = TARGET_OF_RUNTIME[runtime]
    manifest = await describe(store, app)
    if target not in manifest:
        raise ImageNotFound(f"app {app!r} has no {target} build (needed by runtime {runtime})")
    return BlobRef.from_dict(manifest[target])
