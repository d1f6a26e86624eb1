"""The ``podman`` runtime: the app's unix binary in a container, moved as a CRIU checkpoint.

The peer Ferry is benchmarked against. The container runs ``APP --listen 127.0.0.1:PORT`` on the
host network (``runtimes.podman_cli``, PODMAN.md) and the executor is its TCP controller.
``capture`` disconnects (CRIU cannot carry the connection to another node anyway) and exports a
checkpoint archive; ``launch_from`` imports it under the target's container name and connects to
the same port, which the listening socket inside the checkpoint is bound to. The port and the
image ID are read from the archive itself, never guessed; ``podman.build_image`` gives the same
image ID for the same binary on every node, which is what lets the restore find its image.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from services.executor.channel import GuestChannel
from services.executor.runtime import (
    Guest,
    GuestRuntimeError,
    LaunchSpec,
    WholeImageRuntime,
    await_hello,
)
from services.executor.runtimes import podman_cli as podman
from services.executor.runtimes.node import NodeFacts, Unavailable

ARCHIVE_NAME = "checkpoint.tar.zst"


async def podman_available() -> tuple[bool, str]:
    """Whether this node can run the podman runtime, and why not (or the criu version)."""
    return await podman.criu_available()


async def probe(node: NodeFacts) -> PodmanRuntime:
    """The podman runtime, if podman and a working CRIU are here (Unavailable says what not)."""
    usable, reason = await podman_available()
    if not usable:
        raise Unavailable(reason)
    return PodmanRuntime()


def container_name(instance: str) -> str:
    return f"ferry-{instance}"


@dataclass
class ContainerGuest(Guest):
    """A podman guest: its container, the port its app listens on, and (after ``capture``)
    the checkpoint archive ``resume_captured`` restores it from."""

    container: str = field(kw_only=True)
    port: int = field(kw_only=True)
    captured: Path | None = field(default=None, kw_only=True)
    #: How long podman took for the last ``capture`` (its own report).
    checkpoint_seconds: float | None = field(default=None, kw_only=True)


class PodmanRuntime(WholeImageRuntime):
    """Runs guests as rootful runc containers; moves them with ``podman container checkpoint``."""

    name = "podman"

    def __init__(self) -> None:
        # (binary path, size, mtime_ns) -> image ID known to exist in local storage
        self._images: dict[tuple[str, int, int], str] = {}

    async def prepare(self, spec: LaunchSpec) -> None:
        """Make sure the app's image exists, so ``launch_from`` only has to restore."""
        await self._ensure_image(spec)

    async def unprepare(self, spec: LaunchSpec) -> None:
        """Nothing to undo: the image stays, ready for the next launch of the same binary."""

    async def launch(self, spec: LaunchSpec) -> Guest:
        podman.become_subreaper()
        image = await self._ensure_image(spec)
        name = container_name(spec.instance)
        port = podman.free_port()
        try:
            await podman.remove(name)  # a leftover of a crashed executor would block the name
            await podman.run(name, image, ["--listen", f"127.0.0.1:{port}"], port)
        except podman.PodmanError as exc:
            await podman.remove(name, quiet=True)
            raise GuestRuntimeError(f"cannot start container {name}: {exc}") from exc
        return await self._connect(spec, name, port, "waiting")

    async def capture(self, guest: Guest, spec: LaunchSpec) -> Path:
        """Disconnect and checkpoint the container to ``spec.workdir``; it is stopped after."""
        container = _container_of(guest)
        name = container.container
        await guest.channel.close()
        archive = spec.workdir / ARCHIVE_NAME
        archive.unlink(missing_ok=True)
        try:
            result = await podman.checkpoint_export(name, archive)
        except podman.PodmanError as exc:
            raise GuestRuntimeError(f"checkpoint of {name} failed: {exc}") from exc
        container.captured = archive
        container.checkpoint_seconds = result.seconds
        return archive

    async def launch_from(self, spec: LaunchSpec, image_file: Path) -> Guest:
        """Restore ``image_file`` as this node's container for ``spec.instance`` and connect."""
        podman.become_subreaper()
        try:
            origin = await podman.checkpoint_origin(image_file)
            listen = origin.command[origin.command.index("--listen") + 1]
            port = int(listen.rpartition(":")[2])
        except (podman.PodmanError, ValueError, IndexError) as exc:
            raise GuestRuntimeError(
                f"{image_file.name} is not a checkpoint of a Ferry container: {exc}"
            ) from exc
        local_image = await self._ensure_image(spec)
        if local_image != origin.image_id:
            raise GuestRuntimeError(
                f"{image_file.name} was taken from image {origin.image_id[:12]}, but {spec.image} "
                f"gives image {local_image[:12]} here: the nodes run different app binaries"
            )
        name = container_name(spec.instance)
        try:
            await podman.restore_import(image_file, name, port)
        except podman.PodmanError as exc:
            raise GuestRuntimeError(
                f"restore of {name} from {image_file.name} failed: {exc}"
            ) from exc
        return await self._connect(spec, name, port, "running")

    async def resume_captured(self, guest: Guest, spec: LaunchSpec) -> Guest:
        """Rollback: the checkpoint stopped the source; restore the same archive under its name."""
        container = _container_of(guest)
        name, port, archive = container.container, container.port, container.captured
        if archive is None:
            raise GuestRuntimeError(f"{name} was not captured: nothing to resume from")
        podman.become_subreaper()
        try:
            await podman.remove(name)
            await podman.restore_import(archive, name, port)
        except podman.PodmanError as exc:
            raise GuestRuntimeError(f"cannot resume {name} from {archive.name}: {exc}") from exc
        return await self._connect(spec, name, port, "running")

    async def terminate(self, guest: Guest) -> None:
        await guest.channel.close()
        if isinstance(guest, ContainerGuest):
            await podman.remove(guest.container, quiet=True)

    async def _connect(self, spec: LaunchSpec, name: str, port: int, state: str) -> ContainerGuest:
        """Connect to the container's app and read its HELLO (``state`` as expected)."""
        hint = f"see `podman logs {name}`"
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            await podman.remove(name, quiet=True)
            raise GuestRuntimeError(
                f"cannot connect to {name} on port {port}: {exc}; {hint}"
            ) from exc
        channel = GuestChannel(reader, writer)
        try:
            hello = await await_hello(channel, f"{name} on port {port}", hint)
        except GuestRuntimeError:
            await channel.close()
            await podman.remove(name, quiet=True)
            raise
        if hello.get("app") != spec.app or hello.get("state") != state:
            await channel.close()
            await podman.remove(name, quiet=True)
            raise GuestRuntimeError(
                f"{name} on port {port} greeted as {hello.get('app')!r} in state "
                f"{hello.get('state')!r}; expected {spec.app!r} in state {state!r}"
            )
        return ContainerGuest(channel=channel, container=name, port=port)

    async def _ensure_image(self, spec: LaunchSpec) -> str:
        """The ID of the app's image, built into local storage if missing."""
        try:
            stat = spec.image.stat()
            key = (str(spec.image), stat.st_size, stat.st_mtime_ns)
            known = self._images.get(key)
            if known is None:
                known = await podman.build_image(spec.image, f"localhost/ferry-{spec.app}:latest")
                self._images[key] = known
        except (OSError, podman.PodmanError) as exc:
            raise GuestRuntimeError(
                f"cannot build {spec.app}'s image from {spec.image}: {exc}"
            ) from exc
        return known


def _container_of(guest: Guest) -> ContainerGuest:
    if not isinstance(guest, ContainerGuest):
        raise GuestRuntimeError("guest was not started by the podman runtime")
    return guest
