"""A focused harness for one service's input path: rate, latency, and where the executor spends.

Why a harness of its own: ``bench.run``'s rate ramp runs inside the netlab with migrations and
other scenarios around it, too slow to compare two versions of the data path. This starts the
real local stack (Mosquitto, Swift, statestore, scheduler) with one real executor process,
deploys one ``counter`` service (durable checkpoints on, the defaults), and feeds it from one
paho producer at each fixed rate for a few seconds; an output subscriber (the same ``Feeder`` as
the ramp) times every input to its output. Per rate it prints the achieved rate (distinct inputs
answered per second of feeding), p50/p99 latency, and whether every input was answered exactly
once. ``--profile FILE`` runs the executor under cProfile (written when it stops).

    python -m bench.inputrate --runtime unix --rates 1000,2000,5000 --seconds 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench import load
from services.common import images, topics
from services.common.blobstore import BlobStore
from services.common.config import load_config
from tools.cli.operator import Operator
from tools.stack import ServiceSpec, Stack
from tools.stack.ferry_services import default_services

REPO = Path(__file__).resolve().parents[1]
NODE = "edge-a"


def _cpu_s(pid: int, children: bool = False) -> float:
    """User + system CPU seconds of ``pid`` itself, or of its live descendants (the guest)."""
    total = 0.0
    try:
        if not children:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += _cpu_s(int(child)) + _cpu_s(int(child), children=True)
    except (OSError, IndexError, ValueError):
        pass
    return total


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    own = os.times()
    return {
        "harness": own.user + own.system,
        "executor": _cpu_s(pids["executor"]),
        "guest": _cpu_s(pids["executor"], children=True),
        "mosquitto": _cpu_s(pids["mosquitto"]),
    }


def _executor_spec(config_path: Path, profile: Path | None) -> ServiceSpec:
    run = ["-m", "cProfile", "-o", str(profile)] if profile else []
    if os.environ.get("INPUTRATE_WRAP"):  # e.g. a sampling profiler script
        run = [os.environ["INPUTRATE_WRAP"]]
    argv = (
        sys.executable,
        *run,
        "-m",
        "services.executor",
        "--config",
        str(config_path),
        "--node",
        NODE,
    )
    return ServiceSpec(name=f"executor-{NODE}", argv=argv, status_topic=topics.node_status(NODE))


async def _step(
    ops: Operator, pids: dict[str, int], runtime: str, rate: float, seconds: float, lean: bool
) -> dict[str, Any]:
    service = f"rate-{runtime}-{uuid.uuid4().hex[:6]}"
    await ops.command(
        "deploy", service=service, app="counter", node=NODE, runtime=runtime, params={}
    )
    await ops.wait_serving(service, timeout=120.0)
    kind = load.LeanFeeder if lean else load.Feeder
    feeder = kind(ops.config.broker, service, "dev-1", rate)
    try:
        cpu = _cpu(pids)
        started = time.time()
        feeder.start()
        await asyncio.sleep(seconds)
        feeder.stop_sending()
        ended = time.time()
        # The rate answered while feeding: what was out by the end of the feed.
        during = sum(1 for o in feeder.snapshot() if o.at <= ended)
        await asyncio.to_thread(feeder.settle, 30.0)
        cpu = {name: spent - cpu[name] for name, spent in _cpu(pids).items()}
        outputs = feeder.snapshot()
        verdict = load.judge(len(feeder.sent_at), outputs)
        lat = load.latencies(feeder.sent_at, outputs)
        first: dict[int, float] = {}
        for out in outputs:
            first[out.seq] = min(out.at, first.get(out.seq, out.at))
        worst: dict[int, float] = {}
        for seq, at in first.items():
            second = int(feeder.sent_at[seq - 1] - started)
            worst[second] = max(worst.get(second, 0.0), (at - feeder.sent_at[seq - 1]) * 1000)
    finally:
        feeder.close()
        await ops.command("stop", service=service)
    return {
        "runtime": runtime,
        "offered": rate,
        "sent": len(feeder.sent_at),
        "achieved": round(during / (ended - started), 1),
        "p50_ms": _round(load.percentile(lat, 50)),
        "p99_ms": _round(load.percentile(lat, 99)),
        "max_ms": _round(max(lat) if lat else None),
        "worst_ms_by_second": [round(worst[k]) for k in sorted(worst)],
        "lost": verdict.lost,
        "applied_twice": verdict.applied_twice,
        # CPU per answered input (µs): comparable across runs on a shared machine, unlike rates.
        **{
            f"{name}_us": round(spent / max(1, verdict.answered) * 1e6)
            for name, spent in cpu.items()
        },
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


async def main(args: argparse.Namespace) -> int:
    directory = Path(tempfile.mkdtemp(prefix="ferry-inputrate-"))
    # Plaintext unless --tls: the rates stay comparable with earlier runs.
    env = {"FERRY_STACK__DIR": str(directory), "FERRY_EXECUTOR__ACCEL": "tcg"}
    config = load_config(env={**env, "FERRY_STACK__TLS": "true" if args.tls else "false"})
    stack = Stack(config, services=[])
    cloud, _ = default_services(stack.config_path, nodes=[])
    profile = Path(args.profile).resolve() if args.profile else None
    stack = Stack(
        config, services=[*cloud, _executor_spec(stack.config_path, profile)], timeout=60.0
    )
    info = await stack.up()
    try:
        await images.push(BlobStore(info.config.s3), "counter", REPO / "unikernel" / "build")
        running = {c.name: c.pid for c in await stack.status() if c.pid}
        pids = {"executor": running[f"executor-{NODE}"], "mosquitto": running["mosquitto"]}
        async with Operator(info.config) as ops:
            for runtime in args.runtime.split(","):
                for rate in (float(r) for r in args.rates.split(",")):
                    result = await _step(ops, pids, runtime, rate, args.seconds, args.lean)
                    print(json.dumps(result), flush=True)
    finally:
        await stack.down()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", default="unix", help="comma-separated runtimes")
    parser.add_argument("--rates", default="1000,2000,5000", help="comma-separated inputs/s")
    parser.add_argument("--seconds", type=float, default=8.0, help="feeding time per rate")
    parser.add_argument(
        "--lean", action="store_true", help="record outputs with mosquitto_sub (load.LeanFeeder)"
    )
    parser.add_argument("--tls", action="store_true", help="run the stack over TLS (its default)")
    parser.add_argument("--profile", help="run the executor under cProfile, writing this file")
    sys.exit(asyncio.run(main(parser.parse_args())))
