"""``report.md`` and the plots from one run's results (schema in ``bench.records``).

``write_report(results, out_dir)`` writes ``report.md``, ``downtime_cdf.png``, ``bytes.png`` and
``parallel.png``; ``headline(results)`` gives the three ratios against Podman (``bench.headline``);
``headline_lines(results)`` is what the runner prints at the end of a run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.durability import rate_summary, recovery_summary
from bench.fmt import fmt_ms, fmt_ratio, fmt_size
from bench.headline import PARALLEL_RATE_MBIT, Ratio, headline, headline_fields
from bench.records import RATE_P99_MS, RunRecord, distinct, method_order, records_of
from bench.stats import Summary, summarize_by

__all__ = ["headline", "headline_fields", "headline_lines", "render_markdown", "write_report"]


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _get(summaries: Mapping[Any, Summary], key: Any, attr: str) -> float | None:
    summary = summaries.get(key)
    return None if summary is None else getattr(summary, attr)


def _headline_section(ratios: Mapping[str, Ratio]) -> list[str]:
    rows = [
        (f"`{r.name}`", fmt_ratio(r.value), f"≤ {r.target:g}", f"**{r.verdict}**", r.note)
        for r in ratios.values()
    ]
    return [
        "## Headline: Ferry `microvm` ÷ `podman`, measured in this run",
        "",
        *_table(("ratio", "value", "target", "verdict", "computed from"), rows),
    ]


def _single_section(records: Sequence[RunRecord]) -> list[str]:
    down = summarize_by(records, "downtime_ms")
    gap = summarize_by(records, "client_gap_ms")
    moved = summarize_by(records, "bytes_moved")
    total = summarize_by(records, "total_ms")
    ok = [r for r in records if r.ok and r.scenario == "single"]
    runs: dict[tuple[str, int], int] = {}
    for r in ok:
        runs[(r.method, r.state_bytes)] = runs.get((r.method, r.state_bytes), 0) + 1
    rows = []
    for method in method_order(m for m, _ in runs):
        for key in sorted(k for k in runs if k[0] == method):
            rows.append(
                (
                    f"`{method}`",
                    fmt_size(key[1]),
                    str(runs[key]),
                    fmt_ms(_get(down, key, "median")),
                    fmt_ms(_get(down, key, "p95")),
                    fmt_ms(_get(gap, key, "median")),
                    fmt_ms(_get(gap, key, "p95")),
                    fmt_size(_get(moved, key, "median")),
                    fmt_ms(_get(total, key, "median")),
                )
            )
    header = (
        "method",
        "state",
        "runs",
        "downtime median",
        "downtime p95",
        "client gap median",
        "client gap p95",
        "bytes moved median",
        "total median",
    )
    return [
        "## Single migration",
        "",
        "Downtime: source paused → target serving. Client gap: longest gap between two outputs "
        "seen by a client sending steady input. p95 is nearest-rank (with 10 runs: the maximum).",
        "",
        *(_table(header, rows) if rows else ["No successful single-migration runs."]),
    ]


def _parallel_section(records: Sequence[RunRecord]) -> list[str]:
    par = [r for r in records if r.scenario == "parallel"]
    totals = summarize_by(
        par, "total_ms", lambda r: (r.method, r.rate_mbit, r.n_parallel), scenario="parallel"
    )
    ns = distinct(par, "n_parallel")
    rows = []
    for method in method_order(k[0] for k in totals):
        for rate in sorted({k[1] for k in totals if k[0] == method and k[1] is not None}):
            cells = [fmt_ms(_get(totals, (method, rate, n), "median")) for n in ns]
            rows.append((f"`{method}`", f"{rate:g} Mbit/s", *cells))
    return [
        "## Parallel migrations",
        "",
        "Median total time from the first trigger until all N migrations committed.",
        "",
        *(
            _table(("method", "link", *(f"N={n}" for n in ns)), rows)
            if rows
            else ["No successful parallel runs."]
        ),
    ]


def _steady_section(records: Sequence[RunRecord]) -> list[str]:
    steady = [r for r in records if r.ok and r.scenario == "steady"]
    rows = []
    for method in method_order(r.method for r in steady):
        mine = [r for r in steady if r.method == method]
        lost = [r.lost for r in mine if r.lost is not None]
        dup = [r.duplicated for r in mine if r.duplicated is not None]
        rows.append(
            (
                f"`{method}`",
                str(len(mine)),
                str(sum(lost)) if lost else "-",
                str(sum(1 for x in lost if x)),
                str(sum(dup)) if dup else "-",
                str(sum(1 for x in dup if x)),
            )
        )
    header = (
        "method",
        "runs",
        "lost (total)",
        "runs with loss",
        "duplicated (total)",
        "runs with duplicates",
    )
    return [
        "## Steady input during migration",
        "",
        "Inputs identified by sequence number: lost = never applied, duplicated = applied twice.",
        "",
        *(_table(header, rows) if rows else ["No successful steady-input runs."]),
    ]


def _recovery_section(records: Sequence[RunRecord]) -> list[str]:
    rows = [
        (
            f"`{method}`",
            str(s["runs"]),
            fmt_ms(s["recovery_ms_median"]),
            fmt_ms(s["recovery_ms_max"]),
            str(s["lost"]),
            str(s["applied_twice"]),
        )
        for method, s in recovery_summary(records).items()
    ]
    header = ("method", "runs", "serving again (median)", "max", "inputs lost", "applied twice")
    return [
        "## Recovery after kill -9 of the serving node",
        "",
        "The whole node (executor and guests) killed under steady input; time from the kill to "
        "the first output from the node that took over (it includes `scheduler.recovery_grace`). "
        "Loss and double application per seq from the `counter` app's outputs (count n for "
        "input n). `podman`: the peer, `checkpoint --leave-running` every checkpoint interval, "
        "restored by the same recovery on the other node; it loses what it applied and "
        "acknowledged after its last recorded checkpoint.",
        "",
        *(_table(header, rows) if rows else ["No recovery runs."]),
    ]


def _rate_section(records: Sequence[RunRecord]) -> list[str]:
    summary = rate_summary(records)
    if not summary:
        return ["## Sustained input rate", "", "No rate runs."]
    rows = []
    for method, s in summary.items():
        for step in s["steps"]:
            rows.append(
                (
                    f"`{method}`",
                    f"{step['rate']:g}/s",
                    "-" if step["achieved"] is None else f"{step['achieved']:g}/s",
                    fmt_ms(step["p50_ms"]),
                    fmt_ms(step["p99_ms"]),
                    "yes" if step["held"] else "no",
                )
            )
        for m in s["migration"]:
            rows.append(
                (
                    f"`{method}` + migration",
                    f"{m['rate']:g}/s",
                    "-",
                    fmt_ms(m["p50_ms"]),
                    fmt_ms(m["p99_ms"]),
                    "yes" if m["held"] else "no",
                )
            )
    best = [
        (
            f"`{method}`",
            "none" if s["sustained"] is None else f"{s['sustained']:g}/s",
            "-" if s["target"] is None else f"≥ {s['target']:g}/s",
            {True: "**met**", False: "**not met**", None: "-"}[s["met"]],
        )
        for method, s in summary.items()
    ]
    return [
        "## Sustained input rate",
        "",
        f"One service per runtime, durable checkpoints on; latency = input published → its first "
        f"output received. A step holds with p99 ≤ {RATE_P99_MS:g} ms and nothing lost or "
        "applied twice.",
        "",
        *_table(("runtime", "highest rate held", "target", "verdict"), best),
        "",
        *_table(("runtime", "offered", "answered", "p50", "p99", "held"), rows),
    ]


def _failures_section(records: Sequence[RunRecord]) -> list[str]:
    failed = [r for r in records if not r.ok]
    if not failed:
        return ["## Failed runs", "", "None."]
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in failed:
        groups.setdefault((r.scenario, r.method), []).append(r)
    rows = [
        (scenario, f"`{method}`", str(len(rs)), (rs[0].error or "").replace("|", "\\|")[:120])
        for (scenario, method), rs in sorted(groups.items())
    ]
    return [
        "## Failed runs",
        "",
        "Not included in any statistic above.",
        "",
        *_table(("scenario", "method", "failed", "first error"), rows),
    ]


def render_markdown(
    results: Mapping[str, Any] | Iterable[Any], title: str = "Ferry benchmark"
) -> str:
    """The whole ``report.md`` for ``results``."""
    records = records_of(results)
    parts = [
        [f"# {title}", ""],
        _headline_section(headline(records)),
        _single_section(records),
        _parallel_section(records),
        _steady_section(records),
        _recovery_section(records),
        _rate_section(records),
        _failures_section(records),
        [
            "## Figures",
            "",
            "- `downtime_cdf.png`: CDF of single-migration downtime per method (solid) and of "
            "the client-side gap (dashed), log time axis.",
            "- `bytes.png`: median bytes moved per method and state size, log scale.",
            f"- `parallel.png`: median total time against N at {PARALLEL_RATE_MBIT:g} Mbit/s "
            "per method.",
        ],
    ]
    return "\n\n".join("\n".join(p) for p in parts).replace("\n\n\n", "\n\n") + "\n"


def write_report(results: Mapping[str, Any] | Iterable[Any], out_dir: Path) -> list[Path]:
    """Write ``report.md`` and the three PNGs into ``out_dir`` (created); the paths written."""
    from bench.plots import write_plots  # matplotlib only when plots are wanted

    out_dir.mkdir(parents=True, exist_ok=True)
    records = records_of(results)
    report = out_dir / "report.md"
    report.write_text(render_markdown(records), encoding="utf-8")
    return [report, *write_plots(records, out_dir)]


def headline_lines(results: Mapping[str, Any] | Iterable[Any]) -> list[str]:
    """One console line per headline ratio, e.g. ``downtime_ratio = 0.0213 (target ≤ 0.1) PASS``."""
    return [
        f"{r.name} = {fmt_ratio(r.value)} (target ≤ {r.target:g}) {r.verdict}"
        + ("" if r.value is not None else f": {r.note}")
        for r in headline(results).values()
    ]
