"""``ferry-executor --node NAME``: the executor of one edge node."""

from __future__ import annotations

import asyncio

from services.common.config import FerryConfig
from services.common.runner import base_parser, run_service
from services.executor.service import Executor


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("Run the unikernels of one edge node and migrate them on command.")
    parser.add_argument("--node", required=True, help="this edge node's name, e.g. edge-a")
    args = parser.parse_args(argv)

    async def serve(config: FerryConfig, stop: asyncio.Event) -> None:
        await Executor(config, args.node, args.metrics_port).run(stop)

    return run_service(args, serve)
