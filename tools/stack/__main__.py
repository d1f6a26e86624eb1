"""``python -m tools.stack up|down|status [--config PATH]``: the stack by hand.

The ``ferry`` CLI offers the same commands; this entry point exists so the stack can be run and
debugged on its own. Exit status: 0 on success (for ``status``: everything ready), 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from services.common.config import ConfigError, load_config
from tools.stack import ComponentStatus, Stack, StackError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.stack", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--config", type=Path, help="TOML config file (default: see ferry docs)")
    parser.add_argument(
        "--insecure", action="store_true", help="up: plaintext MQTT and S3 (debugging only)"
    )
    args = parser.parse_args(argv)
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        config = load_config(args.config)
        if args.insecure:
            config = dataclasses.replace(config, stack=dataclasses.replace(config.stack, tls=False))
        stack = Stack(config)
        return asyncio.run(_run(args.command, stack, console))
    except (StackError, ConfigError) as exc:
        console.print(f"[bold red]error:[/] {exc}", markup=True)
        return 1
    except KeyboardInterrupt:
        return 130


async def _run(command: str, stack: Stack, console: Console) -> int:
    started = time.monotonic()
    if command == "up":

        def progress(message: str) -> None:
            console.print(f"[dim]{time.monotonic() - started:6.2f}s[/] {message}")

        info = await stack.up(progress)
        cfg = info.config
        console.print(
            f"[bold green]up[/] in {info.elapsed:.1f} s — "
            f"S3 {'https' if cfg.s3.secure else 'http'}://{cfg.s3.endpoint} "
            f"(bucket {cfg.s3.bucket}), MQTT{' over TLS' if cfg.broker.tls else ''} "
            f"{cfg.broker.host}:{cfg.broker.port}, "
            f"config {info.config_path}"
        )
        return 0
    if command == "down":
        await stack.down()
        console.print(
            f"[bold]down[/] in {time.monotonic() - started:.1f} s (logs kept in {stack.log_dir})"
        )
        return 0
    statuses = await stack.status()
    if not statuses:
        console.print(f"no stack running in {stack.dir}")
        return 1
    Console().print(_table(statuses))
    return 0 if all(s.ready for s in statuses) else 1


def _table(statuses: list[ComponentStatus]) -> Table:
    table = Table("component", "pid", "alive", "ready", "detail")
    for s in statuses:
        table.add_row(
            s.name,
            str(s.pid or "-"),
            "[green]yes[/]" if s.alive else "[red]no[/]",
            "[green]yes[/]" if s.ready else "[red]no[/]",
            s.detail,
        )
    return table


if __name__ == "__main__":
    sys.exit(main())
