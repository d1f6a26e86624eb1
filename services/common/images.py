"""App images in the S3 store: one manifest per app naming the blob of each build target.

``ferry image push`` uploads ``unikernel/build/<target>/<app>`` builds and rewrites
``images/<app>/manifest.json``; the scheduler reads it at deploy time and hands the executor a
verified ``BlobRef``. Which build a runtime boots (its *image target*: ``unix``, or ``microvm`` for
``<app>.elf``) is the runtime's own business: its line in the executor's runtime registry, which
each node advertises in its status (``image_targets``).

The manifest's ``app`` member is what the app says of itself in its HELLO (name, version, mode,
its declared ``params`` and the versions it ``upgrades_from``): push boots the unix build for a
moment to ask it, so the C declaration stays the one source of truth.

Versions: push also keeps each version's manifest (``images/<app>/versions/<version>.json``), so
``ferry upgrade --version`` can roll a service to any pushed version; ``manifest.json`` is the
latest push, the default of deploy and upgrade. A service keeps the image it was deployed (or
upgraded) with: pushing never changes what runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import socket
import struct
import subprocess
from pathlib import Path
from typing import Any

import orjson

from services.common.blobstore import BlobNotFound, BlobRef, BlobStore

HELLO_TIMEOUT = 10.0
#: What a version must look like to name a manifest (as in scheduler-command.schema.json).
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


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
    if isinstance(hello.get("upgrades_from"), list):
        info["upgrades_from"] = hello["upgrades_from"]
    return info


def manifest_key(app: str, version: str | None = None) -> str:
    """The latest manifest of ``app``, or that of one pushed ``version``."""
    if version is None:
        return f"images/{app}/manifest.json"
    return f"images/{app}/versions/{version}.json"


#: The builds of an app (``make -C unikernel``): a Linux process, and the microvm unikernel.
TARGETS = ("unix", "microvm")


def build_file(build_dir: Path, target: str, app: str) -> Path:
    """Where ``make -C unikernel`` leaves an app's build for a target."""
    return build_dir / target / (f"{app}.elf" if target == "microvm" else app)


async def push(
    store: BlobStore, app: str, build_dir: Path, build: str | None = None
) -> dict[str, BlobRef]:
    """Upload every target built for ``app`` (from the builds named ``build``, by default the
    app's own name) and publish the manifest, also as its version's; returns it."""
    build = build or app
    unix = build_file(build_dir, "unix", build)
    hello: dict[str, Any] | None = None
    if unix.is_file():
        try:
            hello = await asyncio.to_thread(read_hello, unix)
        except (OSError, ValueError, struct.error) as exc:
            raise ImageNotFound(f"{unix} did not say HELLO: {exc}") from exc
        if hello.get("app") != app:
            raise ImageNotFound(
                f"the build {build!r} is the app {hello.get('app')!r} "
                f"{hello.get('app_version')}, not {app!r}: push it with "
                f"`ferry image push {hello.get('app')} --build {build}`"
            )
    manifest: dict[str, BlobRef] = {}
    for target in TARGETS:
        path = build_file(build_dir, target, build)
        if path.is_file():
            data = path.read_bytes()
            ref = await store.put_bytes(
                f"images/{app}/{target}/{hashlib.sha256(data).hexdigest()}",
                data,
                "application/octet-stream",
            )
            manifest[target] = ref
    if not manifest:
        raise ImageNotFound(f"no build of {build!r} under {build_dir} (run make -C unikernel)")
    document: dict[str, Any] = {target: ref.to_dict() for target, ref in manifest.items()}
    if hello is not None:
        document["app"] = app_info(hello)
    body = orjson.dumps(document)
    version = app_version(document)
    if version is not None and VERSION_PATTERN.fullmatch(version):
        await store.put_bytes(manifest_key(app, version), body)
    await store.put_bytes(manifest_key(app), body)
    return manifest


async def describe(store: BlobStore, app: str, version: str | None = None) -> dict[str, Any]:
    """An app's manifest (the latest, or that of ``version``):
    ``{target: blob_ref, …, "app": {name, version, mode, params?, upgrades_from?}}``."""
    try:
        ref = await store.stat(manifest_key(app, version))
        manifest: dict[str, Any] = orjson.loads(await store.get_bytes(ref))
    except BlobNotFound:
        if version is not None:
            raise ImageNotFound(
                f"no version {version} of app {app!r} was pushed (`ferry image show {app}`)"
            ) from None
        raise ImageNotFound(f"no image of app {app!r}: run `ferry image push {app}`") from None
    return manifest


def app_version(manifest: dict[str, Any]) -> str | None:
    """The version the app reported at push, or None (a microvm-only push cannot ask it)."""
    version = (manifest.get("app") or {}).get("version")
    return version if isinstance(version, str) else None


def restores_from(manifest: dict[str, Any]) -> list[str] | None:
    """The versions whose checkpoints this image restores (its own and its ``upgrades_from``),
    or None when the manifest does not say (the guest still decides at restore)."""
    info = manifest.get("app") or {}
    if not isinstance(info.get("version"), str):
        return None
    return [info["version"], *(info.get("upgrades_from") or [])]


def declared_params(manifest: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The app's parameter declarations, or None if it declares none (older SDK)."""
    params = (manifest.get("app") or {}).get("params")
    return params if isinstance(params, list) else None


async def resolve(
    store: BlobStore, app: str, target: str, manifest: dict[str, Any] | None = None
) -> BlobRef:
    """``app``'s image for ``target`` (a build: ``unix``, ``microvm``), from its (latest, or
    given) manifest."""
    if manifest is None:
        manifest = await describe(store, app)
    if target not in manifest:
        raise ImageNotFound(f"app {app!r} has no {target} build (`ferry image push {app}`)")
    return BlobRef.from_dict(manifest[target])
