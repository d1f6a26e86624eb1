"""The three PNG figures of a run, drawn with matplotlib's object API (no pyplot, no display).

Every figure is always written; one without data in this run says so in its middle, so a
results directory has the same files whatever was measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench.fmt import fmt_size
from bench.headline import PARALLEL_RATE_MBIT
from bench.records import METHODS, RunRecord, distinct, method_order
from bench.stats import summarize_by

__all__ = ["write_plots"]

DPI = 120


def _color(method: str) -> str:
    """The same colour for a method in every figure (known methods first, others after)."""
    index = METHODS.index(method) if method in METHODS else len(METHODS) + sum(map(ord, method)) % 6
    return f"C{index}"


def _figure() -> tuple[Figure, Axes]:
    fig = Figure(figsize=(7, 4.5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path)
    return path


def plot_downtime_cdf(records: Sequence[RunRecord], path: Path) -> Path:
    """Empirical CDF of single-migration downtime per method (solid), client gap (dashed)."""
    fig, ax = _figure()
    single = [r for r in records if r.ok and r.scenario == "single"]
    drawn = False
    for method in method_order(r.method for r in single):
        color = _color(method)
        for field, style, label in (("downtime_ms", "-", method), ("client_gap_ms", "--", None)):
            values = sorted(
                getattr(r, field)
                for r in single
                if r.method == method and getattr(r, field) is not None
            )
            if not values:
                continue
            fractions = [(k + 1) / len(values) for k in range(len(values))]
            gap_label = f"{method} (client gap)" if label is None else label
            ax.step(values, fractions, where="post", linestyle=style, color=color, label=gap_label)
            drawn = True
    if not drawn:
        _no_data(ax, "single-migration downtime")
    else:
        ax.set_xscale("log")
        ax.set_xlabel("downtime (ms, log scale)")
        ax.set_ylabel("fraction of migrations ≤ x")
        ax.set_ylim(0, 1.02)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    ax.set_title("Downtime per method (all state sizes)")
    return _save(fig, path)


def plot_bytes(records: Sequence[RunRecord], path: Path) -> Path:
    """Median bytes moved per method, grouped by state size, log scale."""
    fig, ax = _figure()
    moved = summarize_by(records, "bytes_moved")
    sizes = sorted({size for _, size in moved})
    methods = method_order(method for method, _ in moved)
    if not moved:
        _no_data(ax, "bytes moved")
    else:
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            xs = [
                j + (i - (len(methods) - 1) / 2) * width
                for j, s in enumerate(sizes)
                if (method, s) in moved
            ]
            ys = [moved[(method, s)].median for s in sizes if (method, s) in moved]
            ax.bar(xs, ys, width=width, label=method, color=_color(method))
        ax.set_xticks(range(len(sizes)), [fmt_size(s) for s in sizes])
        ax.set_yscale("log")
        ax.set_xlabel("application state size")
        ax.set_ylabel("bytes moved per migration (median, log scale)")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize="small")
    ax.set_title("Bytes moved per method")
    return _save(fig, path)


def plot_parallel(
    records: Sequence[RunRecord], path: Path, rate_mbit: float = PARALLEL_RATE_MBIT
) -> Path:
    """Median total time of a batch against N per method, at ``rate_mbit``."""
    fig, ax = _figure()
    par = [r for r in records if r.scenario == "parallel" and r.rate_mbit == rate_mbit]
    totals = summarize_by(par, "total_ms", lambda r: (r.method, r.n_parallel), scenario="parallel")
    if not totals:
        _no_data(ax, f"parallel runs at {rate_mbit:g} Mbit/s")
    else:
        for method in method_order(m for m, _ in totals):
            ns = [n for n in distinct(par, "n_parallel") if (method, n) in totals]
            ax.plot(
                ns,
                [totals[(method, n)].median / 1000 for n in ns],
                marker="o",
                color=_color(method),
                label=method,
            )
        ns_all = distinct(par, "n_parallel")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns_all, [str(n) for n in ns_all])
        ax.set_yscale("log")
        ax.set_xlabel("parallel migrations N")
        ax.set_ylabel("time until all committed (s, median, log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    ax.set_title(f"Parallel migrations over {rate_mbit:g} Mbit/s edge links")
    return _save(fig, path)


def write_plots(records: Sequence[RunRecord], out_dir: Path) -> list[Path]:
    """Write ``downtime_cdf.png``, ``bytes.png`` and ``parallel.png`` into ``out_dir``."""
    return [
        plot_downtime_cdf(records, out_dir / "downtime_cdf.png"),
        plot_bytes(records, out_dir / "bytes.png"),
        plot_parallel(records, out_dir / "parallel.png"),
    ]
