"""Statistics, headline ratios and report files, computed from records made up in this test.

Every number below is a synthetic test input chosen so the expected result is obvious; none of
them is a measurement.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.headline import headline, headline_fields
from bench.records import RunRecord, records_of
from bench.report import headline_lines, render_markdown, write_report
from bench.stats import median, p95, percentile, summarize, summarize_by

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _single(method: str, state: int, downtimes: list[float], moved: int) -> list[RunRecord]:
    return [
        RunRecord(
            scenario="single",
            method=method,
            state_bytes=state,
            rate_mbit=None,
            n_parallel=1,
            run=i,
            downtime_ms=d,
            client_gap_ms=d + 5,
            bytes_moved=moved,
            total_ms=d * 3,
        )
        for i, d in enumerate(downtimes)
    ]


def _parallel(method: str, n: int, rate: float, totals: list[float]) -> list[RunRecord]:
    return [
        RunRecord("parallel", method, 1000, rate, n, i, total_ms=t) for i, t in enumerate(totals)
    ]


def _synthetic() -> list[RunRecord]:
    """Ferry microvm vs podman: 10 runs each at two state sizes, plus parallel and steady runs."""
    ten = [float(x) for x in range(1, 11)]  # median 5.5, nearest-rank p95 10
    records = [
        *_single("microvm", 1000, [10 * x for x in ten], 2_000),  # median 55
        *_single("podman", 1000, [1000 * x for x in ten], 3_000_000),  # median 5500 → 0.01
        *_single("microvm", 1_000_000, [20 * x for x in ten], 1_001_000),  # median 110
        *_single("podman", 1_000_000, [1000 * x for x in ten], 4_000_000),  # → 0.02 (worst)
        *_single("unix", 1000, ten, 1_500),
        *_parallel("microvm", 8, 10, [400, 500, 600]),  # median 500
        *_parallel("podman", 8, 10, [9000, 10000, 11000]),  # median 10000 → 0.05
        *_parallel("podman", 8, 25, [1.0]),  # other rate: must not count
        *_parallel("podman", 4, 10, [1.0]),  # other N: must not count
        RunRecord("steady", "microvm", 1000, None, 1, 0, lost=0, duplicated=0),
        RunRecord("steady", "podman", 1000, None, 1, 0, lost=3, duplicated=1),
        RunRecord(
            "single", "podman", 1000, None, 1, 10, downtime_ms=1.0, error="restore timed out"
        ),
    ]
    return records


def test_median_and_nearest_rank_percentiles() -> None:
    assert median([3, 1, 2]) == 2
    assert median([4, 1, 3, 2]) == 2.5
    assert p95(range(1, 11)) == 10  # rank ceil(9.5) = 10: with 10 runs p95 is the maximum
    assert p95(range(1, 21)) == 19  # rank ceil(19) = 19
    assert p95(range(1, 101)) == 95
    assert p95([7]) == 7
    assert percentile([1, 2, 3, 4], 50) == 2  # a measured value, never interpolated
    with pytest.raises(ValueError):
        median([])
    with pytest.raises(ValueError):
        percentile([1], 0)


def test_summaries_skip_failed_runs_and_unmeasured_fields() -> None:
    assert summarize([None, None]) is None
    s = summarize([None, 4, 1, 3, 2])
    assert s is not None and (s.n, s.median, s.p95, s.min, s.max) == (4, 2.5, 4, 1, 4)
    by = summarize_by(_synthetic(), "downtime_ms")
    assert by[("podman", 1000)].n == 10  # the failed 11th run is left out
    assert by[("podman", 1000)].median == 5500
    assert by[("microvm", 1_000_000)].p95 == 200
    assert ("microvm", 1000) in by and all(key[0] != "steady" for key in by)


def test_headline_ratios_are_worst_case_medians_ferry_over_podman() -> None:
    ratios = headline({"records": [r.to_dict() for r in _synthetic()]})
    assert ratios["downtime_ratio"].value == pytest.approx(0.02)
    assert ratios["bytes_ratio"].value == pytest.approx(1_001_000 / 4_000_000)
    assert ratios["parallel_time_ratio"].value == pytest.approx(0.05)
    assert [r.verdict for r in ratios.values()] == ["PASS", "FAIL", "PASS"]
    assert "1 KB: 0.01" in ratios["downtime_ratio"].note


def test_headline_is_none_with_a_reason_when_a_method_is_missing() -> None:
    only_ferry = [r for r in _synthetic() if r.method != "podman"]
    fields = headline_fields(only_ferry)
    assert fields["downtime_ratio"] is None and fields["parallel_time_ratio"] is None
    assert "`podman`" in fields["headline_notes"]["bytes_ratio"]
    assert "N/A" in headline_lines(only_ferry)[0]


def test_records_round_trip_and_reject_unknown_keys() -> None:
    records = _synthetic()
    assert records_of(json.loads(json.dumps([r.to_dict() for r in records]))) == records
    with pytest.raises(ValueError, match="downtime"):
        RunRecord.from_dict({**records[0].to_dict(), "downtime": 1})
    with pytest.raises(ValueError, match="scenario"):
        RunRecord("bogus", "unix", 0, None, 1, 0)


def test_report_tables_show_the_computed_numbers() -> None:
    text = render_markdown(_synthetic())
    assert "| `downtime_ratio` | 0.02 | ≤ 0.1 | **PASS** |" in text
    assert "| `bytes_ratio` | 0.25 | ≤ 0.01 | **FAIL** |" in text
    # podman 1 KB: median 5.5 s, p95 10 s, client gap median 5.5 s + 5 ms, bytes 3 MB, total 16.5 s
    assert "| `podman` | 1 KB | 10 | 5.5 s | 10 s | 5.5 s | 10 s | 3 MB | 16.5 s |" in text
    assert "| `microvm` | 10 Mbit/s | - | 500.0 ms |" in text  # N=4 column empty for microvm
    assert "| `podman` | 1 | 3 | 1 | 1 | 1 |" in text  # steady: lost 3, duplicated 1
    assert "| single | `podman` | 1 | restore timed out |" in text
    assert text.index("`unix`") < text.index("`microvm` | 1 KB") < text.index("`podman` | 1 KB")


def test_write_report_writes_markdown_and_three_pngs(tmp_path: Path) -> None:
    written = write_report({"records": [r.to_dict() for r in _synthetic()]}, tmp_path / "out")
    names = sorted(p.name for p in written)
    assert names == ["bytes.png", "downtime_cdf.png", "parallel.png", "report.md"]
    for path in written:
        assert path.stat().st_size > 1000
        if path.suffix == ".png":
            assert path.read_bytes().startswith(PNG_MAGIC)


def test_write_report_without_any_record_still_writes_every_file(tmp_path: Path) -> None:
    written = write_report({"records": []}, tmp_path)
    assert len(written) == 4 and all(p.exists() for p in written)
    assert "No successful single-migration runs." in (tmp_path / "report.md").read_text()
