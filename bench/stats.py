"""Median, nearest-rank percentiles and summaries of run records.

Percentiles use the **nearest-rank** definition: the p-th percentile of n sorted values is the
value at rank ``ceil(p/100 * n)`` (1-based). It is always a value that was measured, never an
interpolation. With 10 runs p95 is the maximum; with 20 runs it is the second largest.
The median is the usual one: the middle value, or the mean of the two middle values for even n.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.records import RunRecord

__all__ = ["Summary", "median", "p95", "percentile", "summarize", "summarize_by"]


def median(values: Iterable[float]) -> float:
    """The median of ``values``; ValueError when there are none."""
    data = list(values)
    if not data:
        raise ValueError("median of no values")
    return float(statistics.median(data))


def percentile(values: Iterable[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile (0 < p ≤ 100) of ``values``; ValueError when empty."""
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {p}")
    data = sorted(values)
    if not data:
        raise ValueError("percentile of no values")
    rank = math.ceil(p / 100 * len(data))
    return float(data[rank - 1])


def p95(values: Iterable[float]) -> float:
    """The nearest-rank 95th percentile of ``values``."""
    return percentile(values, 95)


@dataclass(frozen=True)
class Summary:
    """What the report shows of one series of measurements."""

    n: int
    median: float
    p95: float
    min: float
    max: float


def summarize(values: Iterable[float | None]) -> Summary | None:
    """Summary of the non-None ``values``; None when no value was measured."""
    data = [float(v) for v in values if v is not None]
    if not data:
        return None
    return Summary(len(data), median(data), p95(data), min(data), max(data))


def summarize_by(
    records: Sequence[RunRecord],
    field: str,
    key: Callable[[RunRecord], tuple[Any, ...]] = lambda r: (r.method, r.state_bytes),
    *,
    scenario: str | None = "single",
) -> dict[tuple[Any, ...], Summary]:
    """Summaries of ``field`` over successful records of ``scenario`` (None: all) by ``key``.

    The default groups by (method, state size). Groups without any measured value are left out.
    """
    groups: dict[tuple[Any, ...], list[float | None]] = {}
    for record in records:
        if record.ok and (scenario is None or record.scenario == scenario):
            groups.setdefault(key(record), []).append(getattr(record, field))
    summaries = {k: summarize(v) for k, v in groups.items()}
    return {k: s for k, s in summaries.items() if s is not None}
