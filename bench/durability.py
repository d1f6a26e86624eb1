"""Recovery and sustained-rate figures from the records (``recovery``, ``rate``,
``rate_migration``): what ``results.json`` keeps beside the headline and ``report.md`` shows.

- ``recovery_summary``: per method, runs, median / max ``recovery_ms`` (kill -9 of the node →
  first output from another node), total inputs lost and applied twice.
- ``rate_summary``: per runtime, the highest offered rate of the ramp with p99 ≤ ``RATE_P99_MS``
  and nothing lost or applied twice (``sustained``, None if no step held), the issue's target and
  whether it was met, and the p99 across a migration at that rate (``rate_migration``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from bench.records import RATE_P99_MS, RATE_TARGETS, RunRecord, method_order, records_of
from bench.stats import median

__all__ = ["durability_lines", "held", "rate_summary", "recovery_summary"]


def held(record: RunRecord) -> bool:
    """A ramp step that held: p99 within the bound, every input answered once, no error."""
    return (
        record.ok
        and record.latency_p99_ms is not None
        and record.latency_p99_ms <= RATE_P99_MS
        and not record.lost
        and not record.duplicated
    )


def recovery_summary(results: Mapping[str, Any] | Iterable[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    records = [r for r in records_of(results) if r.scenario == "recovery"]
    for method in method_order(r.method for r in records):
        mine = [r for r in records if r.method == method]
        ok = [r for r in mine if r.ok and r.recovery_ms is not None]
        times = [float(r.recovery_ms) for r in ok if r.recovery_ms is not None]
        out[method] = {
            "runs": len(ok),
            "failed": len(mine) - len(ok),
            "recovery_ms_median": round(median(times), 1) if times else None,
            "recovery_ms_max": max(times) if times else None,
            "lost": sum(r.lost or 0 for r in ok),
            "applied_twice": sum(r.duplicated or 0 for r in ok),
        }
    return out


def rate_summary(results: Mapping[str, Any] | Iterable[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    records = records_of(results)
    ramp = [r for r in records if r.scenario == "rate"]
    moved = [r for r in records if r.scenario == "rate_migration"]
    for method in method_order(r.method for r in ramp + moved):
        steps = [r for r in ramp if r.method == method and r.input_rate is not None]
        best = max((float(r.input_rate) for r in steps if held(r) and r.input_rate), default=None)
        target = RATE_TARGETS.get(method)
        migration = [r for r in moved if r.method == method and r.ok]
        out[method] = {
            "sustained": best,
            "target": target,
            "met": None if target is None else best is not None and best >= target,
            "steps": [
                {
                    "rate": r.input_rate,
                    "achieved": r.achieved_rate,
                    "p50_ms": r.latency_p50_ms,
                    "p99_ms": r.latency_p99_ms,
                    "held": held(r),
                }
                for r in sorted(steps, key=lambda r: float(r.input_rate or 0))
            ],
            "migration": [
                {
                    "rate": r.input_rate,
                    "p50_ms": r.latency_p50_ms,
                    "p99_ms": r.latency_p99_ms,
                    "downtime_ms": r.downtime_ms,
                    "lost": r.lost,
                    "applied_twice": r.duplicated,
                    "held": held(r),
                }
                for r in migration
            ],
        }
    return out


def durability_lines(results: Mapping[str, Any] | Iterable[Any]) -> list[str]:
    """Console lines: recovery per method, highest sustained rate per runtime."""
    lines = []
    for method, s in recovery_summary(results).items():
        if s["runs"]:
            lines.append(
                f"recovery {method}: serving again after {s['recovery_ms_median']:g} ms (median "
                f"of {s['runs']}), lost {s['lost']}, applied twice {s['applied_twice']}"
            )
    for method, s in rate_summary(results).items():
        held_at = "none" if s["sustained"] is None else f"{s['sustained']:g}/s"
        verdict = {True: "met", False: "NOT met", None: "-"}[s["met"]]
        lines.append(f"rate {method}: highest held {held_at} (target {s['target']}/s: {verdict})")
    return lines
