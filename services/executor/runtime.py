"""The interface every runtime implements: a guest's whole life, from launch to terminate.

A runtime launches a guest, checkpoints it into a ``Capture``, restores a guest from one,
resumes a checkpointed guest (a rolled-back move) and terminates it. Two families share it:
- *app-level* runtimes (``unix``, ``microvm``) boot the guest, which then waits for ``START`` or
  ``RESTORE`` on its channel; the capture is the guest's own checkpoint document (KBs).
- *whole-image* runtimes (``microvm-snapshot``, ``podman``) capture the entire VM or process
  (``capture``) and rebuild it from that image (``launch_from``); the capture is a file (MBs).

Either way the executor talks to a running guest through one ``GuestChannel``, stores and fetches
captures alike (``executor.capture``) and never needs to know which runtime it is driving; a new
runtime is a module in ``runtimes/`` and a line in ``runtimes.REGISTRY`` (its probe and the build it
boots), plus its name in the wire's runtime enum (``schemas/common.schema.json``: the contract says
which names exist; ``tests/executor/test_registry.py`` checks the two agree).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from services.common.bus import now_ms
from services.executor.capture import Capture, CaptureForm
from services.executor.channel import GuestChannel

#: How long a guest may take to say HELLO, whichever runtime started or rebuilt it: a TCG boot
#: on a loaded node is the slowest case.
HELLO_TIMEOUT = 20.0


class GuestRuntimeError(Exception):
    """A runtime could not launch, capture or restore a guest; the message says which and why."""


async def await_hello(channel: GuestChannel, who: str, hint: str) -> dict[str, Any]:
    """The guest's HELLO; if it does not come within ``HELLO_TIMEOUT`` (or the channel fails),
    a GuestRuntimeError naming ``who`` and ``hint`` (where its output is). The caller ends the
    guest: only the runtime knows how."""
    try:
        return await asyncio.wait_for(channel.hello(), HELLO_TIMEOUT)
    except Exception as exc:
        raise GuestRuntimeError(
            f"{who} did not greet within {HELLO_TIMEOUT:g} s ({type(exc).__name__}: {exc}); {hint}"
        ) from exc


@dataclass
class LaunchSpec:
    """Everything a runtime needs to launch one instance on this node."""

    service: str
    instance: str
    app: str
    image: Path
    workdir: Path
    memory_mb: int = 64


@dataclass
class Guest:
    """A launched guest: its channel. Each runtime subclasses it with what it must keep to
    manage its guests (a process, a QMP connection, a container name), as typed fields."""

    channel: GuestChannel
    #: The process group a restarted executor ends (``record_instance``), if the guest has one.
    pid: int | None = None


class Runtime(Protocol):
    """One way of running guests (see the module docstring)."""

    name: str
    #: What ``checkpoint`` produces and ``restore`` takes; it decides how a capture is stored
    #: and whether a serving guest can be checkpointed (``CaptureForm.periodic``).
    capture_form: CaptureForm

    async def launch(self, spec: LaunchSpec) -> Guest:
        """Boot a fresh guest and return once it said HELLO (state ``waiting``)."""
        ...

    async def prepare(self, spec: LaunchSpec) -> Guest | None:
        """Get ready for ``restore`` on a move's target: a guest waiting for its state, or None
        when the capture is the whole guest (then only what makes ``restore`` quick is done)."""
        ...

    async def unprepare(self, spec: LaunchSpec) -> None:
        """Undo a ``prepare`` that returned None, for an abandoned migration (idempotent)."""
        ...

    async def checkpoint(self, guest: Guest, spec: LaunchSpec) -> Capture:
        """Capture a guest for a move; it stays paused (or stopped) until ``resume``."""
        ...

    async def restore(self, spec: LaunchSpec, guest: Guest | None, capture: Capture) -> Guest:
        """The guest running from ``capture``: ``guest`` (``prepare``'s) given its state, or a
        guest rebuilt from the image."""
        ...

    async def resume(self, guest: Guest, spec: LaunchSpec) -> Guest:
        """Let a checkpointed guest run on (a rolled-back move); returns the guest to drive."""
        ...

    async def terminate(self, guest: Guest) -> None:
        """End the guest for good and free what it held (idempotent)."""
        ...


class AppLevelRuntime(ABC):
    """What app-level runtimes share: the guest's own checkpoint document, over its channel.

    A move's target boots like a fresh guest and waits for its state; there is nothing to
    pre-boot and nothing to undo.
    """

    name = "app-level"
    capture_form = CaptureForm.DOCUMENT
    #: The file in the instance's workdir where the guest's own output goes.
    log_name = "guest.log"

    @abstractmethod
    async def launch(self, spec: LaunchSpec) -> Guest: ...

    @abstractmethod
    async def terminate(self, guest: Guest) -> None: ...

    async def greeted(self, guest: Guest, spec: LaunchSpec) -> Guest:
        """``guest`` once it said HELLO; if it does not in time, it is ended and the error
        says where its output is."""
        try:
            await await_hello(
                guest.channel,
                f"{spec.app} ({spec.image.name})",
                f"see {spec.workdir / self.log_name}",
            )
        except GuestRuntimeError:
            await self.terminate(guest)
            raise
        return guest

    async def prepare(self, spec: LaunchSpec) -> Guest:
        return await self.launch(spec)

    async def unprepare(self, spec: LaunchSpec) -> None:
        return None

    async def checkpoint(self, guest: Guest, spec: LaunchSpec) -> Capture:
        return Capture.of_document(await guest.channel.checkpoint(now_ms(), pause=True))

    async def restore(self, spec: LaunchSpec, guest: Guest | None, capture: Capture) -> Guest:
        if guest is None:
            raise GuestRuntimeError(f"{spec.instance}: no guest is waiting for its state")
        await guest.channel.restore(capture.document)
        return guest

    async def resume(self, guest: Guest, spec: LaunchSpec) -> Guest:
        await guest.channel.resume()
        return guest


class WholeImageRuntime(ABC):
    """What whole-image runtimes share: the capture is the entire guest, in a file.

    Each implements ``capture`` (freeze the guest, write its image to the instance's workdir),
    ``launch_from`` (rebuild a guest from such a file) and ``resume_captured`` (let the frozen
    source run again); the ``Runtime`` methods are these, in capture terms.
    """

    name = "whole-image"
    capture_form = CaptureForm.IMAGE

    @abstractmethod
    async def launch(self, spec: LaunchSpec) -> Guest: ...

    @abstractmethod
    async def prepare(self, spec: LaunchSpec) -> None: ...

    @abstractmethod
    async def unprepare(self, spec: LaunchSpec) -> None: ...

    @abstractmethod
    async def capture(self, guest: Guest, spec: LaunchSpec) -> Path: ...

    @abstractmethod
    async def launch_from(self, spec: LaunchSpec, image_file: Path) -> Guest: ...

    @abstractmethod
    async def resume_captured(self, guest: Guest, spec: LaunchSpec) -> Guest: ...

    @abstractmethod
    async def terminate(self, guest: Guest) -> None: ...

    async def checkpoint(self, guest: Guest, spec: LaunchSpec) -> Capture:
        return Capture(await self.capture(guest, spec))

    async def restore(self, spec: LaunchSpec, guest: Guest | None, capture: Capture) -> Guest:
        return await self.launch_from(spec, capture.image_file)

    async def resume(self, guest: Guest, spec: LaunchSpec) -> Guest:
        return await self.resume_captured(guest, spec)
