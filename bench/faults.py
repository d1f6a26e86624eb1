"""The ``recovery`` and ``rate`` scenarios, run by ``bench.drive job`` inside ``cloud``.

recovery (per method: ``unix``, ``microvm``, and the peer ``podman``): a fresh ``counter``
service on the first edge under steady input (``bench.load.Feeder``); after a warm-up the whole
node is killed (``kill -9`` of every process in the edge's namespace: executor and guests, asked
of ``bench.run`` through the control directory, see ``NodeControl``); ``recovery_ms`` runs from
that kill to the first output from another node. Ferry restores the service from its latest
durable checkpoint (``executor.checkpoint_interval``, after ``scheduler.recovery_grace``).
The peer is Podman/CRIU with the same cadence: every ``checkpoint_interval`` s the runner takes
``podman container checkpoint --leave-running`` of the service's container, stores the archive
in S3 and records it as the service's recovery point, so Ferry's own recovery (same detection,
same grace, same data path) restores *that* archive on the other node. Its inputs are
acknowledged to the broker once their outputs are out (a whole-image runtime has no checkpoint
the acks could wait for), so what it loses is exactly what it applied and acknowledged after
its last recorded checkpoint; what was unacknowledged at the kill the broker replays and the
restored process's own watermark filters. Loss and double application are judged per seq by the
counter's outputs (``bench.load.judge``).

rate (``unix``, ``microvm``): one service, an input-rate ramp (``rates``, ``step_s`` each, a new
producer per step so its seqs start at 1), latency input published → first output (p50, p99),
durable checkpoints on (the defaults). ``rate_migration``: a fresh service at the runtime's
target rate (``RATE_TARGETS``), or the highest rate the ramp sustained if below it (p99 ≤
``RATE_P99_MS``, nothing lost), one migration to the other edge in the middle of the feed.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.fmt import fmt_ms
from bench.load import Feeder, LeanFeeder, judge, latencies, percentile
from bench.records import RATE_P99_MS, RATE_TARGETS, RunRecord
from services.common.blobstore import BlobStore
from services.common.bus import BusError, RemoteError

if TYPE_CHECKING:
    from bench.drive import Job

COUNTER = "counter"
WARMUP_S = 2.5  # ≥ 2 periodic checkpoints before the kill
AFTER_S = 2.0  # input after the service serves again
RECOVERY_TIMEOUT_S = 90.0
SETTLE_S = 20.0
#: Highest ramp rate each method sustained in this job (used by ``rate_migration``).
SUSTAINED: dict[str, float] = {}
_RAMP_SERVICE: dict[str, str] = {}


class NodeControl:
    """Ask ``bench.run`` (root namespace, owner of the executors) to kill or restart a node.

    A request is a JSON file ``<n>.req`` in the job's control directory; the answer ``<n>.done``
    carries ``at`` (``time.time()`` just before the first SIGKILL) or ``error``.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._n = 0

    async def ask(self, op: str, edge: str, timeout: float = 120.0) -> dict[str, Any]:
        self._n += 1
        req = self.directory / f"{self._n:04d}.req"
        tmp = req.with_suffix(".tmp")
        tmp.write_text(json.dumps({"op": op, "edge": edge}))
        tmp.rename(req)
        done = req.with_suffix(".done")
        deadline = time.monotonic() + timeout
        while not done.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"bench.run did not {op} {edge} within {timeout:g} s")
            await asyncio.sleep(0.02)
        answer: dict[str, Any] = json.loads(done.read_text())
        if answer.get("error"):
            raise RuntimeError(f"{op} {edge}: {answer['error']}")
        return answer


def _control(job: Job) -> NodeControl:
    ctl = getattr(job, "_node_control", None)
    if ctl is None:
        ctl = NodeControl(Path(job.spec["ctl_dir"]))
        job._node_control = ctl  # type: ignore[attr-defined]
    return ctl


async def _deploy(job: Job, service: str, runtime: str) -> None:
    assert job.ops is not None
    deadline = time.monotonic() + 60.0
    while True:
        try:
            await job.ops.command(
                "deploy",
                service=service,
                app=COUNTER,
                node=job.edges[0],
                runtime=runtime,
                params={},
            )
            break
        except RemoteError as exc:
            # A node restarted by the previous run: the scheduler hears its status a bit later.
            if exc.code != "node_offline" or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
    await job.ops.wait_serving(service, timeout=120.0)


async def _instance_of(job: Job, service: str) -> str:
    assert job.ops is not None
    record = await job.ops.query("get_service", service=service)
    instance = record.get("instance")
    if not isinstance(instance, str):
        raise RuntimeError(f"no instance recorded for {service}: {record}")
    return instance


async def _until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.02)


# -- the peer's periodic CRIU checkpoints ------------------------------------------------------


class PodmanCheckpointer:
    """Every ``interval`` s: ``checkpoint --leave-running``, upload, record (see the docstring)."""

    def __init__(self, job: Job, service: str, instance: str, interval: float) -> None:
        self.job = job
        self.service = service
        self.instance = instance
        self.interval = interval
        self.taken: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._dir = Path(job.spec["ctl_dir"]) / f"cp-{service}"
        self._dir.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _loop(self) -> None:
        store = BlobStore(self.job.config.s3)
        n = 0
        while True:
            await asyncio.sleep(self.interval)
            n += 1
            archive = self._dir / f"{n}.tar.zst"
            started = time.time()
            # Podman needs the host's mounts (this process runs under `ip netns exec`): those
            # of bench.run, which started us.
            argv = [
                "nsenter",
                f"--mount=/proc/{self.job.spec['host_pid']}/ns/mnt",
                # and the container's network namespace: CRIU dumps a host-network container's
                # sockets as seen from the caller's (from `cloud` the restore finds no listener).
                f"--net=/run/netns/{self.job.spec['netns'][self.job.edges[0]]}",
                "--",
                "podman",
                "container",
                "checkpoint",
                "--leave-running",
                "--export",
                str(archive),
                "--compress",
                "zstd",
                "--tcp-established",
                f"ferry-{self.instance}",
            ]
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
            )
            _, err = await proc.communicate()
            dumped = time.time()
            if proc.returncode != 0:
                self.errors.append(err.decode(errors="replace").strip()[-300:])
                continue
            key = f"checkpoints/{self.service}/{self.instance}/{int(started * 1000)}.img"
            ref = await store.put_file(key, archive)
            assert self.job.ops is not None
            record = {
                "service": self.service,
                "instance": self.instance,
                **ref.to_dict(),
                "watermark": {},
                "time": int(started * 1000),
            }
            try:
                await self.job.ops.query("record_checkpoint", record=record)
            except (RemoteError, BusError) as exc:
                self.errors.append(f"record: {exc}")
                continue
            self.taken.append(
                {
                    "started": started,
                    "dump_ms": round((dumped - started) * 1000, 1),
                    "total_ms": round((time.time() - started) * 1000, 1),
                    "bytes": ref.size,
                }
            )
            archive.unlink(missing_ok=True)


# -- recovery -----------------------------------------------------------------------------------


async def run_recovery(job: Job, unit: dict[str, Any], run: int) -> dict[str, Any]:
    """Kill the serving node under steady input; time until another node answers; judge."""
    assert job.ops is not None
    method = unit["method"]
    source, target = job.edges[0], job.edges[1]
    service = f"{job.prefix}-rec-{method}-{uuid.uuid4().hex[:6]}"
    ctl = _control(job)
    interval = float(job.config.executor.checkpoint_interval)
    grace = float(job.config.scheduler.recovery_grace)
    await _deploy(job, service, method)
    instance = await _instance_of(job, service)
    feeder = Feeder(job.config.broker, service, "dev-1", unit["input_rate"])
    peer = PodmanCheckpointer(job, service, instance, interval) if method == "podman" else None
    killed_at: float | None = None
    first = None
    try:
        if peer is not None:
            peer.start()
        feeder.start()
        await asyncio.sleep(WARMUP_S)
        await _until(lambda: feeder.answered() > 0, 30.0, "no output before the kill")
        if peer is not None:
            await _until(lambda: bool(peer.taken), 30.0, f"no podman checkpoint: {peer.errors}")
        applied_before = max((o.seq for o in feeder.snapshot()), default=0)
        killed_at = float((await ctl.ask("kill", source))["at"])
        if peer is not None:
            await peer.stop()
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while first is None and time.monotonic() < deadline:
            first = feeder.first_output_from(source, killed_at)
            await asyncio.sleep(0.01)
        if first is not None:
            await asyncio.sleep(AFTER_S)
        feeder.stop_sending()
        await asyncio.to_thread(feeder.settle, SETTLE_S)
    finally:
        if peer is not None:
            await peer.stop()
        feeder.close()
        await _stop(job, service)
        if killed_at is not None:
            await ctl.ask("restart", source)
            await job._wait_nodes()
    verdict = judge(len(feeder.sent_at), feeder.outputs)
    last_cp = peer.taken[-1]["started"] if peer is not None and peer.taken else None
    notes: dict[str, Any] = {
        "service": service,
        "input_rate": unit["input_rate"],
        "checkpoint_interval_s": interval,
        "recovery_grace_s": grace,
        "answered_before_kill": applied_before,
        "verdict": verdict.to_dict(),
        "served_by": sorted({o.node for o in feeder.outputs}),
    }
    if peer is not None:
        notes["podman_checkpoints"] = peer.taken
        notes["podman_checkpoint_errors"] = peer.errors[:5]
        if last_cp is not None and killed_at is not None:
            notes["last_checkpoint_age_ms"] = round((killed_at - last_cp) * 1000, 1)
    fields: dict[str, Any] = {
        "lost": verdict.lost,
        "duplicated": verdict.applied_twice,
        "input_rate": float(unit["input_rate"]),
        "notes": notes,
    }
    if first is None:
        fields["error"] = f"no output from another node than {source} {RECOVERY_TIMEOUT_S:g} s"
        return fields
    assert killed_at is not None
    fields["recovery_ms"] = round((first.at - killed_at) * 1000, 1)
    notes["recovered_on"] = first.node
    if first.node != target:
        notes["unexpected_node"] = first.node
    return fields


async def _stop(job: Job, service: str) -> None:
    assert job.ops is not None
    try:
        await job.ops.command("stop", service=service)
    except (RemoteError, BusError) as exc:
        print(f"  (could not stop {service}: {exc})", flush=True)


# -- rate ---------------------------------------------------------------------------------------


def _step_fields(feeder: Feeder, started: float, ended: float) -> dict[str, Any]:
    outputs = feeder.snapshot()
    verdict = judge(len(feeder.sent_at), outputs)
    lat = latencies(feeder.sent_at, outputs)
    firsts = [o.at for o in outputs]
    span = (max(firsts) - started) if firsts else 0.0
    p99 = percentile(lat, 99)
    return {
        "latency_p50_ms": None if not lat else round(percentile(lat, 50) or 0.0, 2),
        "latency_p99_ms": None if p99 is None else round(p99, 2),
        "achieved_rate": round(verdict.answered / span, 1) if span > 0 else None,
        "lost": verdict.lost,
        "duplicated": verdict.applied_twice,
        "notes": {
            "verdict": verdict.to_dict(),
            "send_span_s": round(ended - started, 3),
            "max_latency_ms": round(max(lat), 1) if lat else None,
        },
    }


def sustained(fields: dict[str, Any]) -> bool:
    p99 = fields.get("latency_p99_ms")
    return (
        p99 is not None
        and p99 <= RATE_P99_MS
        and not fields.get("lost")
        and not fields.get("duplicated")
    )


def _phase_timings(event: dict[str, Any]) -> dict[str, Any]:
    """A phase event as the record keeps it: its phase, time and the timings it carries
    (upload_ms, fetch_ms, attach_ms, …), to see where the downtime under load went."""
    detail = event.get("detail") or {}
    timings = {
        k: round(v, 1)
        for k, v in detail.items()
        if k.endswith("_ms") and isinstance(v, float | int)
    }
    return {"phase": event["phase"], "time": event.get("time"), **timings}


async def _feed(job: Job, service: str, rate: float, seconds: float, migrate: bool) -> Any:
    # Outputs recorded by mosquitto_sub: at 5000/s a Python receiver is what saturates.
    feeder = LeanFeeder(job.config.broker, service, f"dev-{uuid.uuid4().hex[:6]}", rate)
    migration: dict[str, Any] | None = None
    phases: list[dict[str, Any]] = []
    try:
        started = time.time()
        feeder.start()
        if migrate:
            assert job.ops is not None
            await asyncio.sleep(seconds / 2)
            launched = await job.ops.command("migrate", service=service, node=job.edges[1])
            migration = await job.ops.follow(
                launched["migration"], on_event=phases.append, timeout=300.0
            )
            await asyncio.sleep(max(0.0, started + seconds - time.time()))
        else:
            await asyncio.sleep(seconds)
        feeder.stop_sending()
        ended = time.time()
        await asyncio.to_thread(feeder.settle, SETTLE_S)
    finally:
        feeder.close()
    fields = _step_fields(feeder, started, ended)
    fields["input_rate"] = rate
    if migration is not None:
        detail = migration.get("detail") or {}
        fields["downtime_ms"] = detail.get("downtime_ms")
        fields["notes"]["migration"] = {
            "phase": migration["phase"],
            **detail,
            "phases": [_phase_timings(event) for event in phases],
        }
        if migration["phase"] != "committed":
            fields["error"] = f"migration {migration['phase']}: {detail.get('error') or detail}"
    return fields


async def run_rate(job: Job, unit: dict[str, Any], run: int) -> dict[str, Any]:
    """Step ``run`` of the ramp: ``unit['rates'][run]`` inputs/s for ``step_s`` seconds."""
    method = unit["method"]
    rate = float(unit["rates"][run])
    best = SUSTAINED.get(method)
    if run > 0 and best is None and method not in _RAMP_SERVICE:
        return {"input_rate": rate, "notes": {"skipped": "the ramp's service is gone"}}
    service = _RAMP_SERVICE.get(method)
    try:
        if service is None:
            service = f"{job.prefix}-rate-{method}-{uuid.uuid4().hex[:6]}"
            await _deploy(job, service, method)
            _RAMP_SERVICE[method] = service
        fields = await _feed(job, service, rate, float(unit["step_s"]), migrate=False)
        if sustained(fields):
            SUSTAINED[method] = max(SUSTAINED.get(method, 0.0), rate)
        return fields
    finally:
        if run == unit["runs"] - 1 and service is not None:
            _RAMP_SERVICE.pop(method, None)
            await _stop(job, service)


async def run_rate_migration(job: Job, unit: dict[str, Any], run: int) -> dict[str, Any]:
    """A fresh service at the method's target rate (or the ramp's best, if below it), one
    migration in the middle of the feed: the target is what the p99 goal is stated at."""
    method = unit["method"]
    sustained = SUSTAINED.get(method)
    rate = sustained or float(unit["fallback_rate"])
    if sustained and method in RATE_TARGETS:
        rate = min(sustained, RATE_TARGETS[method])
    service = f"{job.prefix}-ratem-{method}-{uuid.uuid4().hex[:6]}"
    await _deploy(job, service, method)
    try:
        fields = await _feed(job, service, rate, float(unit["step_s"]), migrate=True)
    finally:
        await _stop(job, service)
    fields["notes"]["rate_from"] = (
        "fallback (none sustained)"
        if sustained is None
        else ("target" if rate == RATE_TARGETS.get(method) else "ramp (below the target)")
    )
    return fields


def summary(record: RunRecord, label: str) -> str:
    head = f"{record.scenario} {record.method} run {record.run}"
    if record.error:
        return f"{head}: FAILED {record.error[:160]}"
    if record.scenario == "recovery":
        return (
            f"{head}: serving again after {fmt_ms(record.recovery_ms)}, lost {record.lost}, "
            f"applied twice {record.duplicated}"
        )
    if record.latency_p99_ms is None:
        return f"{head}: {record.input_rate:g}/s: {record.notes.get('skipped', 'no outputs')}"
    return (
        f"{head}: {record.input_rate:g}/s offered, {record.achieved_rate}/s answered, "
        f"p50 {fmt_ms(record.latency_p50_ms)}, p99 {fmt_ms(record.latency_p99_ms)}, "
        f"lost {record.lost}, twice {record.duplicated}"
    )
