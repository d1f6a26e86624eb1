"""``ferry-scheduler``: plans and drives migrations."""

from __future__ import annotations

import asyncio

from services.common.config import FerryConfig
from services.common.runner import base_parser, run_service
from services.scheduler.service import Scheduler


def main(argv: list[str] | None = None) -> int:
    args = base_parser("Plan and drive Ferry migrations.").parse_args(argv)

    async def serve(config: FerryConfig, stop: asyncio.Event) -> None:
        await Scheduler(config, args.metrics_port).run(stop)

    return run_service(args, serve)
