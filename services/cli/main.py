"""``ferry``: the operator CLI. Every subcommand talks to the stack over MQTT (and S3 for images).

Errors name what was wrong and what to do; the exit code is 0 on success, 1 when the operation
failed (e.g. a migration rolled back), 2 for bad usage or an unreachable stack.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from rich.table import Table

from services.cli.operator import Operator
from services.cli.output import console, err, format_detail
from services.common import checkpoint_blob, images
from services.common.blobstore import BlobError, BlobRef, BlobStore
from services.common.bus import BusError, RemoteError
from services.common.config import ConfigError, FerryConfig, load_config

REPO = Path(__file__).resolve().parents[2]


def _params(pairs: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"error: --param expects KEY=VALUE, got {pair!r}")
        try:
            params[key] = orjson.loads(raw)
        except orjson.JSONDecodeError:
            params[key] = raw
    return params


def print_event(event: dict[str, Any]) -> None:
    """One migration phase as a progress line."""
    detail = event.get("detail") or {}
    extra = format_detail(detail)
    stamp = time.strftime("%H:%M:%S", time.localtime(event["time"] / 1000))
    ms = f"{event['time'] % 1000:03d}"
    console.print(
        f"  {stamp}.{ms} [bold]{event['phase']:<17}[/] {event['actor']:<10} [dim]{extra}[/]"
    )


def print_outcome(final: dict[str, Any]) -> int:
    detail = final.get("detail") or {}
    if final["phase"] == "committed":
        parts = [f"[green]committed[/] {final['kind']} of {final['service']}"]
        if "downtime_ms" in detail:
            parts.append(f"downtime {detail['downtime_ms']:.1f} ms")
        if "bytes_moved" in detail:
            parts.append(f"{detail['bytes_moved']} bytes moved")
        if "total_ms" in detail:
            parts.append(f"total {detail['total_ms']:.0f} ms")
        console.print(", ".join(parts))
        return 0
    console.print(f"[red]{final['phase']}[/]: {detail.get('error', 'see ferry migrations')}")
    return 1


# -- subcommands ------------------------------------------------------------------------------


async def cmd_deploy(config: FerryConfig, args: argparse.Namespace) -> int:
    params = _params(args.param)  # bad usage is reported before anything is contacted
    async with Operator(config) as ops:
        result = await ops.command(
            "deploy",
            service=args.service,
            app=args.app,
            node=args.node,
            runtime=args.runtime,
            params=params,
            device=args.device,
        )
    console.print(
        f"[green]deployed[/] {args.service} ({args.app}, {args.runtime}) on {result['node']} "
        f"as {result['instance']}"
    )
    return 0


async def cmd_move(config: FerryConfig, args: argparse.Namespace) -> int:
    node = getattr(args, "to", None) or getattr(args, "on", None)
    async with Operator(config) as ops:
        started = await ops.command(args.command, service=args.service, node=node)
        console.print(f"{args.command} {args.service}: migration {started['migration']}")
        if not args.wait:
            return 0
        final = await ops.follow(started["migration"], print_event)
    return print_outcome(final)


async def cmd_stop(config: FerryConfig, args: argparse.Namespace) -> int:
    async with Operator(config) as ops:
        await ops.command("stop", service=args.service)
    console.print(f"stopped {args.service}")
    return 0


async def cmd_bind(config: FerryConfig, args: argparse.Namespace) -> int:
    async with Operator(config) as ops:
        await ops.command("bind", service=args.service, device=args.device)
    console.print(f"{args.service} now follows device {args.device}")
    return 0


async def cmd_services(config: FerryConfig, args: argparse.Namespace) -> int:
    async with Operator(config) as ops:
        services = (await ops.query("list_services"))["services"]
    table = Table("service", "app", "runtime", "node", "instance", "status", "device")
    for s in services:
        table.add_row(
            s["service"],
            s["app"],
            s["runtime"],
            s.get("node") or "-",
            s.get("instance") or "-",
            s["status"],
            s.get("device") or "-",
        )
    console.print(table)
    return 0


async def cmd_nodes(config: FerryConfig, args: argparse.Namespace) -> int:
    async with Operator(config) as ops:
        nodes = (await ops.query("list_nodes"))["nodes"]
    table = Table("node", "status", "runtimes", "accel", "instances")
    for doc in nodes:
        accel = doc.get("accel") or {}
        table.add_row(
            doc["node"],
            doc.get("status", "?"),
            ", ".join(doc.get("runtimes", [])),
            accel.get("mode", "-"),
            str(len(doc.get("instances", []))),
        )
    console.print(table)
    return 0


async def cmd_migrations(config: FerryConfig, args: argparse.Namespace) -> int:
    async with Operator(config) as ops:
        migrations = (await ops.query("list_migrations", limit=args.limit))["migrations"]
    table = Table("id", "kind", "service", "from", "to", "phase", "outcome", "downtime", "bytes")
    for m in migrations:
        downtime = m.get("downtime_ms")
        table.add_row(
            m["id"],
            m.get("kind") or "-",
            m["service"],
            m.get("source") or "-",
            m.get("target") or "-",
            m.get("phase") or "-",
            m.get("outcome") or "-",
            f"{downtime:.1f} ms" if downtime is not None else "-",
            str(m.get("bytes_moved") or "-"),
        )
    console.print(table)
    return 0


async def cmd_checkpoint_show(config: FerryConfig, args: argparse.Namespace) -> int:
    async with Operator(config) as ops:
        try:
            latest = await ops.query("latest_checkpoint", service=args.service)
        except RemoteError as exc:
            if exc.code != "no_checkpoint":
                raise
            err.print(
                f"error: {args.service} has no checkpoint yet (a serving service takes its "
                "first one within executor.checkpoint_interval of its first input)"
            )
            return 1
    ref = BlobRef.from_dict(latest["checkpoint"])
    document = orjson.loads(
        checkpoint_blob.unpack(
            await BlobStore(config.s3).get_bytes(ref),
            keyring=checkpoint_blob.Keyring.configured(config.executor.checkpoint_key_file),
            service=args.service,
            object_key=ref.key,
            allow_unsealed=True,
        )
    )
    console.print(f"s3://{ref.bucket}/{ref.key}  {ref.size} bytes  sha256 {ref.sha256[:16]}…")
    console.print_json(orjson.dumps(document).decode())
    return 0


async def cmd_image_push(config: FerryConfig, args: argparse.Namespace) -> int:
    store = BlobStore(config.s3)
    for app in args.apps:
        manifest = await images.push(store, app, args.build_dir)
        for target, ref in manifest.items():
            console.print(f"pushed {app} ({target}): {ref.size} bytes, sha256 {ref.sha256[:12]}…")
    return 0


async def cmd_watch(config: FerryConfig, args: argparse.Namespace) -> int:
    from services.cli.watch import watch

    await watch(config, args.filter)
    return 0


async def cmd_simulate(config: FerryConfig, args: argparse.Namespace) -> int:
    from services.cli.simulate import Simulator, publish_mobility

    simulator = Simulator(config.broker, args.service, devices=args.devices, rate=args.rate)
    simulator.start()
    console.print(
        f"simulating {args.devices} device(s) at {args.rate:g} msg/s for {args.duration:g} s "
        f"→ {args.service}"
    )
    started = time.monotonic()
    nodes = args.move_between.split(",") if args.move_between else []
    moves = 0
    while time.monotonic() - started < args.duration:
        await asyncio.sleep(min(1.0, args.duration))
        if (
            nodes
            and args.move_every
            and time.monotonic() - started >= (moves + 1) * args.move_every
        ):
            moves += 1
            node = nodes[moves % len(nodes)]
            for producer in simulator.producers:
                publish_mobility(config.broker, producer, node)
            console.print(f"  devices moved to {node}'s cell")
    report = simulator.finish()
    console.print_json(orjson.dumps(report.to_dict()).decode())
    return 0 if not report.lost and not report.duplicated else 1


async def cmd_stack(config: FerryConfig, args: argparse.Namespace) -> int:
    from services.stack import Stack

    stack = Stack(config)
    if args.command == "up":
        await stack.up(progress=lambda line: console.print(f"  {line}"))
        console.print(f"[green]stack up[/] under {config.stack.dir}")
    elif args.command == "down":
        await stack.down()
        console.print("stack down")
    else:
        parts = await stack.status()
        if not parts:
            err.print(f"no stack is running under {config.stack.dir} (start one: `ferry up`)")
            return 1
        table = Table("part", "pid", "alive", "ready", "detail")
        healthy = True
        for part in parts:
            healthy &= bool(part.ready)
            table.add_row(
                part.name, str(part.pid or "-"), str(part.alive), str(part.ready), part.detail
            )
        console.print(table)
        return 0 if healthy else 1
    return 0


# -- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferry", description=__doc__)
    parser.add_argument("--config", type=Path, help="ferry.toml (default: $FERRY_CONFIG, .ferry/)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, handler: Callable[..., Awaitable[int]], text: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(handler=handler)
        return p

    add("up", cmd_stack, "start the local stack (broker, S3, services, executors)")
    add("down", cmd_stack, "stop the local stack")
    add("status", cmd_stack, "health of each part of the local stack")

    p = add("deploy", cmd_deploy, "deploy a service on a node")
    p.add_argument("service")
    p.add_argument("--app", required=True, help="app name (counter, procedural, aggregator, …)")
    p.add_argument("--node", required=True)
    p.add_argument("--runtime", default="microvm", help="unix, microvm, microvm-snapshot, podman")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", help="bind the service to this device's mobility")

    p = add("migrate", cmd_move, "move a service to another node")
    p.add_argument("service")
    p.add_argument("--to", required=True, metavar="NODE")
    p.add_argument("--wait", action="store_true", help="show each phase until the end")

    p = add("suspend", cmd_move, "checkpoint a service to S3 and stop it (input keeps queueing)")
    p.add_argument("service")
    p.add_argument("--wait", action="store_true")

    p = add("resume", cmd_move, "restore a suspended service on a node")
    p.add_argument("service")
    p.add_argument("--on", required=True, metavar="NODE")
    p.add_argument("--wait", action="store_true")

    p = add("stop", cmd_stop, "stop a service for good")
    p.add_argument("service")

    p = add("bind", cmd_bind, "make a service follow a device's mobility events")
    p.add_argument("service")
    p.add_argument("device")

    add("services", cmd_services, "list services")
    add("nodes", cmd_nodes, "list edge nodes")
    p = add("migrations", cmd_migrations, "list migrations, newest first")
    p.add_argument("--limit", type=int, default=20)

    p = add("watch", cmd_watch, "live, readable stream of ferry/v1/# (optionally filtered)")
    p.add_argument(
        "filter", nargs="?", default="#", help="topic below ferry/v1/, e.g. migrations/#"
    )

    checkpoint = sub.add_parser("checkpoint", help="inspect checkpoints")
    checkpoint_sub = checkpoint.add_subparsers(dest="checkpoint_command", required=True)
    p = checkpoint_sub.add_parser("show", help="decoded latest checkpoint of a service")
    p.set_defaults(handler=cmd_checkpoint_show)
    p.add_argument("service")

    image = sub.add_parser("image", help="app images in the S3 store")
    image_sub = image.add_subparsers(dest="image_command", required=True)
    p = image_sub.add_parser("push", help="upload unikernel builds of apps")
    p.set_defaults(handler=cmd_image_push)
    p.add_argument("apps", nargs="+")
    p.add_argument("--build-dir", type=Path, default=REPO / "unikernel" / "build")

    p = add("simulate", cmd_simulate, "IoT devices sending readings (and moving between cells)")
    p.add_argument("service")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--rate", type=float, default=50.0, help="messages per second in total")
    p.add_argument("--duration", type=float, default=10.0, help="seconds")
    p.add_argument("--move-between", help="comma-separated nodes the devices' cells belong to")
    p.add_argument("--move-every", type=float, default=0.0, help="seconds between moves")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        return asyncio.run(args.handler(config, args))
    except ConfigError as exc:
        err.print(f"error: configuration: {exc}")
    except BusError as exc:
        err.print(f"error: {exc}\n  is the stack up? (`ferry up`, or `make demo`)")
    except RemoteError as exc:
        err.print(f"error: {exc.code}: {exc.message}")
        return 1
    except (BlobError, images.ImageNotFound) as exc:
        err.print(f"error: {exc}")
        return 1
    except TimeoutError:
        err.print("error: timed out waiting for the stack; see `ferry watch` and the logs")
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
