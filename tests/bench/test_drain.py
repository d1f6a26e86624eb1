"""bench.drain's pure parts: CPU time read from the real /proc, the summary and the goals."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from bench import drain


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_own_cpu_time_from_proc_matches_os_times() -> None:
    before = drain.process_cpu_s(os.getpid())
    _burn(0.3)
    after = drain.process_cpu_s(os.getpid())
    own = os.times()
    assert before is not None and after is not None
    assert 0.25 <= after - before <= 0.6  # clock ticks are 10 ms; the machine is shared
    # /proc counts the whole process: every thread, as os.times does
    assert abs(after - (own.user + own.system)) < 0.05


def test_a_command_name_with_spaces_and_parentheses_is_parsed(tmp_path: Path) -> None:
    odd = tmp_path / "a) b (c"  # comm is "(a) b (c)": fields must be counted from the last ")"
    sleep = shutil.which("sleep")
    assert sleep is not None
    odd.symlink_to(sleep)
    child = subprocess.Popen([str(odd), "5"])
    try:
        stat = Path(f"/proc/{child.pid}/stat").read_text()
        assert "(a) b (c)" in stat
        assert drain.stat_cpu_ticks(stat) >= 0
        assert child.pid in drain.descendants(os.getpid())
        snap = drain.cpu_snapshot({"executor-x": os.getpid()})
        assert snap["executor-x"] > 0 and f"guest/{child.pid}" in snap
    finally:
        child.kill()
        child.wait()
    assert drain.process_cpu_s(child.pid) is None  # gone (reaped): None, not an error


def test_stat_fields_14_and_15_are_utime_and_stime() -> None:
    fields = " ".join(str(k) for k in range(3, 53))  # field k holds the number k
    assert drain.stat_cpu_ticks(f"123 (x) {fields}") == 14 + 15
    assert drain.stat_cpu_ticks(f"123 (a) b (c) {fields}") == 14 + 15


def test_guests_started_during_the_window_count_from_zero() -> None:
    before = {"scheduler": 1.0, "guest/10": 5.0}  # guest 10 ends (a drained source)
    after = {"scheduler": 1.5, "guest/11": 0.2, "guest/12": 0.3}  # targets start
    spent = drain.cpu_delta(before, after)
    assert spent == {"scheduler": 0.5, "guests": 0.5}


def test_summary_counts_refused_as_failed_and_cpu_per_migration() -> None:
    finals = [{"phase": "committed"}, {"phase": "rolled_back", "detail": {"error": "boom"}}, None]
    records = [
        {
            "outcome": "committed",
            "downtime_ms": 30.0,
            "started": 1000,
            "finished": 1200,
            "total_ms": 200,
        },
        {"outcome": "rolled_back", "downtime_ms": None, "started": 1010, "finished": 1500},
    ]
    refused = [{"service": "s4", "error": "no room"}]
    cpu = {name: 0.1 for name in drain.CONTROL_PLANE} | {"mosquitto": 5.0, "guests": 5.0}
    result = drain.DrainResult("unix", 4, idle_cpu_ms_per_s=50.0)
    r = drain.summarize_drain(result, finals, records, refused, 2.0, cpu)
    assert (r.committed, r.failed) == (1, 3)
    assert r.errors == ["no room", "boom", "no final event"]
    assert r.downtime_p50_ms == r.downtime_p95_ms == 30.0
    assert r.scheduler_span_ms == 500.0 and r.drain_ms == 2000.0 and r.per_migration_ms == 500.0
    assert r.cpu_per_migration_ms == 100.0  # 4 x 0.1 s over 4: Mosquitto and guests left out
    assert r.net_cpu_per_migration_ms == 75.0  # 400 ms - 50 ms/s x 2 s of input, over 4
    assert r.migration_p50_ms == r.migration_max_ms == 200.0


def test_goals_pass_fail_and_unmeasured() -> None:
    def done(n: int, drain_ms: float, cpu: float, p95: float) -> drain.DrainResult:
        return drain.DrainResult(
            "unix", n, drain_ms=drain_ms, committed=n, cpu_per_migration_ms=cpu, downtime_p95_ms=p95
        )

    checked = {
        g: ok for g, ok, _ in drain.goals([done(10, 500, 10.0, 50), done(100, 2900, 14, 99)])
    }
    assert list(checked.values()) == [True, False, True, None]  # 14/10 > 1.25; microvm not run
    assert drain.plan(["unix", "podman", "microvm"], [10, 50, 100], all_sizes=False) == [
        ("unix", 10), ("unix", 50), ("unix", 100), ("podman", 10), ("microvm", 10), ("microvm", 50)
    ]  # fmt: skip


def test_step_times_between_consecutive_phases() -> None:
    one = [{"phase": "planned", "time": 0}, {"phase": "queued", "time": 10},
           {"phase": "committed", "time": 50}]  # fmt: skip
    two = [{"phase": "planned", "time": 100}, {"phase": "queued", "time": 130}]
    steps = drain.step_times([one, two])
    assert steps["planned>queued"] == {"p50": 20.0, "p95": 30.0, "max": 30.0}
    assert steps["queued>committed"] == {"p50": 40.0, "p95": 40.0, "max": 40.0}
