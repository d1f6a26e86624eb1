"""What a runtime's probe may ask about this node, each fact found out once and only if asked."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field

from services.common.config import FerryConfig
from services.executor.runtimes.accel import choose_accel

QEMU = "qemu-system-x86_64"


class Unavailable(Exception):
    """A configured runtime cannot run on this node; the message says why (node status)."""


@dataclass
class NodeFacts:
    """The node's configuration and the facts probes share (QEMU's accelerator)."""

    config: FerryConfig
    #: The accelerator choice, {"mode", "reason"}, once a QEMU runtime asked for it.
    accel: dict[str, str] = field(default_factory=dict)

    async def qemu_accel(self) -> str:
        """The accelerator QEMU guests use here, chosen once; Unavailable without QEMU."""
        if shutil.which(QEMU) is None:
            raise Unavailable(f"{QEMU} not installed")
        if not self.accel:
            mode, reason = await choose_accel(self.config.executor.accel)
            self.accel = {"mode": mode, "reason": reason}
        return self.accel["mode"]
