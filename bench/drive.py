"""The measuring side of the benchmark; runs inside the lab's ``cloud`` namespace.

``bench.run`` owns the network lab (root namespace) and re-executes this module with
``ip netns exec <prefix>-cloud`` (``NetLab.run``), because only from inside the lab can a process
reach the broker and the S3 store at the cloud address. The two talk through files:

- ``up --config BENCH.toml --ready FILE``: start Mosquitto, memcached, Swift, the statestore and
  the scheduler with ``tools.stack.Stack`` (its config writers and readiness probes; every
  server bound to the cloud address), push the ``aggregator`` image, then write ``FILE``
  (``{"config": ".../ferry.toml"}``) and exit. The stack's processes stay up in ``cloud``.
- ``job --config ferry.toml --job JOB.json --out RECORDS.jsonl``: wait for the executors, carry
  out the runs JOB lists (all at the link rate the runner set), appending one ``RunRecord`` per
  run to RECORDS (one JSON line each, flushed, so a crash loses nothing already measured) and
  printing one progress line per run.
- ``down --config ferry.toml``: stop the stack.

Every run is a real migration through the scheduler; its numbers come from the ``committed``
event (``downtime_ms``, ``bytes_moved``, ``total_ms``) and from a ``Simulator`` client sending
steady input (``max_gap_ms``, lost and duplicated sequence numbers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import faults
from bench.fmt import fmt_ms, fmt_size
from bench.records import RunRecord
from services.common import images
from services.common.blobstore import BlobStore
from services.common.bus import BusError, RemoteError
from services.common.config import FerryConfig, load_config
from tools.cli.operator import Operator
from tools.cli.simulate import Simulator
from tools.stack import Stack
from tools.stack.ferry_services import default_services

REPO = Path(__file__).resolve().parents[1]
APP = "aggregator"
COUNTER = "counter"  # recovery and rate: output count n for input n proves exactly-once per seq
SOURCE_EDGE_INDEX = 0
NODES_TIMEOUT_S = 120.0
WARMUP_S = 1.0  # steady input before the move: the state is built and the client sees outputs
AFTER_S = 1.0  # steady input after the commit, so the gap around the move is closed by outputs
FOLLOW_TIMEOUT_S = 1800.0


def say(line: str) -> None:
    print(line, flush=True)


# -- up / down ------------------------------------------------------------------------------


async def stack_up(config_path: Path, ready: Path) -> int:
    """Start the cloud side of the stack (no executors) and push the app image."""
    config = load_config(config_path)
    specs, skipped = default_services(Stack(config).config_path, nodes=[])
    for note in skipped:
        say(f"  {note}")
    stack = Stack(config, services=specs, timeout=60.0)
    info = await stack.up(progress=lambda line: say(f"  cloud: {line}"))
    manifest = await images.push(BlobStore(info.config.s3), APP, REPO / "unikernel" / "build")
    await images.push(BlobStore(info.config.s3), COUNTER, REPO / "unikernel" / "build")
    sizes = ", ".join(f"{t} {ref.size / 1e3:.0f} KB" for t, ref in manifest.items())
    say(f"  cloud: pushed {APP} image ({sizes})")
    ready.write_text(json.dumps({"config": str(info.config_path)}))
    return 0


async def stack_down(config_path: Path) -> int:
    await Stack(load_config(config_path)).down()
    return 0


# -- one job --------------------------------------------------------------------------------


class Job:
    """The runs of one ``job`` invocation (see ``bench.run`` for how JOB.json is made)."""

    def __init__(self, config: FerryConfig, spec: dict[str, Any], out: Path) -> None:
        self.config = config
        self.spec = spec
        self.edges: list[str] = spec["edges"]
        self.rate: float | None = spec["rate_mbit"]
        self.ballast_kb: int = spec["ballast_kb"]
        self.prefix: str = spec["service_prefix"]  # bench.run sweeps containers by it
        self.total: int = spec["total"]
        self.index: int = spec["first_index"]
        self._out = out.open("a", encoding="utf-8")
        self.ops: Operator | None = None

    async def run(self) -> None:
        async with Operator(self.config) as ops:
            self.ops = ops
            await self._wait_nodes()
            for unit in self.spec["units"]:
                await self._unit(unit)
        self._out.close()

    async def _wait_nodes(self) -> None:
        """Until every edge's executor is online and offers every method of this job."""
        assert self.ops is not None
        wanted = {u["method"] for u in self.spec["units"]}
        deadline = time.monotonic() + NODES_TIMEOUT_S
        missing: dict[str, str] = {}
        while time.monotonic() < deadline:
            nodes = {n["node"]: n for n in (await self.ops.query("list_nodes"))["nodes"]}
            missing = {}
            for edge in self.edges:
                node = nodes.get(edge)
                if node is None or node.get("status") != "online":
                    missing[edge] = "not online"
                    continue
                lacking = wanted - set(node.get("runtimes", []))
                if lacking:
                    reasons = node.get("unavailable") or {}
                    missing[edge] = "; ".join(f"{m}: {reasons.get(m, '?')}" for m in lacking)
            if not missing:
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"executors not ready: {missing}")

    def _emit(self, record: RunRecord, summary: str) -> None:
        self.index += 1
        self._out.write(json.dumps(record.to_dict()) + "\n")
        self._out.flush()
        say(f"[{self.index}/{self.total}] {summary}")

    async def _unit(self, unit: dict[str, Any]) -> None:
        scenario = unit["scenario"]
        for run in range(unit["runs"]):
            base = {
                "scenario": scenario,
                "method": unit["method"],
                "state_bytes": unit["state_bytes"],
                "rate_mbit": self.rate,
                "n_parallel": unit.get("n", 1),
                "run": run,
            }
            label = f"{unit['method']} {fmt_size(unit['state_bytes'])}"
            try:
                if scenario == "parallel":
                    fields = await self._parallel(unit)
                elif scenario in ("recovery", "rate", "rate_migration"):
                    fields = await getattr(faults, f"run_{scenario}")(self, unit, run)
                else:
                    fields = await self._single(unit)
            except Exception as exc:  # a failed run is recorded with its error, never dropped
                fields = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            record = RunRecord(**base, **fields)
            self._emit(record, _summary(record, label))

    def _params(self, unit: dict[str, Any]) -> dict[str, Any]:
        # history_sensors=1: the window of sensor dev-1 (the simulator's producer) starts full,
        # so the state really is window x 8 bytes, as in a service that has run for a while.
        return {"window": unit["window"], "ballast_kb": self.ballast_kb, "history_sensors": 1}

    async def _deploy(self, service: str, unit: dict[str, Any]) -> None:
        assert self.ops is not None
        await self.ops.command(
            "deploy",
            service=service,
            app=APP,
            node=self.edges[SOURCE_EDGE_INDEX],
            runtime=unit["method"],
            params=self._params(unit),
        )
        await self.ops.wait_serving(service, timeout=120.0)

    async def _stop(self, service: str) -> None:
        assert self.ops is not None
        try:
            await self.ops.command("stop", service=service)
        except (RemoteError, BusError) as exc:
            say(f"  (could not stop {service}: {exc})")

    async def _single(self, unit: dict[str, Any]) -> dict[str, Any]:
        """Deploy, feed steady input, migrate once, keep feeding, count what came back."""
        assert self.ops is not None
        service = _service_name(self.prefix, unit)
        await self._deploy(service, unit)
        simulator = Simulator(self.config.broker, service, devices=1, rate=unit["input_rate"])
        try:
            simulator.start()
            await _await_answers(simulator, WARMUP_S)
            migration = await self.ops.command(
                "migrate", service=service, node=self.edges[1 - SOURCE_EDGE_INDEX]
            )
            events: list[dict[str, Any]] = []
            final = await self.ops.follow(
                migration["migration"], events.append, timeout=FOLLOW_TIMEOUT_S
            )
            await asyncio.sleep(AFTER_S)
        finally:
            report = await asyncio.to_thread(simulator.finish, 10.0)
        await self._stop(service)
        detail = final.get("detail") or {}
        notes = {
            "migration": final["migration"],
            "window": unit["window"],
            "ballast_kb": self.ballast_kb,
            "input_rate": unit["input_rate"],
            "sent": report.sent,
            "answered": report.answered,
            "phases": _phase_details(events),
        }
        fields: dict[str, Any] = {
            "client_gap_ms": round(report.max_gap_ms, 2),
            "lost": len(report.lost),
            "duplicated": len(report.duplicated),
            "notes": notes,
        }
        if final["phase"] != "committed" or "rolled_forward" in detail:
            fields["error"] = f"{final['phase']}: {detail.get('error') or detail}"[:500]
            return fields
        fields.update(
            downtime_ms=detail.get("downtime_ms"),
            bytes_moved=detail.get("bytes_moved"),
            total_ms=detail.get("total_ms"),
        )
        return fields

    async def _parallel(self, unit: dict[str, Any]) -> dict[str, Any]:
        """N services on the first edge, all migrated to the second at once."""
        assert self.ops is not None
        n: int = unit["n"]
        tag = uuid.uuid4().hex[:6]
        services = [_service_name(self.prefix, unit, f"{tag}-{i}") for i in range(n)]
        simulators: list[Simulator] = []
        try:
            for service in services:
                await self._deploy(service, unit)
                # A few inputs build each service's state (the window is allocated by the first).
                simulator = Simulator(self.config.broker, service, devices=1, rate=0)
                simulator.start()
                await asyncio.to_thread(simulator.send, 3)
                simulators.append(simulator)
            for simulator in simulators:
                await _await_answers(simulator, 0.0)
            target = self.edges[1 - SOURCE_EDGE_INDEX]
            started = time.monotonic()
            launched = await asyncio.gather(
                *(self.ops.command("migrate", service=s, node=target) for s in services)
            )
            finals = await asyncio.gather(
                *(self.ops.follow(m["migration"], timeout=FOLLOW_TIMEOUT_S) for m in launched)
            )
            wall_ms = (time.monotonic() - started) * 1000
        finally:
            reports = [await asyncio.to_thread(s.finish, 10.0) for s in simulators]
            for service in services:
                await self._stop(service)
        details = [f.get("detail") or {} for f in finals]
        failed = [
            f"{f['service']}: {f['phase']} {d.get('error') or ''}"
            for f, d in zip(finals, details, strict=True)
            if f["phase"] != "committed" or "rolled_forward" in d
        ]
        # First trigger → last commit, on the scheduler's clock (the events' own timestamps).
        ends = [f["time"] for f in finals]
        starts = [f["time"] - d.get("total_ms", 0) for f, d in zip(finals, details, strict=True)]
        notes = {
            "window": unit["window"],
            "ballast_kb": self.ballast_kb,
            "downtimes_ms": [d.get("downtime_ms") for d in details],
            "driver_wall_ms": round(wall_ms, 1),
        }
        fields: dict[str, Any] = {
            "total_ms": round(max(ends) - min(starts), 1),
            "bytes_moved": sum(int(d.get("bytes_moved") or 0) for d in details),
            "lost": sum(len(r.lost) for r in reports),
            "duplicated": sum(len(r.duplicated) for r in reports),
            "notes": notes,
        }
        if failed:
            fields["error"] = f"{len(failed)}/{n} not committed: {'; '.join(failed)}"[:500]
        return fields


def _phase_details(events: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per phase: its time relative to ``planned`` (ms) and its timings, to explain a downtime."""
    start = next((e["time"] for e in events if e["phase"] == "planned"), None)
    out: dict[str, Any] = {}
    for event in events:
        detail = {
            k: round(v, 2) if isinstance(v, float) else v
            for k, v in (event.get("detail") or {}).items()
            if k != "key"
        }
        at = None if start is None else event["time"] - start
        out[event["phase"]] = {"at_ms": at, **detail}
    return out


def _service_name(prefix: str, unit: dict[str, Any], suffix: str | None = None) -> str:
    method = unit["method"].replace("microvm-snapshot", "snap")
    return f"{prefix}-{unit['scenario'][:3]}-{method}-{suffix or uuid.uuid4().hex[:8]}"


async def _await_answers(simulator: Simulator, at_least_s: float, timeout: float = 30.0) -> None:
    """Wait ``at_least_s``, then until every input sent by then was answered (serving for real)."""
    await asyncio.sleep(at_least_s)
    wanted = max(1, simulator.report().sent)
    deadline = time.monotonic() + timeout
    while True:
        report = simulator.report()
        if report.answered >= wanted:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"service answered {report.answered} of {wanted} inputs")
        await asyncio.sleep(0.05)


def _summary(record: RunRecord, label: str) -> str:
    if record.scenario in ("recovery", "rate", "rate_migration"):
        return faults.summary(record, label)
    head = f"{record.scenario} {label}"
    if record.scenario == "parallel":
        head += f" N={record.n_parallel} @ {record.rate_mbit:g} Mbit/s"
    else:
        head += f" run {record.run}"
    if record.error:
        return f"{head}: FAILED {record.error[:160]}"
    if record.scenario == "parallel":
        return f"{head}: all committed in {fmt_ms(record.total_ms)}, {fmt_size(record.bytes_moved)}"
    return (
        f"{head}: downtime {fmt_ms(record.downtime_ms)}, client gap {fmt_ms(record.client_gap_ms)}"
        f", {fmt_size(record.bytes_moved)} moved, lost {record.lost}, dup {record.duplicated}"
    )


async def run_job(config_path: Path, job_path: Path, out: Path) -> int:
    config = load_config(config_path)
    spec = json.loads(job_path.read_text())
    await Job(config, spec, out).run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up")
    up.add_argument("--config", type=Path, required=True)
    up.add_argument("--ready", type=Path, required=True)
    job = sub.add_parser("job")
    job.add_argument("--config", type=Path, required=True)
    job.add_argument("--job", type=Path, required=True)
    job.add_argument("--out", type=Path, required=True)
    down = sub.add_parser("down")
    down.add_argument("--config", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.cmd == "up":
        return asyncio.run(stack_up(args.config, args.ready))
    if args.cmd == "job":
        return asyncio.run(run_job(args.config, args.job, args.out))
    return asyncio.run(stack_down(args.config))


if __name__ == "__main__":
    sys.exit(main())
