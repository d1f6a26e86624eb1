"""``ferry``: the operator CLI. Every subcommand talks to the stack over MQTT (and S3 for images).

Errors name what was wrong and what to do; the exit code is 0 on success, 1 when the operation
failed (e.g. a migration rolled back), 2 for bad usage or an unreachable stack.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import re
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

import orjson
from rich.table import Table

from services.common import checkpoint_blob, contract, images, params, topics
from services.common.blobstore import BlobError, BlobRef, BlobStore
from services.common.bus import BusError, RemoteError
from services.common.config import BrokerConfig, ConfigError, FerryConfig, load_config
from services.common.contract import ContractError
from tools.cli.drain import drain
from tools.cli.operator import Operator
from tools.cli.output import console, err, format_detail

REPO = Path(__file__).resolve().parents[2]
log = logging.getLogger(__name__)

# Names and runtimes as the bus contract defines them, so a bad one is refused before anything
# is contacted instead of failing deep in a publish.
_COMMON = json.loads((REPO / "schemas" / "common.schema.json").read_text())["$defs"]
NAME = re.compile(_COMMON["name"]["pattern"])
RUNTIMES: list[str] = _COMMON["runtime"]["enum"]


PURGE_HELP = (
    "also forget it now: its record, checkpoints, input session (and the input queued there) "
    "and retained state, instead of after statestore.stopped_grace"
)


def name_arg(value: str) -> str:
    """A service, node, app or device name (common.schema.json#/$defs/name)."""
    if not NAME.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a valid name: 1-63 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return value


def reason_arg(value: str) -> str:
    """A cordon's reason: one line of at most 200 characters (node-cordon.schema.json)."""
    if len(value) > 200 or "\n" in value:
        raise argparse.ArgumentTypeError("a reason is one line of at most 200 characters")
    return value


def _number(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if math.isnan(number) or math.isinf(number):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value}")
    return number


def positive_float(value: str) -> float:
    number = _number(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
    return number


def non_negative_float(value: str) -> float:
    number = _number(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return number


def node_list_arg(value: str) -> list[str]:
    return [name_arg(node) for node in value.split(",")]


def version_arg(value: str) -> str:
    if not images.VERSION_PATTERN.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an app version (letters, digits and . _ + -, e.g. 2.0.0)"
        )
    return value


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def limit_arg(value: str) -> int:
    number = positive_int(value)
    if number > 10000:
        raise argparse.ArgumentTypeError(f"must be at most 10000, got {number}")
    return number


def topic_filter_arg(value: str) -> str:
    """An MQTT filter below ferry/v1/: '+' a whole level, '#' only as the last level."""
    levels = value.split("/")
    for i, level in enumerate(levels):
        wild = ("+" in level and level != "+") or ("#" in level and level != "#")
        if wild or (level == "#" and i != len(levels) - 1) or not value:
            raise argparse.ArgumentTypeError(
                f"{value!r} is not an MQTT topic filter ('+' stands for one whole level, "
                "'#' only for the last), e.g. migrations/# or apps/+/out"
            )
    return value


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
    raw = params.split(args.param)  # bad usage is reported before anything is contacted
    typed: dict[str, Any] = {}
    if raw:
        manifest = await images.describe(BlobStore(config.s3), args.app)
        typed = params.parse(args.app, images.declared_params(manifest), raw)
    async with Operator(config) as ops:
        result = await ops.command(
            "deploy",
            service=args.service,
            app=args.app,
            node=args.node,
            runtime=args.runtime,
            params=typed,
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


async def cmd_upgrade(config: FerryConfig, args: argparse.Namespace) -> int:
    async with Operator(config) as ops:
        started = await ops.command(
            "upgrade", service=args.service, node=args.to, version=args.version
        )
        versions = f"{started.get('from_version') or '?'} → {started.get('to_version') or '?'}"
        console.print(f"upgrade {args.service} {versions}: migration {started['migration']}")
        if not args.wait:
            return 0
        final = await ops.follow(started["migration"], print_event)
    return print_outcome(final)


async def cmd_stop(config: FerryConfig, args: argparse.Namespace) -> int:
    async with Operator(config) as ops:
        done = await ops.command("stop", service=args.service, purge=args.purge or None)
    console.print(f"stopped {args.service}{_purged(done)}")
    return 0


async def cmd_rm(config: FerryConfig, args: argparse.Namespace) -> int:
    async with Operator(config) as ops:
        done = await ops.command("rm", service=args.service, purge=args.purge or None)
    console.print(f"removed {args.service}{_purged(done)}")
    return 0


def _purged(done: dict[str, Any]) -> str:
    if not done.get("purged"):
        return ""
    return (
        f"; purged: {done.get('checkpoints', 0)} checkpoint(s), its input session with the "
        "input queued in it, and its retained state"
    )


async def cmd_env(config: FerryConfig, args: argparse.Namespace) -> int:
    """Shell lines (``eval "$(ferry env)"``) and a ready ``mosquitto_pub`` line."""
    from tools.cli.simulate import mosquitto_login_options

    broker = config.broker
    # A password login, or (``ferry up``) a client certificate whose CN is the username.
    by_password = bool(broker.username and broker.password)
    login = " ".join(mosquitto_login_options(broker, password='"$FERRY_BROKER_PASSWORD"'))
    lines = [
        f"FERRY_CONFIG={config.source or ''}",
        f"FERRY_BROKER={'mqtts' if broker.tls else 'mqtt'}://{broker.host}:{broker.port}",
        f"FERRY_BROKER_HOST={broker.host}",
        f"FERRY_BROKER_PORT={broker.port}",
        f"FERRY_S3={config.s3.endpoint}",
    ]
    if broker.username:
        lines.append(f"FERRY_BROKER_USER={broker.username}")
    if by_password:
        lines.append(f"# the password is broker.password in {config.source}")
    reading = '{"producer": "dev-1", "seq": 1, "data": {"value": 21.5}}'
    lines += [
        "# send one reading to SERVICE as device dev-1, on its own input topic (seq must grow",
        "# per producer; a device login may write only in/<its login>: docs/writing-an-app.md):",
        f"#   mosquitto_pub {login} -q 1 "
        f"-t {topics.app_input_from('SERVICE', 'dev-1')} -m '{reading}'",
        "# and read its answers:",
        f"#   mosquitto_sub {login} -q 1 -t {topics.app_output('SERVICE')}",
    ]
    for line in lines:
        print(line)
    return 0


async def cmd_bind(config: FerryConfig, args: argparse.Namespace) -> int:
    async with Operator(config) as ops:
        await ops.command("bind", service=args.service, device=args.device)
    console.print(f"{args.service} now follows device {args.device}")
    return 0


async def cmd_services(config: FerryConfig, args: argparse.Namespace) -> int:
    async with Operator(config) as ops:
        services = (await ops.query("list_services"))["services"]
    table = Table("service", "app", "version", "runtime", "node", "instance", "status", "device")
    for s in services:
        table.add_row(
            s["service"],
            s["app"],
            s.get("version") or "?",
            s["runtime"],
            s.get("node") or "-",
            s.get("instance") or "-",
            s["status"],
            s.get("device") or "-",
        )
    console.print(table)
    failed = {s["instance"]: s["service"] for s in services if s["status"] == "failed"}
    if failed:  # why each died, as its node reports it (the guest's last console lines)
        async with Operator(config) as ops:
            nodes = (await ops.query("list_nodes"))["nodes"]
        for doc in nodes:
            for instance in doc.get("instances", []):
                if instance.get("instance") in failed and instance.get("reason"):
                    line = f"{failed[instance['instance']]}: {instance['reason']}"
                    console.print(line, markup=False)
    return 0


async def cmd_nodes(config: FerryConfig, args: argparse.Namespace) -> int:
    async with Operator(config) as ops:
        nodes = (await ops.query("list_nodes"))["nodes"]
    table = Table("node", "status", "runtimes", "accel", "instances", "cordoned")
    for doc in nodes:
        accel = doc.get("accel") or {}
        cordon = doc.get("cordon")
        table.add_row(
            doc["node"],
            doc.get("status", "?"),
            ", ".join(doc.get("runtimes", [])),
            accel.get("mode", "-"),
            f"{len(doc.get('instances', []))}/{doc.get('capacity', '?')}",
            f"yes: {cordon.get('reason') or '-'}" if cordon else "no",
        )
    console.print(table)
    return 0


async def cmd_cordon(config: FerryConfig, args: argparse.Namespace) -> int:
    async with Operator(config) as ops:
        if args.command == "cordon":
            await ops.command("cordon", node=args.node, reason=args.reason)
            console.print(f"cordoned {args.node}: no new placements until `ferry uncordon`")
        else:
            await ops.command("uncordon", node=args.node)
            console.print(f"uncordoned {args.node}")
    return 0


async def cmd_drain(config: FerryConfig, args: argparse.Namespace) -> int:
    async with Operator(config) as ops:
        return await drain(ops, args.node, args.reason)


async def cmd_migrations(config: FerryConfig, args: argparse.Namespace) -> int:
    async with Operator(config) as ops:
        migrations = (await ops.query("list_migrations", limit=args.limit))["migrations"]
    table = Table("id", "kind", "service", "from", "to", "phase", "outcome", "downtime", "bytes")
    for m in migrations:
        downtime = m.get("downtime_ms")
        kind = m.get("kind") or "-"
        if m.get("to_version"):
            kind = f"{kind} {m.get('from_version') or '?'} → {m['to_version']}"
        table.add_row(
            m["id"],
            kind,
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
        if args.fresh:
            # Operators command only the scheduler; it asks the node serving the service.
            taken = await ops.command("checkpoint_now", service=args.service)
            ref = BlobRef.from_dict(taken["checkpoint"])
            origin = f"fresh, taken now on {taken['node']} by {taken['instance']}"
        else:
            try:
                latest = await ops.query("latest_checkpoint", service=args.service)
            except RemoteError as exc:
                if exc.code != "no_checkpoint":
                    raise
                err.print(
                    f"error: {args.service} has no checkpoint yet (a serving service takes its "
                    "first one within executor.checkpoint_interval of its first input; "
                    f"`ferry checkpoint show {args.service} --fresh` takes one now)",
                    markup=False,
                )
                return 1
            ref = BlobRef.from_dict(latest["checkpoint"])
            taken_at = time.strftime("%H:%M:%S", time.localtime(latest["time"] / 1000))
            origin = f"latest durable, taken at {taken_at}"
            if latest.get("migration"):
                origin += f" for {latest['migration']}"
    head = f"s3://{ref.bucket}/{ref.key}  {ref.size} bytes  sha256 {ref.sha256[:16]}…  ({origin})"
    if ref.key.endswith(".img"):
        console.print(head, markup=False)
        err.print(
            "error: a whole-image checkpoint (podman or microvm-snapshot: the guest itself, "
            "taken when the service moved), not a Ferry document: nothing to decode",
            markup=False,
        )
        return 1
    document = orjson.loads(
        checkpoint_blob.unpack(
            await BlobStore(config.s3).get_bytes(ref),
            keyring=checkpoint_blob.Keyring.configured(config.executor.checkpoint_key_file),
            service=args.service,
            object_key=ref.key,
            allow_unsealed=True,
        )
    )
    console.print(head, markup=False)
    console.print_json(orjson.dumps(document).decode())
    return 0


async def cmd_image_push(config: FerryConfig, args: argparse.Namespace) -> int:
    if args.build and len(args.apps) != 1:
        err.print("error: --build names the build of one app: push one app at a time with it")
        return 2
    store = BlobStore(config.s3)
    for app in args.apps:
        manifest = await images.push(store, app, args.build_dir, args.build)
        described = await images.describe(store, app)
        version = images.app_version(described)
        for target, ref in manifest.items():
            console.print(
                f"pushed {app} {version or ''} ({target}): {ref.size} bytes, "
                f"sha256 {ref.sha256[:12]}…"
            )
        declared = images.declared_params(described)
        if declared is not None:
            names = ", ".join(d["name"] for d in declared) or "none"
            console.print(f"  parameters: {names} (`ferry image show {app}`)")
        await _roll_out_hint(config, app, version)
    return 0


async def _roll_out_hint(config: FerryConfig, app: str, version: str | None) -> None:
    """A push changes no running service: name those that run another version, and how to
    move them (nothing if the stack is not up)."""
    try:
        async with Operator(config) as ops:
            services = (await ops.query("list_services"))["services"]
    except (BusError, ConnectionError, RemoteError, TimeoutError):
        return
    for s in services:
        if s["app"] != app or s.get("status") in ("stopped", "failed") or not version:
            continue
        if s.get("version") != version:
            console.print(
                f"  {s['service']} runs {app} {s.get('version') or '(unknown version)'}, not "
                f"{version}: roll it out with `ferry upgrade {s['service']} --version {version}`"
            )


async def cmd_image_show(config: FerryConfig, args: argparse.Namespace) -> int:
    manifest = await images.describe(BlobStore(config.s3), args.app)
    info = manifest.get("app") or {}
    console.print(f"{args.app} {info.get('version', '?')} ({info.get('mode', '?')} mode)")
    if info.get("upgrades_from"):
        console.print(f"  upgrades from: {', '.join(info['upgrades_from'])}")
    for target in ("unix", "microvm"):
        if target in manifest:
            ref = BlobRef.from_dict(manifest[target])
            console.print(f"  {target:<8} {ref.size} bytes  sha256 {ref.sha256[:12]}…")
    declared = images.declared_params(manifest)
    if declared is None:
        console.print("parameters: not declared (built with an older SDK): any --param is passed")
        return 0
    if not declared:
        console.print("parameters: none")
        return 0
    table = Table("parameter", "type", "default", "doc")
    for row in params.describe(declared):
        table.add_row(*row)
    console.print(table)
    return 0


async def cmd_watch(config: FerryConfig, args: argparse.Namespace) -> int:
    from tools.cli.watch import watch

    await watch(config, args.filter)
    return 0


async def cmd_simulate(config: FerryConfig, args: argparse.Namespace) -> int:
    from tools.cli.simulate import Simulator, publish_mobility

    simulator = Simulator(
        config.broker,
        args.service,
        devices=args.devices,
        rate=args.rate,
        expect_outputs=args.expect_outputs,
        start_sending=False,
    )
    await asyncio.to_thread(simulator.start)
    if not args.expect_outputs:
        # The executors' count of applied inputs, heard before the first input, is the baseline
        # that judges loss for an app that does not answer every input.
        wait = config.executor.heartbeat_interval * 1.5 + 1
        console.print(f"  waiting up to {wait:g} s for the executor's count of applied inputs")
        await asyncio.to_thread(simulator.wait_for_count, wait)
    simulator.start_sending()
    console.print(
        f"simulating {args.devices} device(s) at {args.rate:g} msg/s for {args.duration:g} s "
        f"→ {args.service}"
    )
    started = time.monotonic()
    nodes = args.move_between or []
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
    settle = max(10.0, config.executor.heartbeat_interval * 2 + 1)
    report = await asyncio.to_thread(simulator.finish, settle)
    console.print_json(orjson.dumps(report.to_dict()).decode())
    console.print(report.verdict())
    return 0 if report.ok else 1


async def cmd_run(config: FerryConfig, args: argparse.Namespace) -> int:
    from tools.cli.run import run

    return await run(config, args)


def publish_one(broker: BrokerConfig, topic: str, body: bytes, timeout: float = 10.0) -> None:
    """Publish with QoS 1 and return once the broker's PUBACK says it took the message."""
    import uuid

    from tools.cli.simulate import connect_paho

    client = connect_paho(broker, f"ferry-cli-publish-{uuid.uuid4().hex[:8]}")
    refused: list[Any] = []
    client.on_publish = lambda c, u, mid, reason, props: refused.extend(
        [reason] if reason.is_failure else []
    )
    try:
        info = client.publish(topic, body, qos=1)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise TimeoutError
        if refused:
            raise ConnectionError(f"the broker refused the message: {refused[0]}")
    finally:
        client.disconnect()
        client.loop_stop()


async def cmd_publish(config: FerryConfig, args: argparse.Namespace) -> int:
    try:
        payload = orjson.loads(args.json)
    except orjson.JSONDecodeError as exc:
        err.print(f"error: the input is not JSON: {exc}", markup=False)
        return 2
    topic = topics.app_input(args.service)
    try:
        contract.validate(topic, payload)
    except ContractError as exc:
        err.print(f"error: not an input of {args.service}: {exc}", markup=False)
        return 2
    await asyncio.to_thread(publish_one, config.broker, topic, orjson.dumps(payload))
    console.print(f"published to {topic} (acknowledged by the broker)")
    return 0


async def cmd_stack(config: FerryConfig, args: argparse.Namespace) -> int:
    from tools.stack import Stack
    from tools.stack.stack import METRICS_TARGETS

    if args.command == "up" and args.tls is not None:
        config = dataclasses.replace(config, stack=dataclasses.replace(config.stack, tls=args.tls))
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
        broker = config.broker
        console.print(
            f"broker {'mqtts' if broker.tls else 'mqtt'}://{broker.host}:{broker.port}  "
            "(`ferry env` for a mosquitto_pub line)"
        )
        targets = stack.dir / METRICS_TARGETS
        if targets.is_file():
            console.print(f"metrics: Prometheus file_sd targets in {targets}")
        return 0 if healthy else 1
    return 0


# -- parser -----------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (and where to look) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ferry", description=__doc__)
    parser.add_argument("--config", type=Path, help="ferry.toml (default: $FERRY_CONFIG, .ferry/)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, handler: Callable[..., Awaitable[int]], text: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(handler=handler)
        return p

    def service(p: argparse.ArgumentParser) -> None:
        p.add_argument("service", type=name_arg)

    p = add("up", cmd_stack, "start the local stack (broker, S3, services, executors)")
    tls_choice = p.add_mutually_exclusive_group()
    tls_choice.add_argument(
        "--insecure",
        dest="tls",
        action="store_false",
        default=None,
        help="plaintext MQTT and S3, no certificates, logins or ACL (debugging only; kept in "
        "the stack's ferry.toml until `ferry up --tls`)",
    )
    tls_choice.add_argument(
        "--tls",
        dest="tls",
        action="store_true",
        help="MQTT over mutual TLS (a login per component, the production ACL) and S3 over "
        "https, from the stack's own CA (the default)",
    )
    add("down", cmd_stack, "stop the local stack")
    add("status", cmd_stack, "health of each part of the local stack, and the broker's address")
    add("env", cmd_env, "broker address, config path and a ready mosquitto_pub line")

    p = add("deploy", cmd_deploy, "deploy a service on a node")
    service(p)
    p.add_argument(
        "--app", required=True, type=name_arg, help="app name (counter, procedural, aggregator, …)"
    )
    p.add_argument("--node", required=True, type=name_arg)
    p.add_argument("--runtime", default="microvm", choices=RUNTIMES)
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an app parameter (see `ferry image show APP`), typed as the app declares it",
    )
    p.add_argument("--device", type=name_arg, help="bind the service to this device's mobility")

    p = add("migrate", cmd_move, "move a service to another node")
    service(p)
    p.add_argument("--to", required=True, metavar="NODE", type=name_arg)
    p.add_argument("--wait", action="store_true", help="show each phase until the end")

    p = add(
        "upgrade",
        cmd_upgrade,
        "move a service into another pushed version of its app, with its state",
    )
    service(p)
    p.add_argument(
        "--version", type=version_arg, help="the pushed version to run (default: the latest push)"
    )
    p.add_argument(
        "--to", metavar="NODE", type=name_arg, help="the node to run it on (default: its own)"
    )
    p.add_argument("--wait", action="store_true", help="show each phase until the end")

    p = add("suspend", cmd_move, "checkpoint a service to S3 and stop it (input keeps queueing)")
    service(p)
    p.add_argument("--wait", action="store_true")

    p = add("resume", cmd_move, "restore a suspended service on a node")
    service(p)
    p.add_argument("--on", required=True, metavar="NODE", type=name_arg)
    p.add_argument("--wait", action="store_true")

    p = add("stop", cmd_stop, "stop a service for good")
    service(p)
    p.add_argument("--purge", action="store_true", help=PURGE_HELP)

    p = add("rm", cmd_rm, "remove a stopped or failed service from the list")
    service(p)
    p.add_argument("--purge", action="store_true", help=PURGE_HELP)

    p = add("bind", cmd_bind, "make a service follow a device's mobility events")
    service(p)
    p.add_argument("device", type=name_arg)

    add("services", cmd_services, "list services")
    add("nodes", cmd_nodes, "list edge nodes")
    p = add("cordon", cmd_cordon, "keep new services off a node (what runs there stays)")
    p.add_argument("node", type=name_arg)
    p.add_argument("--reason", type=reason_arg, help="shown by `ferry nodes`")
    p = add("uncordon", cmd_cordon, "let new services onto a cordoned node again")
    p.add_argument("node", type=name_arg)
    p = add("drain", cmd_drain, "cordon a node and move every service on it elsewhere")
    p.add_argument("node", type=name_arg)
    p.add_argument("--reason", type=reason_arg, help="shown by `ferry nodes`")
    p = add("migrations", cmd_migrations, "list migrations, newest first")
    p.add_argument("--limit", type=limit_arg, default=20, help="1 to 10000")

    p = add("watch", cmd_watch, "live, readable stream of ferry/v1/# (optionally filtered)")
    p.add_argument(
        "filter",
        nargs="?",
        default="#",
        type=topic_filter_arg,
        help="topic below ferry/v1/, e.g. migrations/#",
    )

    checkpoint = sub.add_parser("checkpoint", help="inspect checkpoints")
    checkpoint_sub = checkpoint.add_subparsers(
        dest="checkpoint_command", required=True, metavar="COMMAND"
    )
    p = checkpoint_sub.add_parser(
        "show",
        help="decoded latest checkpoint of a service (or a fresh one)",
        description="Show a service's latest durable checkpoint, decoded (vars: the app's store, "
        "params, watermark), or with --fresh one its node takes now while it serves.",
    )
    p.set_defaults(handler=cmd_checkpoint_show)
    service(p)
    p.add_argument(
        "--fresh",
        action="store_true",
        help="have the serving node take one now (without pausing the service) and show it; "
        "it is recorded like a periodic one and becomes the recovery point. Only a serving "
        "service on an app-level runtime (unix, microvm) has one",
    )

    image = sub.add_parser("image", help="app images in the S3 store")
    image_sub = image.add_subparsers(dest="image_command", required=True, metavar="COMMAND")
    p = image_sub.add_parser("push", help="upload unikernel builds of apps")
    p.set_defaults(handler=cmd_image_push)
    p.add_argument("apps", nargs="+", type=name_arg)
    p.add_argument("--build-dir", type=Path, default=REPO / "unikernel" / "build")
    p.add_argument(
        "--build",
        type=name_arg,
        help="the build to push as APP, e.g. counter_v2 (default: the app's own name)",
    )
    p = image_sub.add_parser("show", help="an app's pushed builds, version and parameters")
    p.set_defaults(handler=cmd_image_show)
    p.add_argument("app", type=name_arg)

    p = add("simulate", cmd_simulate, "IoT devices sending readings (and moving between cells)")
    service(p)
    p.add_argument("--devices", type=positive_int, default=2)
    p.add_argument("--rate", type=positive_float, default=50.0, help="messages per second in total")
    p.add_argument("--duration", type=positive_float, default=10.0, help="seconds")
    p.add_argument(
        "--move-between",
        type=node_list_arg,
        help="comma-separated nodes the devices' cells belong to",
    )
    p.add_argument(
        "--move-every", type=non_negative_float, default=0.0, help="seconds between moves"
    )
    p.add_argument(
        "--expect-outputs",
        action="store_true",
        help="the app answers every input: an input without an answer counts as lost",
    )

    p = add("run", cmd_run, "run an app build locally on inputs from stdin, without the stack")
    p.add_argument("app", type=name_arg)
    p.add_argument("--runtime", default="unix", choices=["unix", "microvm"])
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an app parameter, typed as the app declares it (as for deploy)",
    )
    p.add_argument(
        "--checkpoint-at",
        type=positive_int,
        metavar="N",
        help="after N inputs (a procedural app: N outputs), checkpoint, restore into a fresh "
        "guest and carry on",
    )
    p.add_argument("--build-dir", type=Path, default=REPO / "unikernel" / "build")

    p = add("publish", cmd_publish, "publish one input to a service and wait for the broker's ack")
    service(p)
    p.add_argument(
        "json", metavar="JSON", help='{"producer": "dev-1", "seq": 1, "data": {"value": 21.5}}'
    )
    return parser


async def _without_loop_tracebacks(work: Awaitable[int]) -> int:
    """Run ``work`` with the event loop's own error reports kept to the debug log.

    Why: after a failure the CLI reports in one line (a refused TLS handshake, say), the MQTT
    client's socket callbacks can still fire on the closed socket; asyncio would print those
    with a traceback, and the CLI never prints one.
    """

    def quietly(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        log.debug("event loop: %s (%r)", context.get("message"), context.get("exception"))

    asyncio.get_running_loop().set_exception_handler(quietly)
    return await work


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        return asyncio.run(_without_loop_tracebacks(args.handler(config, args)))
    except ConfigError as exc:
        err.print(f"error: configuration: {exc}", markup=False)
    except (BusError, ConnectionError) as exc:
        err.print(f"error: {exc}\n  is the stack up? (`ferry up`, or `make demo`)", markup=False)
    except RemoteError as exc:
        err.print(f"error: {exc.code}: {exc.message}", markup=False)
        return 1
    except (BlobError, images.ImageNotFound) as exc:
        err.print(f"error: {exc}", markup=False)
        return 1
    except params.ParamError as exc:
        err.print(f"error: {exc}", markup=False)
    except ContractError as exc:
        err.print(f"error: the request breaks the bus contract: {exc}", markup=False)
    except TimeoutError:
        err.print(
            "error: timed out waiting for the stack; see `ferry watch` and the logs", markup=False
        )
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the promise is no traceback, whatever went wrong
        err.print(f"error: unexpected {type(exc).__name__}: {exc}", markup=False)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
