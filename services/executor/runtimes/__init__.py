"""The runtimes a node offers, decided once at executor start (see ``executor.runtime``).

``REGISTRY`` is every runtime by name with its probe and the build of an app it boots; a new
runtime is a module here (its ``Runtime`` and an ``async def probe(node) -> Runtime`` raising
``Unavailable``) and one line. Everything else follows from that line: the executor offers it
(``executor.runtimes`` defaults to every registered runtime) and advertises its image target in
its status, the scheduler resolves images by that advertisement, the CLI lists it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from services.common.config import FerryConfig
from services.executor.runtime import Runtime
from services.executor.runtimes import microvm, microvm_snapshot, podman, unix
from services.executor.runtimes.node import NodeFacts, Unavailable


@dataclass(frozen=True)
class Registered:
    """A runtime's entry: how to find out whether a node can offer it, and which build of an
    app it boots (``unikernel/build/<image_target>/``; ``ferry image push`` pushes each)."""

    probe: Callable[[NodeFacts], Awaitable[Runtime]]
    image_target: str


REGISTRY: dict[str, Registered] = {
    "unix": Registered(unix.probe, image_target="unix"),
    "microvm": Registered(microvm.probe, image_target="microvm"),
    "microvm-snapshot": Registered(microvm_snapshot.probe, image_target="microvm"),
    "podman": Registered(podman.probe, image_target="unix"),
}


async def available_runtimes(
    config: FerryConfig,
) -> tuple[dict[str, Runtime], dict[str, str], dict[str, str]]:
    """(runtimes by name, reasons for the configured ones that are unavailable, accel choice).

    ``executor.runtimes`` empty (the default) means every registered runtime."""
    node = NodeFacts(config)
    runtimes: dict[str, Runtime] = {}
    unavailable: dict[str, str] = {}
    wanted = config.executor.runtimes or list(REGISTRY)
    for name in wanted:
        if name not in REGISTRY:
            unavailable[name] = f"no such runtime (this executor knows {', '.join(REGISTRY)})"
    for name, entry in REGISTRY.items():
        if name not in wanted:
            continue
        try:
            runtimes[name] = await entry.probe(node)
        except Unavailable as exc:
            unavailable[name] = str(exc)
    return runtimes, unavailable, node.accel
