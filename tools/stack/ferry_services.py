"""Which Ferry services the stack starts, and how each one tells us it is ready.

A service is started only once its ``services/<name>/__main__.py`` exists, so the stack is usable
while services are still being written. Each announces readiness with a retained status message
(``"status": "online"``) on its status topic.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import services
from services.common import topics

SERVICES_ROOT = Path(services.__file__).resolve().parent
COMPONENTS = ("statestore", "scheduler")


@dataclass(frozen=True)
class ServiceSpec:
    """One Ferry service process: its component ``name`` (also its log file's name), the full
    ``argv``, and the retained ``status_topic`` it publishes ``{"status": "online"}`` on."""

    name: str
    argv: tuple[str, ...]
    status_topic: str


def default_services(
    config_path: Path, nodes: Sequence[str]
) -> tuple[list[ServiceSpec], list[str]]:
    """The services to start, and a note for each one skipped because it is not written yet."""
    wanted = [(name, name, (), topics.component_status(name)) for name in COMPONENTS] + [
        (f"executor-{node}", "executor", ("--node", node), topics.node_status(node))
        for node in nodes
    ]
    specs: list[ServiceSpec] = []
    skipped: list[str] = []
    for name, package, extra, topic in wanted:
        main = SERVICES_ROOT / package / "__main__.py"
        if not main.is_file():
            skipped.append(f"{name}: skipped, {main.relative_to(SERVICES_ROOT.parent)} not found")
            continue
        argv = (sys.executable, "-m", f"services.{package}", "--config", str(config_path), *extra)
        specs.append(ServiceSpec(name=name, argv=argv, status_topic=topic))
    return specs, skipped
