"""``python -m bench.run [--quick] [--methods ...] [--out DIR]``: the whole benchmark in one run.

Builds the network lab (``bench.netlab``: a ``cloud`` site and two edges), starts the Ferry stack
in it — Mosquitto, memcached, Swift, statestore and scheduler in ``cloud`` through
``tools.stack.Stack`` (driven by ``bench.drive up`` inside ``cloud``), one executor per edge in
that edge's namespace (host mounts kept, so Podman works) — then runs the scenarios, one
``bench.drive job`` per link rate, and writes ``bench/results/<timestamp>/``: ``results.json``
(``bench.records``), ``report.md`` and the PNGs (``bench.report``), plus the components' logs.
The headline ratios against Podman, measured in this run, are printed at the end.

Scenarios (``--quick`` is the reduced set in brackets):
- single: one migration edge1 → edge2 at a time, 100 Mbit/s links, every method and state size
  (1 KB, 10 KB, 100 KB, 1 MB [1 KB, 100 KB]), 10 [3] runs, a client sending 100 msg/s throughout.
- steady: the same under 200 msg/s input, 100 KB state, 3 [1] runs; lost / duplicated inputs.
- parallel: N services on edge1 moved to edge2 at once, 100 KB state each; N = 1, 2, 4, 8, 16 at
  10 Mbit/s and N = 1, 4, 8 at 5 and 25 Mbit/s [N = 1, 4, 8 at 10 Mbit/s], 1 run each;
  ``microvm-snapshot`` only at 10 Mbit/s up to N = 8 (and not in the quick set).
Every service runs the ``aggregator`` app with ``ballast_kb`` (default 8192) of incompressible
heap that is not part of its state (see ``unikernel/apps/aggregator.c``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.headline import PARALLEL_N, PARALLEL_RATE_MBIT
from bench.netlab import NetLab, unavailable_reason
from bench.records import METHODS, RATE_TARGETS, SCHEMA, RunRecord, records_of
from tools.stack.stack import login_env

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
EDGES = ("edge1", "edge2")
LAB_PREFIX = "fb"

# The state size of a run is the aggregator's window: float64 samples, 8 bytes each in the
# guest's store, full from the start (history_sensors=1). What crosses the network is measured
# (bytes_moved): checkpoint blobs are compressed, and sensor readings compress about 2x.
BYTES_PER_SAMPLE = 8
DEFAULT_BALLAST_KB = 8192
SINGLE_RATE_MBIT = 100.0
SINGLE_INPUT_RATE = 100.0
STEADY_INPUT_RATE = 200.0
PARALLEL_STATE = 100_000
EXECUTOR = (sys.executable, "-m", "services.executor")
RECOVERY_METHODS = ("unix", "microvm", "podman")  # podman: periodic CRIU checkpoints (faults.py)
RECOVERY_INPUT_RATE = 200.0
RATE_RAMP = [500.0, 1000.0, 2000.0, 5000.0]
RATE_RAMP_QUICK = [500.0, 2000.0, 5000.0]


def window_for(state_bytes: int) -> int:
    """The aggregator ``window`` holding ``state_bytes`` of float64 samples (one sensor)."""
    return max(1, round(state_bytes / BYTES_PER_SAMPLE))


@dataclass
class Group:
    """The runs done at one link rate by one ``bench.drive job``."""

    rate_mbit: float | None
    units: list[dict[str, Any]] = field(default_factory=list)

    @property
    def runs(self) -> int:
        return sum(u["runs"] for u in self.units)


def build_plan(
    quick: bool, methods: Sequence[str], runs: int | None, scenarios: Sequence[str]
) -> list[Group]:
    """What to run, grouped by link rate, in the order it runs."""
    sizes = [1_000, 100_000] if quick else [1_000, 10_000, 100_000, 1_000_000]
    single_runs = runs or (3 if quick else 10)
    steady_runs = 1 if quick else 3
    groups: list[Group] = []

    def unit(scenario: str, method: str, state: int, n_runs: int, **extra: Any) -> dict[str, Any]:
        return {
            "scenario": scenario,
            "method": method,
            "state_bytes": state,
            "window": window_for(state),
            "runs": n_runs,
            **extra,
        }

    single = Group(SINGLE_RATE_MBIT)
    if "single" in scenarios:
        for size in sizes:
            for method in methods:
                single.units.append(
                    unit("single", method, size, single_runs, input_rate=SINGLE_INPUT_RATE)
                )
    if "steady" in scenarios:
        for method in methods:
            single.units.append(
                unit("steady", method, 100_000, steady_runs, input_rate=STEADY_INPUT_RATE)
            )
    if single.units:
        groups.append(single)
    if "parallel" in scenarios:
        if quick:
            rates = {PARALLEL_RATE_MBIT: [1, 4, PARALLEL_N]}
        else:
            rates = {25.0: [1, 4, 8], PARALLEL_RATE_MBIT: [1, 2, 4, 8, 16], 5.0: [1, 4, 8]}
        for rate, ns in rates.items():
            group = Group(rate)
            for n in ns:
                for method in methods:
                    if method == "microvm-snapshot" and (
                        quick or rate != PARALLEL_RATE_MBIT or n > PARALLEL_N
                    ):
                        continue  # a whole-VM image costs what podman's does: keep the run short
                    group.units.append(unit("parallel", method, PARALLEL_STATE, 1, n=n))
            groups.append(group)
    faults = Group(SINGLE_RATE_MBIT)
    if "recovery" in scenarios:
        for method in methods:
            if method in RECOVERY_METHODS:
                faults.units.append(
                    unit("recovery", method, 0, 1 if quick else 3, input_rate=RECOVERY_INPUT_RATE)
                )
    if "rate" in scenarios:
        rates = RATE_RAMP_QUICK if quick else RATE_RAMP
        step_s = 2.0 if quick else 5.0
        for method in methods:
            if method in RATE_TARGETS:
                faults.units.append(unit("rate", method, 0, len(rates), rates=rates, step_s=step_s))
                faults.units.append(
                    unit("rate_migration", method, 0, 1, step_s=2 * step_s, fallback_rate=rates[0])
                )
    if faults.units:
        groups.append(faults)
    return groups


def bench_config(stack_dir: Path, cloud: str, methods: Sequence[str], tls: bool = True) -> str:
    """ferry.toml overrides for the lab (``Stack.up`` resolves ports and writes the full file).

    ``tls``: the stack as ``ferry up`` runs it (MQTT over mutual TLS, S3 over https), or
    plaintext (``--insecure``), to measure what TLS costs."""
    nodes = ", ".join(f'"{e}"' for e in EDGES)
    runtimes = ", ".join(f'"{m}"' for m in methods)
    return (
        "# Written by bench.run for one benchmark run.\n"
        f'[stack]\ndir = "{stack_dir}"\nhost = "{cloud}"\nnodes = [{nodes}]\n'
        f"tls = {'true' if tls else 'false'}\n\n"
        f'[broker]\nhost = "{cloud}"\nrequest_timeout = 30.0\n\n'
        # timeout: an 8 MB blob over a link shared 8 ways at 5 Mbit/s takes ~2 min to send.
        f'[s3]\nendpoint = "{cloud}:9000"\ntimeout = 900.0\n\n'
        # TCG: KVM is nested here and crawls (shared/ENVIRONMENT.md).
        f'[executor]\naccel = "tcg"\nruntimes = [{runtimes}]\nmicrovm_memory_mb = 64\n\n'
        # The link must be the bottleneck, not our own limit; a 16-way podman batch at 5 Mbit/s
        # needs minutes per phase.
        "[scheduler]\nmax_parallel_per_node = 32\nphase_timeout = 1800.0\n"
    )


def _git_commit() -> str | None:
    """The checkout's commit, or None where there is none (no git, or an exported tree)."""
    try:
        proc = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


class Bench:
    """One benchmark run inside one lab (see the module docstring)."""

    def __init__(self, args: argparse.Namespace, out_dir: Path, work: Path) -> None:
        self.args = args
        self.out_dir = out_dir
        self.work = work
        self.logs = out_dir / "logs"
        self.records: list[RunRecord] = []
        self.config_path: Path | None = None
        self.executors: list[subprocess.Popen[bytes]] = []

    def _drive(
        self, lab: NetLab, argv: list[str], timeout: float | None = None, ctl: Path | None = None
    ) -> int:
        """Run ``python -m bench.drive ARGV`` in ``cloud``; its exit status. With ``ctl``, answer
        its node requests meanwhile (kill -9 / restart of an edge: only this process can)."""
        proc = lab.run(
            "cloud",
            [sys.executable, "-m", "bench.drive", *argv],
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return proc.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                if deadline is not None and time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    return -9
                if ctl is not None:
                    self.serve_control(lab, ctl)

    def start(self, lab: NetLab) -> None:
        """Stack in ``cloud`` (via ``bench.drive up``), then one executor per edge."""
        cloud = lab.address("cloud")
        bench_toml = self.work / "bench.toml"
        bench_toml.write_text(
            bench_config(self.work / "stack", cloud, self.args.methods, not self.args.insecure)
        )
        ready = self.work / "ready.json"
        print(f"starting the stack in {lab.netns('cloud')} ({cloud})", flush=True)
        status = self._drive(lab, ["up", "--config", str(bench_toml), "--ready", str(ready)])
        if status != 0 or not ready.exists():
            raise RuntimeError(f"the stack did not start (bench.drive up exited {status})")
        self.config_path = Path(json.loads(ready.read_text())["config"])
        self.logs.mkdir(parents=True, exist_ok=True)
        for edge in EDGES:
            self.executors.append(self.start_executor(lab, edge))
            print(f"executor {edge} started in {lab.netns(edge)} ({lab.address(edge)})")

    def start_executor(self, lab: NetLab, edge: str) -> subprocess.Popen[bytes]:
        assert self.config_path is not None
        log = (self.logs / f"executor-{edge}.log").open("ab")
        # The executor runs podman: host mounts kept (bench/README.md, "Podman").
        proc = lab.run(
            edge,
            [
                *executor_argv(edge, self.args.profile_executors),
                "--config",
                str(self.config_path),
                "--node",
                edge,
            ],
            share_mounts=True,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own login on a TLS stack (the ACL lets a node's login alone speak for it).
            env={
                **os.environ,
                "PYTHONUNBUFFERED": "1",
                **({} if self.args.insecure else login_env(self.work / "stack", edge)),
            },
        )
        log.close()
        return proc

    def kill_node(self, lab: NetLab, edge: str) -> float:
        """kill -9 of every process in ``edge``'s namespace (executor, guests, containers): the
        node dies at once. Returns ``time.time()`` just before the first SIGKILL."""
        ns = lab.netns(edge)
        listed = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        pids = [int(p) for p in listed.stdout.split()]
        at = time.time()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        index = EDGES.index(edge)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.executors[index].wait(timeout=10)
        return at

    def serve_control(self, lab: NetLab, ctl: Path) -> None:
        """Answer the driver's node requests (``bench.faults.NodeControl``)."""
        for req in sorted(ctl.glob("*.req")):
            done = req.with_suffix(".done")
            if done.exists():
                continue
            ask = json.loads(req.read_text())
            answer: dict[str, Any] = {}
            try:
                if ask["op"] == "kill":
                    answer["at"] = self.kill_node(lab, ask["edge"])
                    print(f"   killed node {ask['edge']} (kill -9 of its namespace)", flush=True)
                elif ask["op"] == "restart":
                    index = EDGES.index(ask["edge"])
                    if self.executors[index].poll() is None:
                        self.kill_node(lab, ask["edge"])
                    self.executors[index] = self.start_executor(lab, ask["edge"])
                else:
                    answer["error"] = f"unknown op {ask['op']!r}"
            except Exception as exc:
                answer["error"] = f"{type(exc).__name__}: {exc}"
            tmp = done.with_suffix(".tmp")
            tmp.write_text(json.dumps(answer))
            tmp.rename(done)

    def run_group(self, lab: NetLab, group: Group, first: int, total: int) -> None:
        """Set the edge links to the group's rate and run its job; record what it measured."""
        assert self.config_path is not None
        for edge in EDGES:
            lab.set_rate(edge, group.rate_mbit)
        rate = "unshaped" if group.rate_mbit is None else f"{group.rate_mbit:g} Mbit/s"
        print(f"-- edge links at {rate}: {group.runs} runs", flush=True)
        tag = f"{first:04d}"
        job = self.work / f"job-{tag}.json"
        out = self.work / f"records-{tag}.jsonl"
        ctl = self.work / f"ctl-{tag}"
        ctl.mkdir(exist_ok=True)
        spec = {
            "edges": list(EDGES),
            "rate_mbit": group.rate_mbit,
            "ballast_kb": self.args.ballast_kb,
            "service_prefix": service_prefix(self.args.lab_prefix),
            "first_index": first,
            "total": total,
            "units": group.units,
            "ctl_dir": str(ctl),
            "netns": {edge: lab.netns(edge) for edge in EDGES},
            "host_pid": os.getpid(),  # its mount namespace has the host's mounts (podman)
        }
        job.write_text(json.dumps(spec, indent=1))
        status = self._drive(
            lab,
            ["job", "--config", str(self.config_path), "--job", str(job), "--out", str(out)],
            ctl=ctl,
        )
        got = records_of(
            [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
        )
        self.records += got
        # Whatever the driver did not get to is recorded as failed, never silently dropped.
        done = {(r.scenario, r.method, r.state_bytes, r.n_parallel, r.run) for r in got}
        for u in group.units:
            for run in range(u["runs"]):
                key = (u["scenario"], u["method"], u["state_bytes"], u.get("n", 1), run)
                if key not in done:
                    self.records.append(
                        RunRecord(
                            scenario=u["scenario"],
                            method=u["method"],
                            state_bytes=u["state_bytes"],
                            rate_mbit=group.rate_mbit,
                            n_parallel=u.get("n", 1),
                            run=run,
                            error=f"not run: bench.drive job exited with status {status}",
                        )
                    )

    def stop(self, lab: NetLab) -> None:
        """Executors first (they stop their guests), then stray containers, then the stack."""
        for proc in self.executors:
            if proc.poll() is None:
                proc.terminate()  # ``nsenter`` passes it on to the executor
        for proc in self.executors:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        remove_containers(self.args.lab_prefix)
        if self.config_path is not None:
            self._drive(lab, ["down", "--config", str(self.config_path)], timeout=60)
        stack_logs = self.work / "stack" / "logs"
        if stack_logs.is_dir():
            for log in stack_logs.iterdir():
                shutil.copy(log, self.logs / log.name)


def executor_argv(edge: str, profile_dir: Path | None) -> list[str]:
    """The executor's command; under cProfile (one ``executor-<edge>-<pid>.prof`` written when
    it exits on SIGTERM) with ``--profile-executors DIR``."""
    if profile_dir is None:
        return list(EXECUTOR)
    profile_dir.mkdir(parents=True, exist_ok=True)
    out = profile_dir / f"executor-{edge}-{time.time_ns()}.prof"
    return [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "services.executor"]


def service_prefix(lab_prefix: str) -> str:
    """Every benchmark service's name starts with this (so do its podman containers)."""
    return f"{lab_prefix}x"


def remove_containers(lab_prefix: str) -> list[str]:
    """``podman rm -f`` every container this lab's services left behind; their names.

    The podman runtime names a container ``ferry-<instance>`` and an instance ``<service>.<n>``.
    """
    wanted = f"ferry-{service_prefix(lab_prefix)}-"
    if shutil.which("podman") is None:
        return []
    listed = subprocess.run(
        ["podman", "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True
    )
    names = [n for n in listed.stdout.split() if n.startswith(wanted)]
    if names:
        subprocess.run(
            ["podman", "rm", "--force", "--time", "0", *names], capture_output=True, check=False
        )
    return names


def write_results(records: list[RunRecord], meta: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """``results.json`` plus ``report.md`` and the PNGs; returns the results dict."""
    from bench.durability import rate_summary, recovery_summary
    from bench.report import headline_fields, write_report

    results: dict[str, Any] = {
        "schema": SCHEMA,
        "meta": meta,
        "records": [r.to_dict() for r in records],
        **headline_fields(records),
        "recovery": recovery_summary(records),
        "sustained_rate": rate_summary(records),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    write_report(results, out_dir)
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the reduced set (a few minutes)")
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to compare"
    )
    parser.add_argument("--out", type=Path, help="results directory (default bench/results/TS)")
    parser.add_argument("--runs", type=int, help="runs per method and state size (single)")
    parser.add_argument(
        "--scenarios",
        nargs="+",
        choices=("single", "steady", "parallel", "recovery", "rate"),
        default=["single", "steady", "parallel", "recovery", "rate"],
    )
    parser.add_argument("--sizes", type=int, nargs="+", help="state sizes in bytes (single)")
    parser.add_argument("--parallel-n", type=int, nargs="+", help="N values (parallel)")
    parser.add_argument("--parallel-rate", type=float, help="one link rate for parallel runs")
    parser.add_argument("--single-rate", type=float, help="link rate of single/steady runs")
    parser.add_argument("--ballast-kb", type=int, default=DEFAULT_BALLAST_KB)
    parser.add_argument(
        "--profile-executors",
        type=Path,
        metavar="DIR",
        help="run the executors under cProfile, profiles in DIR (read with pstats)",
    )
    parser.add_argument(
        "--lab-prefix", default=LAB_PREFIX, help="namespace prefix (one lab per prefix at a time)"
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext MQTT and S3 (default: TLS, as `ferry up`): what TLS costs, run both",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    reason = unavailable_reason()
    if reason is not None:
        print(f"bench: cannot build the network lab: {reason}", file=sys.stderr)
        return 2
    plan = build_plan(args.quick, args.methods, args.runs, args.scenarios)
    _apply_overrides(plan, args)
    total = sum(g.runs for g in plan)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out_dir = (args.out or RESULTS / stamp).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "kernel": platform.release(),
        "git": _git_commit(),
        "quick": args.quick,
        "tls": not args.insecure,
        "methods": args.methods,
        "app": "aggregator",
        "ballast_kb": args.ballast_kb,
        "single_rate_mbit": plan[0].rate_mbit if plan else None,
        "testbed": f"netns lab {args.lab_prefix}: cloud + {', '.join(EDGES)}, tbf edge links",
        "accel": "tcg",
    }
    print(f"bench: {total} runs, results in {out_dir}", flush=True)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="ferry-bench-"))
    bench = Bench(args, out_dir, work)
    interrupted = False
    try:
        with NetLab(list(EDGES), None, prefix=args.lab_prefix) as lab:
            try:
                bench.start(lab)
                first = 0
                for group in plan:
                    bench.run_group(lab, group, first, total)
                    first += group.runs
            finally:
                bench.stop(lab)
    except KeyboardInterrupt:
        interrupted = True
        print("bench: interrupted; the lab is torn down, writing what was measured", flush=True)
    except Exception as exc:
        meta["error"] = f"{type(exc).__name__}: {exc}"
        print(f"bench: {meta['error']}", file=sys.stderr, flush=True)
    finally:
        remove_containers(args.lab_prefix)
        shutil.rmtree(work, ignore_errors=True)
    meta["duration_s"] = round(time.monotonic() - started, 1)
    meta["interrupted"] = interrupted
    from bench.report import headline_lines

    results = write_results(bench.records, meta, out_dir)
    failed = sum(1 for r in bench.records if not r.ok)
    print(
        f"\nbench: {len(bench.records)} runs ({failed} failed) in {meta['duration_s']:.0f} s; "
        f"report: {out_dir / 'report.md'}"
    )
    print(f"headline (Ferry microvm ÷ podman, this run; {args.ballast_kb} KB ballast):")
    for line in headline_lines(results):
        print(f"  {line}")
    from bench.durability import durability_lines

    for line in durability_lines(results):
        print(f"  {line}")
    return 130 if interrupted else (0 if bench.records and "error" not in meta else 1)


def _apply_overrides(plan: list[Group], args: argparse.Namespace) -> None:
    """``--sizes``, ``--parallel-n``, ``--parallel-rate``, ``--single-rate`` (for small runs)."""
    for group in plan:
        kinds = {u["scenario"] for u in group.units}
        if "parallel" not in kinds and args.single_rate is not None:
            group.rate_mbit = args.single_rate
        if args.sizes:
            units = []
            for u in group.units:
                if u["scenario"] != "single":
                    units.append(u)
                elif u["state_bytes"] == group.units[0]["state_bytes"]:
                    for size in args.sizes:
                        units.append({**u, "state_bytes": size, "window": window_for(size)})
            group.units = units
        if "parallel" in kinds and args.parallel_n:
            seen: set[str] = set()
            units = []
            for u in group.units:
                if u["method"] not in seen:
                    seen.add(u["method"])
                    units += [{**u, "n": n} for n in args.parallel_n]
            group.units = units
    if args.parallel_rate is not None:
        par = [g for g in plan if g.units and g.units[0]["scenario"] == "parallel"]
        for extra in par[1:]:
            plan.remove(extra)
        if par:
            par[0].rate_mbit = args.parallel_rate


if __name__ == "__main__":
    sys.exit(main())
