"""The CLI's two consoles: results on stdout, errors on stderr.

Piped output (scripts, tests, CI logs) gets 200 columns instead of rich's 80, so tables and event
lines stay whole instead of being truncated or wrapped.
"""

from __future__ import annotations

import sys

from rich.console import Console

console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)
