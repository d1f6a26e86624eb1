"""The runtimes a node offers, decided once at executor start (see ``executor.runtime``).

``REGISTRY`` is every runtime by name with its probe; a new runtime is a module here (its
``Runtime`` and an ``async def probe(node) -> Runtime`` raising ``Unavailable``) and one line.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from services.common.config import FerryConfig
from services.executor.runtime import Runtime
from services.executor.runtimes import microvm, microvm_snapshot, podman, unix
from services.executor.runtimes.node import NodeFacts, Unavailable

REGISTRY: dict[str, Callable[[NodeFacts], Awaitable[Runtime]]] = {
    "unix": unix.probe,
    "microvm": microvm.probe,
    "microvm-snapshot": microvm_snapshot.probe,
    "podman": podman.probe,
}


async def available_runtimes(
    config: FerryConfig,
) -> tuple[dict[str, Runtime], dict[str, str], dict[str, str]]:
    """(runtimes by name, reasons for the configured ones that are unavailable, accel choice)."""
    node = NodeFacts(config)
    runtimes: dict[str, Runtime] = {}
    unavailable: dict[str, str] = {}
    for name, probe in REGISTRY.items():
        if name not in config.executor.runtimes:
            continue
        try:
            runtimes[name] = await probe(node)
        except Unavailable as exc:
            unavailable[name] = str(exc)
    return runtimes, unavailable, node.accel
