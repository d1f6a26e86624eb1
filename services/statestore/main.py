"""``ferry-statestore``: the registry of nodes, services, checkpoints and migrations."""

from __future__ import annotations

import asyncio

from services.common.config import FerryConfig
from services.common.runner import base_parser, run_service
from services.statestore.service import StatestoreService


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("Remember nodes, services, checkpoints and migrations; answer queries.")
    args = parser.parse_args(argv)

    async def serve(config: FerryConfig, stop: asyncio.Event) -> None:
        await StatestoreService(config, metrics_port=args.metrics_port).run(stop)

    return run_service(args, serve)
