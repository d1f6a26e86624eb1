"""The counter-judged verdicts and the recovery / rate summaries, on made-up outputs and records.

Every number is a synthetic input chosen so the expected result is obvious; none is measured.
"""

from __future__ import annotations

from bench.durability import durability_lines, held, rate_summary, recovery_summary
from bench.load import Output, judge, latencies, percentile
from bench.records import RunRecord
from bench.report import render_markdown


def _outs(pairs: list[tuple[int, int]], node: str = "e1") -> list[Output]:
    return [Output(seq, count, node, float(seq)) for seq, count in pairs]


def test_exactly_once_with_repeated_outputs_after_a_crash() -> None:
    # 1..5 applied, crash, restored at count 3: 4 and 5 re-applied (same counts), then 6.
    outputs = _outs([(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)]) + _outs(
        [(4, 4), (5, 5), (6, 6)], "e2"
    )
    verdict = judge(6, outputs)
    assert (verdict.lost, verdict.applied_twice, verdict.mismatched) == (0, 0, 0)
    assert verdict.repeated == 2
    assert verdict.answered == 6


def test_inputs_acknowledged_after_the_last_checkpoint_are_lost() -> None:
    # Checkpoint at count 3; 4 and 5 were applied and acknowledged, so never replayed: the
    # restored state answers 6 with count 4.
    outputs = _outs([(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)]) + _outs([(6, 4), (7, 5)], "e2")
    verdict = judge(7, outputs)
    assert verdict.lost == 2
    assert verdict.applied_twice == 0
    assert verdict.mismatched == 2


def test_double_application_and_unanswered_tail() -> None:
    verdict = judge(5, _outs([(1, 1), (2, 3), (3, 4)]))
    assert verdict.applied_twice == 1
    assert verdict.lost == 2  # 4 and 5 never answered (the count at 3 is 4: nothing missing)
    assert verdict.unanswered == [4, 5]
    assert judge(3, []).lost == 3


def test_latency_is_to_the_first_output() -> None:
    sent = [10.0, 11.0]
    outputs = [Output(1, 1, "a", 10.02), Output(1, 1, "b", 12.0), Output(2, 2, "a", 11.005)]
    assert sorted(round(x, 3) for x in latencies(sent, outputs)) == [5.0, 20.0]
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([], 99) is None


def _step(method: str, rate: float, p99: float, lost: int = 0) -> RunRecord:
    return RunRecord(
        "rate",
        method,
        0,
        None,
        1,
        0,
        input_rate=rate,
        achieved_rate=rate,
        latency_p50_ms=p99 / 4,
        latency_p99_ms=p99,
        lost=lost,
        duplicated=0,
    )


def test_rate_summary_takes_the_highest_step_that_held() -> None:
    records = [
        _step("unix", 500, 5),
        _step("unix", 2000, 12),
        _step("unix", 5000, 300),
        _step("microvm", 500, 20),
        _step("microvm", 2000, 30, lost=1),  # lost: did not hold
        RunRecord(
            "rate_migration",
            "unix",
            0,
            None,
            1,
            0,
            input_rate=2000,
            latency_p50_ms=3,
            latency_p99_ms=40,
            lost=0,
            duplicated=0,
            downtime_ms=20,
        ),
    ]
    summary = rate_summary(records)
    assert summary["unix"]["sustained"] == 2000 and summary["unix"]["met"] is False
    assert summary["microvm"]["sustained"] == 500
    assert summary["unix"]["migration"][0]["held"] is True
    assert not held(_step("unix", 1, 50.1))
    text = render_markdown(records)
    assert "## Sustained input rate" in text and "`unix` + migration" in text
    assert any("rate unix: highest held 2000/s" in line for line in durability_lines(records))


def test_recovery_summary_counts_only_runs_that_recovered() -> None:
    records = [
        RunRecord("recovery", "unix", 0, None, 1, 0, recovery_ms=3000, lost=0, duplicated=0),
        RunRecord("recovery", "unix", 0, None, 1, 1, recovery_ms=3400, lost=0, duplicated=0),
        RunRecord("recovery", "podman", 0, None, 1, 0, recovery_ms=5000, lost=150, duplicated=0),
        RunRecord("recovery", "podman", 0, None, 1, 1, error="no output"),
    ]
    summary = recovery_summary(records)
    assert summary["unix"] == {
        "runs": 2,
        "failed": 0,
        "recovery_ms_median": 3200.0,
        "recovery_ms_max": 3400.0,
        "lost": 0,
        "applied_twice": 0,
    }
    assert summary["podman"]["runs"] == 1 and summary["podman"]["lost"] == 150
    assert "## Recovery after kill -9 of the serving node" in render_markdown(records)
