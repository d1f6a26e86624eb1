"""Running a Ferry service process: arguments, logging, and a clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from services.common.config import ConfigError, FerryConfig, load_config
from services.common.metrics import MetricsError


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, help="ferry.toml (default: $FERRY_CONFIG, .ferry/)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus /metrics on this port (0: off; default: the config's [metrics])",
    )
    return parser


def run_service(
    args: argparse.Namespace,
    serve: Callable[[FerryConfig, asyncio.Event], Coroutine[Any, Any, None]],
) -> int:
    """Load the config, run ``serve`` until a signal sets its stop event; exit code for main()."""
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, stop)

    try:
        asyncio.run(main())
    except MetricsError as exc:
        print(f"error: {exc} (metrics.*_port or --metrics-port)", file=sys.stderr)
        return 2
    except Exception as exc:
        logging.getLogger(__name__).exception("service failed")
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
