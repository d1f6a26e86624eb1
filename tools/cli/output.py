"""The CLI's two consoles: results on stdout, errors on stderr.

Piped output (scripts, tests, CI logs) gets 200 columns instead of rich's 80, so tables and event
lines stay whole instead of being truncated or wrapped.
"""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console

console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)


def format_detail(detail: dict[str, Any]) -> str:
    """A migration event's detail as ``key=value, …``: flat values only, times to 0.1 ms."""
    return ", ".join(
        f"{key}={round(value, 1) if isinstance(value, float) else value}"
        for key, value in detail.items()
        if not isinstance(value, dict)
    )
