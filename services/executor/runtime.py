"""The interface every runtime implements: how a guest is launched and how its state is captured.

Two families share it:
- *app-level* runtimes (``unix``, ``microvm``) boot the guest, which then waits for ``START`` or
  ``RESTORE`` on its channel; the state that moves is the guest's own checkpoint document (KBs).
- *whole-image* runtimes (``microvm-snapshot``, ``podman``) capture the entire VM or process
  (``capture``) and rebuild it from that image (``launch_from``); the state that moves is MBs.

Either way the executor talks to a running guest through one ``GuestChannel`` and never needs to
know which runtime it is driving.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

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
    whole_image: bool

    async def launch(self, spec: LaunchSpec) -> Guest:
        """Boot a fresh guest and return once it said HELLO (state ``waiting``)."""
        ...

    async def prepare(self, spec: LaunchSpec) -> None:
        """Whole-image runtimes: get ready for ``launch_from`` (pre-boot); others do nothing."""
        ...

    async def unprepare(self, spec: LaunchSpec) -> None:
        """Undo ``prepare`` for an abandoned migration (idempotent)."""
        ...

    async def capture(self, guest: Guest, spec: LaunchSpec) -> Path:
        """Whole-image runtimes: freeze the guest and write its image to a file; others raise."""
        ...

    async def launch_from(self, spec: LaunchSpec, image_file: Path) -> Guest:
        """Whole-image runtimes: rebuild a guest from ``capture``'s file; others raise."""
        ...

    async def resume_captured(self, guest: Guest, spec: LaunchSpec) -> Guest:
        """Whole-image runtimes: let a captured (frozen) source guest run again (rollback)."""
        ...

    async def terminate(self, guest: Guest) -> None:
        """End the guest for good and free what it held (idempotent)."""
        ...


class AppLevelRuntime:
    """What app-level runtimes share: nothing to pre-boot, no whole image to capture.

    Their state moves as the guest's own checkpoint document over the channel, so the
    whole-image half of the protocol is either a no-op or a usage error.
    """

    name = "app-level"
    whole_image = False
    #: The file in the instance's workdir where the guest's own output goes.
    log_name = "guest.log"

    async def terminate(self, guest: Guest) -> None:
        raise NotImplementedError

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

    async def prepare(self, spec: LaunchSpec) -> None:
        return None

    async def unprepare(self, spec: LaunchSpec) -> None:
        return None

    async def capture(self, guest: Guest, spec: LaunchSpec) -> Path:
        raise GuestRuntimeError(f"the {self.name} runtime moves app-level checkpoints, not images")

    async def launch_from(self, spec: LaunchSpec, image_file: Path) -> Guest:
        raise GuestRuntimeError(f"the {self.name} runtime moves app-level checkpoints, not images")

    async def resume_captured(self, guest: Guest, spec: LaunchSpec) -> Guest:
        return guest
