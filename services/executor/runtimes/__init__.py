"""The runtimes a node offers, decided once at executor start (see ``executor.runtime``)."""

from __future__ import annotations

import shutil

from services.common.config import FerryConfig
from services.executor.accel import choose_accel
from services.executor.runtime import Runtime
from services.executor.runtimes.microvm import QEMU, MicrovmRuntime
from services.executor.runtimes.podman import PodmanRuntime, podman_available
from services.executor.runtimes.snapshot import SnapshotRuntime
from services.executor.runtimes.unix import UnixRuntime


async def available_runtimes(
    config: FerryConfig,
) -> tuple[dict[str, Runtime], dict[str, str], dict[str, str]]:
    """(runtimes by name, reasons for the configured ones that are unavailable, accel choice)."""
    wanted = config.executor.runtimes
    runtimes: dict[str, Runtime] = {}
    unavailable: dict[str, str] = {}
    accel: dict[str, str] = {}
    if "unix" in wanted:
        runtimes["unix"] = UnixRuntime()
    if "microvm" in wanted or "microvm-snapshot" in wanted:
        if shutil.which(QEMU) is None:
            for name in ("microvm", "microvm-snapshot"):
                if name in wanted:
                    unavailable[name] = f"{QEMU} not installed"
        else:
            mode, reason = await choose_accel(config.executor.accel)
            accel = {"mode": mode, "reason": reason}
            if "microvm" in wanted:
                runtimes["microvm"] = MicrovmRuntime(mode)
            if "microvm-snapshot" in wanted:
                runtimes["microvm-snapshot"] = SnapshotRuntime(mode)
    if "podman" in wanted:
        usable, reason = await podman_available()
        if usable:
            runtimes["podman"] = PodmanRuntime()
        else:
            unavailable["podman"] = reason
    return runtimes, unavailable, accel
