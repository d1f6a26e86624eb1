"""``ferry drain NODE``: move every service off a node, with a progress bar and a summary.

The scheduler cordons the node and starts one migration per service (placed on the least loaded
node with room); this side follows them all to their end. Exit code 1 if any service could not
be placed or its migration did not commit.
"""

from __future__ import annotations

import asyncio
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tools.cli.operator import Operator
from tools.cli.output import console

FOLLOW_TIMEOUT = 600.0  # seconds for the whole drain: node slots queue the migrations


async def drain(ops: Operator, node: str, reason: str | None) -> int:
    started = await ops.command("drain", node=node, reason=reason)
    migrations: list[dict[str, Any]] = started["migrations"]
    refused: list[dict[str, Any]] = started["refused"]
    console.print(
        f"cordoned {node}; moving {len(migrations)} service(s)"
        + (f", {len(refused)} cannot move" if refused else "")
    )
    finals = await _follow_all(ops, migrations)
    table = Table("service", "to", "outcome", "downtime", "note")
    failed = len(refused)
    for move, final in zip(migrations, finals, strict=True):
        detail = final.get("detail") or {} if final else {}
        phase = final["phase"] if final else "no outcome"
        if phase != "committed":
            failed += 1
        downtime = detail.get("downtime_ms")
        table.add_row(
            move["service"],
            move["target"],
            f"[green]{phase}[/]" if phase == "committed" else f"[red]{phase}[/]",
            f"{downtime:.1f} ms" if isinstance(downtime, int | float) else "-",
            str(detail.get("error") or "") if phase != "committed" else "",
        )
    for item in refused:
        table.add_row(item["service"], "-", "[red]not moved[/]", "-", item["error"])
    if migrations or refused:
        console.print(table)
    moved = len(migrations) + len(refused) - failed
    summary = f"drained {node}: {moved} moved, {failed} not"
    console.print(f"[green]{summary}[/]" if not failed else f"[red]{summary}[/]")
    return 1 if failed else 0


async def _follow_all(
    ops: Operator, migrations: list[dict[str, Any]]
) -> list[dict[str, Any] | None]:
    """Each migration's final event (None if it had none in time), with one progress bar."""
    with Progress(
        TextColumn("draining"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        bar = progress.add_task("drain", total=len(migrations))

        async def one(migration: str) -> dict[str, Any] | None:
            try:
                return await ops.follow(migration, timeout=FOLLOW_TIMEOUT)
            except TimeoutError:
                return None
            finally:
                progress.advance(bar)

        return await asyncio.gather(*(one(m["migration"]) for m in migrations))
