"""The smallest real benchmark, end to end: ``python -m bench.run`` in a lab of its own.

One single migration of ``microvm`` and of ``podman`` (1 KB of state, 100 Mbit/s links) and one
"parallel" batch of N = 1 each, through the real stack (Mosquitto, Swift, scheduler, executors in
namespaces). Checks that ``results.json`` holds every record and the three headline fields; the
values are whatever this machine measured (only their presence and sign are checked).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.netlab import unavailable_reason
from bench.records import SCHEMA, records_of

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 90


def _skip_reason() -> str | None:
    reason = unavailable_reason()
    if reason is not None:
        return f"network lab unavailable: {reason}"
    if shutil.which("podman") is None:
        return "podman is not installed (make setup-podman)"
    from services.executor.runtimes import podman_cli as podman

    ok, why = asyncio.run(podman.criu_available())
    if not ok:
        return f"CRIU unusable for podman checkpoints: {why}"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (microvm)"
    return None


def test_smallest_bench_writes_records_and_headline(tmp_path: Path) -> None:
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)
    subprocess.run(["make", "-s", "-C", str(REPO / "unikernel")], check=True)
    out = tmp_path / "results"
    argv = [
        *(sys.executable, "-m", "bench.run", "--methods", "microvm", "podman"),
        *("--scenarios", "single", "parallel", "--runs", "1", "--sizes", "1000"),
        *("--parallel-n", "1", "--parallel-rate", "100", "--single-rate", "100"),
        *("--lab-prefix", "fbrun", "--out", str(out)),
    ]
    proc = subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "downtime_ratio = " in proc.stdout

    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == SCHEMA
    records = records_of(results)
    failed = [r.error for r in records if not r.ok]
    assert not failed, failed
    assert sorted((r.scenario, r.method) for r in records) == [
        ("parallel", "microvm"),
        ("parallel", "podman"),
        ("single", "microvm"),
        ("single", "podman"),
    ]
    for r in records:
        assert r.bytes_moved is not None and r.bytes_moved > 0
        assert r.total_ms is not None and r.total_ms > 0
        if r.scenario == "single":
            assert r.downtime_ms is not None and r.downtime_ms > 0
            assert r.client_gap_ms is not None and (r.lost, r.duplicated) == (0, 0)
    for name in ("downtime_ratio", "bytes_ratio", "parallel_time_ratio"):
        assert name in results and name in results["headline_notes"]
    assert results["downtime_ratio"] > 0 and results["bytes_ratio"] > 0
    # No batch of 8 at 10 Mbit/s in this run: the ratio says so instead of borrowing a number.
    assert results["parallel_time_ratio"] is None
    for name in ("report.md", "downtime_cdf.png", "bytes.png", "parallel.png"):
        assert (out / name).is_file()

    # Nothing is left behind: no lab namespaces, no containers of this run.
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "fbrun-" not in netns
    names = subprocess.run(
        ["podman", "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True
    ).stdout
    assert "ferry-fbrunx-" not in names
