"""How the report writes numbers: SI sizes (1 KB = 1000 B) and durations in ms or s."""

from __future__ import annotations

__all__ = ["fmt_ms", "fmt_ratio", "fmt_size"]


def fmt_size(n: float | None) -> str:
    """``1500`` → ``"1.5 KB"`` (SI: state sizes are chosen in powers of ten); "-" for None."""
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def fmt_ms(ms: float | None) -> str:
    """``12.34`` → ``"12.3 ms"``, ``2345`` → ``"2.35 s"``; "-" for None."""
    if ms is None:
        return "-"
    return f"{ms:.1f} ms" if abs(ms) < 1000 else f"{ms / 1000:.3g} s"


def fmt_ratio(value: float | None) -> str:
    """A ratio with 3 significant digits, "-" for None."""
    return "-" if value is None else f"{value:.3g}"
