"""The benchmark's run record and ``results.json``: the one source of truth for both.

``results.json`` (schema ``ferry-bench/1``)::

    {
      "schema": "ferry-bench/1",
      "meta": {...},                    # free-form: start time, host, git commit, --quick, ...
      "records": [RunRecord, ...],      # every run, failed ones included (with "error")
      "downtime_ratio": 0.02,           # headline numbers, see bench.report.headline;
      "bytes_ratio": 0.0004,            # null when they could not be computed,
      "parallel_time_ratio": 0.05,      # with the reason in "headline_notes"
      "headline_notes": {"downtime_ratio": "...", ...}
    }

A record is one run of one scenario with one method; which fields are filled depends on the
scenario (``None`` = not measured in this run). Times are milliseconds, sizes bytes, rates Mbit/s.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = [
    "FERRY_METHOD",
    "METHODS",
    "PEER_METHOD",
    "RATE_P99_MS",
    "RATE_TARGETS",
    "SCENARIOS",
    "SCHEMA",
    "RunRecord",
    "distinct",
    "method_order",
    "records_of",
]

SCHEMA = "ferry-bench/1"

# single: one migration at a time; parallel: n_parallel at once, total_ms until all committed;
# steady: one migration under steady client input, lost/duplicated counted per sequence number.
# recovery: kill -9 of the serving node under steady input; recovery_ms until serving elsewhere.
# rate: one step of the input-rate ramp (input_rate offered for a few seconds), latency
# percentiles; rate_migration: the same with one migration in the middle.
SCENARIOS = ("single", "parallel", "steady", "recovery", "rate", "rate_migration")
METHODS = ("unix", "microvm", "microvm-snapshot", "podman")
#: Runtimes the input-rate ramp measures (issue 11 targets, inputs/s at p99 ≤ RATE_P99_MS).
RATE_TARGETS = {"unix": 5000.0, "microvm": 2000.0}
RATE_P99_MS = 50.0
FERRY_METHOD = "microvm"  # the Ferry method the headline ratios are about
PEER_METHOD = "podman"  # the peer they are measured against, in the same run


@dataclass(frozen=True)
class RunRecord:
    """One run. ``run`` numbers repetitions of the same (scenario, method, state, rate, N) from 0.

    downtime_ms: source paused → target serving, from the migration's own event timestamps.
    client_gap_ms: the longest gap between two outputs seen by a client sending steady input.
    bytes_moved: bytes of state that crossed the network for this migration (all of them for N>1).
    total_ms: trigger → committed; for ``parallel``, first trigger → last commit of the batch.
    lost / duplicated: input sequence numbers never applied / applied more than once.
    recovery_ms: kill -9 of the serving node → the first output from the node that took over.
    input_rate: inputs/s offered; achieved_rate: inputs/s answered over the same span.
    latency_p50_ms / latency_p99_ms: input published → its first output received (client clock).
    error: why the run failed; a failed run counts in the report's failure table, not in the stats.
    notes: anything else the runner wants kept with the run (free-form, not interpreted).
    """

    scenario: str
    method: str
    state_bytes: int
    rate_mbit: float | None
    n_parallel: int
    run: int
    downtime_ms: float | None = None
    client_gap_ms: float | None = None
    bytes_moved: int | None = None
    total_ms: float | None = None
    lost: int | None = None
    duplicated: int | None = None
    recovery_ms: float | None = None
    input_rate: float | None = None
    achieved_rate: float | None = None
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    error: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {self.scenario!r} (known: {SCENARIOS})")
        if self.n_parallel < 1 or self.state_bytes < 0 or self.run < 0:
            raise ValueError(f"n_parallel ≥ 1, state_bytes ≥ 0, run ≥ 0 expected: {self}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunRecord:
        """A record from its JSON form; ValueError naming the keys when some are unknown/missing."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown run record keys {sorted(unknown)} (put extras in 'notes')")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"bad run record {dict(data)}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (every key present, ``None`` for what was not measured)."""
        return asdict(self)

    @property
    def ok(self) -> bool:
        return self.error is None


def records_of(
    results: Mapping[str, Any] | Iterable[RunRecord | Mapping[str, Any]],
) -> list[RunRecord]:
    """The records of a results dict (its ``"records"``) or of a plain list of records/dicts."""
    items = results["records"] if isinstance(results, Mapping) else results
    return [r if isinstance(r, RunRecord) else RunRecord.from_dict(r) for r in items]


def method_order(methods: Iterable[str]) -> list[str]:
    """Methods in the order tables and plots show them: the known ones first, then by name."""
    unique = set(methods)
    known = [m for m in METHODS if m in unique]
    return known + sorted(unique - set(METHODS))


def distinct(records: Sequence[RunRecord], attr: str) -> list[Any]:
    """The distinct non-None values of ``attr`` among ``records``, sorted."""
    return sorted({getattr(r, attr) for r in records if getattr(r, attr) is not None})
