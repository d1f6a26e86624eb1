"""The ``podman`` runtime: the app's unix binary in a container, moved as a CRIU checkpoint.

The peer Ferry is benchmarked against. The container runs ``APP --listen 127.0.0.1:PORT`` on the
host network (``services.executor.podman``, PODMAN.md) and the executor is its TCP controller.
``capture`` disconnects (CRIU cannot carry the connection to another node anyway) and exports a
checkpoint archive; ``launch_from`` imports it under the target's container name and connects to
the same port, which the listening socket inside the checkpoint is bound to. The port is read from
the archive's own container config, never guessed.

The image is built here, not with ``podman.build_image``: a restore needs an image with the very
ID recorded in the checkpoint, and ``podman import`` stamps the import time into the image config,
so two nodes importing the same binary get different IDs and the restore fails (``creating
container storage: parsing named reference "<id>"``). ``_image_archive`` builds the image config
from the binary alone, so every node derives the same ID from the same binary.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import platform
import socket
import tarfile
from pathlib import Path

from services.executor import podman
from services.executor.channel import GuestChannel
from services.executor.runtime import Guest, LaunchSpec, RuntimeError_

ARCHIVE_NAME = "checkpoint.tar.zst"
HELLO_TIMEOUT = 10.0
_EPOCH = "1970-01-01T00:00:00Z"
_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


async def podman_available() -> tuple[bool, str]:
    """Whether this node can run the podman runtime, and why not (or the criu version)."""
    return await podman.criu_available()


def container_name(instance: str) -> str:
    return f"ferry-{instance}"


class PodmanRuntime:
    """Runs guests as rootful runc containers; moves them with ``podman container checkpoint``."""

    name = "podman"
    whole_image = True

    def __init__(self) -> None:
        # (binary path, size, mtime_ns) -> image ID known to exist in local storage
        self._images: dict[tuple[str, int, int], str] = {}
        self._subreaper = False

    async def prepare(self, spec: LaunchSpec) -> None:
        """Make sure the app's image exists, so ``launch_from`` only has to restore."""
        await self._ensure_image(spec)

    async def launch(self, spec: LaunchSpec) -> Guest:
        self._become_subreaper()
        image = await self._ensure_image(spec)
        name = container_name(spec.instance)
        port = _free_port()
        try:
            await podman.remove(name)  # a leftover of a crashed executor would block the name
            await podman.run(name, image, ["--listen", f"127.0.0.1:{port}"], port)
        except podman.PodmanError as exc:
            await _remove_quietly(name)
            raise RuntimeError_(f"cannot start container {name}: {exc}") from exc
        return await self._connect(spec, name, port, "waiting")

    async def capture(self, guest: Guest, spec: LaunchSpec) -> Path:
        """Disconnect and checkpoint the container to ``spec.workdir``; it is stopped after."""
        name, _ = _container_of(guest)
        await guest.channel.close()
        archive = spec.workdir / ARCHIVE_NAME
        archive.unlink(missing_ok=True)
        try:
            result = await podman.checkpoint_export(name, archive)
        except podman.PodmanError as exc:
            raise RuntimeError_(f"checkpoint of {name} failed: {exc}") from exc
        guest.detail["captured"] = archive
        guest.detail["checkpoint_seconds"] = result.seconds
        return archive

    async def launch_from(self, spec: LaunchSpec, image_file: Path) -> Guest:
        """Restore ``image_file`` as this node's container for ``spec.instance`` and connect."""
        self._become_subreaper()
        wanted_image, port = await _read_archive(image_file)
        local_image = await self._ensure_image(spec)
        if local_image != wanted_image:
            raise RuntimeError_(
                f"{image_file.name} was taken from image {wanted_image[:12]}, but {spec.image} "
                f"gives image {local_image[:12]} here: the nodes run different app binaries"
            )
        name = container_name(spec.instance)
        try:
            await podman.restore_import(image_file, name, port)
        except podman.PodmanError as exc:
            raise RuntimeError_(f"restore of {name} from {image_file.name} failed: {exc}") from exc
        return await self._connect(spec, name, port, "running")

    async def resume_captured(self, guest: Guest, spec: LaunchSpec) -> Guest:
        """Rollback: the checkpoint stopped the source; restore the same archive under its name."""
        name, port = _container_of(guest)
        archive = guest.detail.get("captured")
        if not isinstance(archive, Path):
            raise RuntimeError_(f"{name} was not captured: nothing to resume from")
        self._become_subreaper()
        try:
            await podman.remove(name)
            await podman.restore_import(archive, name, port)
        except podman.PodmanError as exc:
            raise RuntimeError_(f"cannot resume {name} from {archive.name}: {exc}") from exc
        resumed = await self._connect(spec, name, port, "running")
        resumed.detail["captured"] = None
        return resumed

    async def terminate(self, guest: Guest) -> None:
        await guest.channel.close()
        name = guest.detail.get("container")
        if isinstance(name, str):
            await _remove_quietly(name)

    async def _connect(self, spec: LaunchSpec, name: str, port: int, state: str) -> Guest:
        """Connect to the container's app and read its HELLO (``state`` as expected)."""
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            channel = GuestChannel(reader, writer)
            hello = await asyncio.wait_for(channel.hello(), HELLO_TIMEOUT)
        except Exception as exc:
            await _remove_quietly(name)
            raise RuntimeError_(
                f"{name} on port {port} did not greet ({type(exc).__name__}: {exc}); "
                f"see `podman logs {name}`"
            ) from exc
        if hello.get("app") != spec.app or hello.get("state") != state:
            await channel.close()
            await _remove_quietly(name)
            raise RuntimeError_(
                f"{name} on port {port} greeted as {hello.get('app')!r} in state "
                f"{hello.get('state')!r}; expected {spec.app!r} in state {state!r}"
            )
        return Guest(channel=channel, detail={"container": name, "port": port})

    async def _ensure_image(self, spec: LaunchSpec) -> str:
        """The ID of the app's image, loaded into local storage if missing."""
        try:
            stat = spec.image.stat()
        except OSError as exc:
            raise RuntimeError_(f"app binary {spec.image}: {exc}") from exc
        key = (str(spec.image), stat.st_size, stat.st_mtime_ns)
        known = self._images.get(key)
        if known is not None:
            return known
        archive, image_id = await asyncio.to_thread(_image_archive, spec.image, spec.app)
        code, _, _ = await _exec("podman", "image", "exists", image_id)
        if code != 0:
            code, _, err = await _exec("podman", "load", stdin=archive)
            if code != 0:
                raise RuntimeError_(f"`podman load` of {spec.app}'s image failed: {err.strip()}")
        self._images[key] = image_id
        return image_id

    def _become_subreaper(self) -> None:
        if not self._subreaper:
            podman.become_subreaper()
            self._subreaper = True


def _container_of(guest: Guest) -> tuple[str, int]:
    name, port = guest.detail.get("container"), guest.detail.get("port")
    if not isinstance(name, str) or not isinstance(port, int):
        raise RuntimeError_("guest was not started by the podman runtime")
    return name, port


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _image_archive(binary: Path, app: str) -> tuple[bytes, str]:
    """A docker-archive holding ``binary`` as the image's only file, and the image's ID.

    Everything in it (file times, owner, config, history) is fixed or derived from the binary's
    bytes, so the ID (the sha256 of the config) is the same on every node. The binary-digest
    label is the one ``podman.build_image`` checks, so both agree the image is current.
    """
    data = binary.read_bytes()
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo(binary.name)
        info.size, info.mode, info.mtime = len(data), 0o755, 0
        tar.addfile(info, io.BytesIO(data))
    layer_bytes = layer.getvalue()
    layer_digest = hashlib.sha256(layer_bytes).hexdigest()
    config = {
        "architecture": _ARCH.get(platform.machine(), platform.machine()),
        "os": "linux",
        "created": _EPOCH,
        "config": {
            "Entrypoint": [f"/{binary.name}"],
            "Labels": {podman.BINARY_LABEL: hashlib.sha256(data).hexdigest()},
        },
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
        "history": [{"created": _EPOCH, "created_by": "ferry: the app's static binary"}],
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    image_id = hashlib.sha256(config_bytes).hexdigest()
    manifest = [
        {
            "Config": f"{image_id}.json",
            "RepoTags": [f"localhost/ferry-{app}:{image_id[:12]}"],
            "Layers": [f"{layer_digest}/layer.tar"],
        }
    ]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, body in (
            (f"{layer_digest}/layer.tar", layer_bytes),
            (f"{image_id}.json", config_bytes),
            ("manifest.json", json.dumps(manifest).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(body), 0
            tar.addfile(info, io.BytesIO(body))
    return out.getvalue(), image_id


async def _read_archive(archive: Path) -> tuple[str, int]:
    """(image ID, TCP port) of the container a checkpoint archive was taken from.

    Both come from the archive's ``config.dump`` (podman's container config): the port is in the
    ``--listen 127.0.0.1:PORT`` argument the container was started with, and the socket CRIU
    restores is bound to exactly that port. GNU tar detects the compression (zstd needs the
    ``zstd`` program, Debian package ``zstd``).
    """
    code, out, err = await _exec("tar", "-xOf", str(archive), "config.dump")
    if code != 0:
        raise RuntimeError_(f"cannot read config.dump from {archive}: {err.strip()}")
    try:
        config = json.loads(out)
        command = list(config["command"])
        image_id = str(config["rootfsImageID"])
        listen = command[command.index("--listen") + 1]
        port = int(str(listen).rpartition(":")[2])
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise RuntimeError_(
            f"{archive.name} is not a checkpoint of a Ferry container ({type(exc).__name__}: {exc})"
        ) from exc
    return image_id, port


async def _exec(*cmd: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin)
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


async def _remove_quietly(name: str) -> None:
    """``podman rm`` that never raises: used on paths that already report another error."""
    try:
        await podman.remove(name)
    except podman.PodmanError:
        pass
