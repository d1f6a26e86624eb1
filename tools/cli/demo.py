"""``make demo``: one migration story end to end on the real local stack.

Starts the stack (Mosquitto, Swift s3api, statestore, scheduler, executors edge-a and edge-b),
pushes the app images, deploys a counter unikernel bound to a device, feeds it steady input, then
moves it three ways — an operator migration, a mobility event, and suspend/resume — and prints each
migration's phases, downtime and bytes, and the proof that no input was lost or applied twice.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from rich.rule import Rule

from services.common import images
from services.common.blobstore import BlobStore
from services.common.config import FerryConfig, load_config
from tools.cli.main import REPO, cmd_migrations, print_event, print_outcome
from tools.cli.operator import Operator
from tools.cli.output import console
from tools.cli.simulate import Simulator, publish_mobility
from tools.stack import Stack

SERVICE = "counter-demo"


async def demo(runtime: str, keep: bool) -> int:
    config = load_config()
    stack = Stack(config)
    console.print(Rule("1. start the local stack"))
    if any(part.alive for part in await stack.status()):
        console.print("  a stack is already running here: stopping it first")
        await stack.down()
    info = await stack.up(progress=lambda line: console.print(f"  {line}"))
    config = info.config
    try:
        return await _story(config, runtime)
    finally:
        if keep:
            console.print(
                "\nthe stack keeps running (`ferry watch`, `ferry services`, `ferry down`)"
            )
        else:
            await stack.down()
            console.print("\nstack stopped (`make demo DEMO_ARGS=--keep` leaves it up)")


async def _story(config: FerryConfig, runtime: str) -> int:
    console.print(Rule("2. push the app images to S3"))
    for app in ("counter", "aggregator"):
        manifest = await images.push(BlobStore(config.s3), app, REPO / "unikernel" / "build")
        sizes = ", ".join(f"{t} {r.size // 1024} KiB" for t, r in manifest.items())
        console.print(f"  {app}: {sizes}")

    outcomes = []
    async with Operator(config) as ops:
        console.print(Rule(f"3. deploy {SERVICE} ({runtime}) on edge-a, bound to device dev-1"))
        await ops.command(
            "deploy", service=SERVICE, app="counter", node="edge-a", runtime=runtime, device="dev-1"
        )
        await ops.wait_serving(SERVICE)
        simulator = Simulator(config.broker, SERVICE, devices=1, rate=100.0)
        simulator.start()
        console.print("  device dev-1 sends 100 readings/s from now on")
        await asyncio.sleep(2)

        console.print(Rule("4. operator: ferry migrate counter-demo --to edge-b"))
        final = await ops.move("migrate", SERVICE, "edge-b", print_event)
        outcomes.append(print_outcome(final))
        await asyncio.sleep(2)

        console.print(Rule("5. dev-1 enters a cell of edge-a: the service follows it"))
        seen = ops.migrations_seen()
        publish_mobility(config.broker, "dev-1", "edge-a", cell="cell-a1")
        migration = await ops.next_migration(SERVICE, seen)
        final = await ops.follow(migration, print_event)
        outcomes.append(print_outcome(final))
        await asyncio.sleep(2)

        console.print(Rule("6. suspend to S3, input keeps queueing, resume on edge-b"))
        outcomes.append(print_outcome(await ops.move("suspend", SERVICE, None, print_event)))
        await asyncio.sleep(1)
        outcomes.append(print_outcome(await ops.move("resume", SERVICE, "edge-b", print_event)))
        await asyncio.sleep(1)

        console.print(Rule("7. every input applied exactly once?"))
        report = simulator.finish()
        console.print(
            f"  sent {report.sent}, answered {report.answered}, lost {len(report.lost)}, "
            f"duplicated {len(report.duplicated)}; answers by node {report.nodes}"
        )
        await ops.command("stop", service=SERVICE)

    console.print(Rule("8. the record: ferry migrations"))
    await cmd_migrations(config, argparse.Namespace(limit=10))
    ok = not report.lost and not report.duplicated and not any(outcomes)
    console.print("[green]demo complete[/]" if ok else "[red]demo found a problem (see above)[/]")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runtime", default="microvm", help="microvm (default) or unix")
    parser.add_argument("--keep", action="store_true", help="leave the stack running afterwards")
    args = parser.parse_args(argv)
    return asyncio.run(demo(args.runtime, args.keep))


if __name__ == "__main__":
    sys.exit(main())
