"""The headline: Ferry (``microvm``) against Podman/CRIU, both measured in the same run.

- ``downtime_ratio``: median downtime_ms of single migrations, Ferry ÷ Podman, per state size;
  the headline is the **worst** (largest) of those per-size ratios, so the target must hold for
  every state size both methods were measured at. Target ≤ 0.10.
- ``bytes_ratio``: the same with bytes_moved. Target ≤ 0.01.
- ``parallel_time_ratio``: median total_ms of batches of 8 parallel migrations at 10 Mbit/s, Ferry
  ÷ Podman (worst over state sizes, if several). Target ≤ 0.10.

A ratio that cannot be computed (a method or a configuration missing, a zero denominator) is
None with the reason; it never falls back to numbers from another run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from bench.fmt import fmt_size
from bench.records import FERRY_METHOD, PEER_METHOD, RunRecord, records_of
from bench.stats import median

__all__ = ["PARALLEL_N", "PARALLEL_RATE_MBIT", "TARGETS", "Ratio", "headline", "headline_fields"]

PARALLEL_N = 8
PARALLEL_RATE_MBIT = 10.0
TARGETS = {"downtime_ratio": 0.10, "bytes_ratio": 0.01, "parallel_time_ratio": 0.10}


@dataclass(frozen=True)
class Ratio:
    """One headline number. ``value`` None means not computable, and ``note`` says why; otherwise
    ``note`` says what it was computed from."""

    name: str
    value: float | None
    target: float
    note: str

    @property
    def passed(self) -> bool | None:
        """True/False against the target; None when there is no value."""
        return None if self.value is None else self.value <= self.target

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "N/A"}[self.passed]


def _ratio(
    name: str,
    records: Iterable[RunRecord],
    field: str,
    select: Callable[[RunRecord], bool],
    what: str,
) -> Ratio:
    """Worst per-state-size ratio of medians of ``field``, Ferry ÷ peer, over selected records."""
    values: dict[tuple[str, int], list[float]] = {}
    for r in records:
        if r.ok and select(r) and getattr(r, field) is not None:
            values.setdefault((r.method, r.state_bytes), []).append(float(getattr(r, field)))
    sizes = {m: {s for (method, s) in values if method == m} for m in (FERRY_METHOD, PEER_METHOD)}
    for method, found in sizes.items():
        if not found:
            return Ratio(name, None, TARGETS[name], f"no {what} measured for `{method}`")
    common = sorted(sizes[FERRY_METHOD] & sizes[PEER_METHOD])
    if not common:
        return Ratio(name, None, TARGETS[name], f"no state size with {what} for both methods")
    per_size: list[tuple[int, float]] = []
    for size in common:
        peer = median(values[(PEER_METHOD, size)])
        if peer <= 0:
            note = f"`{PEER_METHOD}` median {field} is {peer:g} at {fmt_size(size)}"
            return Ratio(name, None, TARGETS[name], note)
        per_size.append((size, median(values[(FERRY_METHOD, size)]) / peer))
    worst = max(ratio for _, ratio in per_size)
    detail = ", ".join(f"{fmt_size(s)}: {r:.3g}" for s, r in per_size)
    note = f"worst per-state-size ratio of median {field} ({what}): {detail}"
    return Ratio(name, worst, TARGETS[name], note)


def headline(results: Mapping[str, Any] | Iterable[Any]) -> dict[str, Ratio]:
    """The three headline ratios (keys ``downtime_ratio``, ``bytes_ratio``,
    ``parallel_time_ratio``) from the records of one run."""
    records = records_of(results)

    def single(r: RunRecord) -> bool:
        return r.scenario == "single"

    def parallel(r: RunRecord) -> bool:
        return (
            r.scenario == "parallel"
            and r.n_parallel == PARALLEL_N
            and r.rate_mbit is not None
            and abs(r.rate_mbit - PARALLEL_RATE_MBIT) < 1e-9
        )

    parallel_what = f"{PARALLEL_N} parallel migrations at {PARALLEL_RATE_MBIT:g} Mbit/s"
    return {
        "downtime_ratio": _ratio(
            "downtime_ratio", records, "downtime_ms", single, "single migrations"
        ),
        "bytes_ratio": _ratio("bytes_ratio", records, "bytes_moved", single, "single migrations"),
        "parallel_time_ratio": _ratio(
            "parallel_time_ratio", records, "total_ms", parallel, parallel_what
        ),
    }


def headline_fields(results: Mapping[str, Any] | Iterable[Any]) -> dict[str, Any]:
    """The headline as ``results.json`` stores it: the three ratios (or None) and their notes."""
    ratios = headline(results)
    out: dict[str, Any] = {name: ratio.value for name, ratio in ratios.items()}
    out["headline_notes"] = {name: ratio.note for name, ratio in ratios.items()}
    return out
