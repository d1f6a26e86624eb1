"""The last words of a guest: the tail of its console, for the report of a guest that died.

A crash says why only on the guest's console (``#UD rip=0x1001af`` from the microvm's trap
handler, an app's ``ferry_fail`` message); the failure report carries its last lines so the
operator does not have to find the node's instance directory. Bounded: a guest that floods its
console must not make the report (an MQTT message) large.
"""

from __future__ import annotations

import os
from pathlib import Path

MAX_LINES = 5
MAX_BYTES = 1024
#: node-status.schema.json caps an instance's reason at 4096 characters.
MAX_REASON = 4000


def tail(path: Path, max_lines: int = MAX_LINES, max_bytes: int = MAX_BYTES) -> str:
    """The last ``max_lines`` non-empty lines of ``path``, at most ``max_bytes`` of them ("" if
    the file is missing or empty); undecodable bytes are replaced, never raised on."""
    try:
        with path.open("rb") as file:
            size = file.seek(0, os.SEEK_END)
            file.seek(max(0, size - max_bytes))
            data = file.read(max_bytes)
    except OSError:
        return ""
    lines = [line.rstrip() for line in data.decode("utf-8", "replace").splitlines()]
    if size > max_bytes and len(lines) > 1:
        lines = lines[1:]  # the first one was cut by the byte limit (unless it is all there is)
    kept = [line for line in lines if line.strip()][-max_lines:]
    text = "\n".join(kept)
    return text.encode()[-max_bytes:].decode("utf-8", "ignore")


def explain(reason: str, log: Path) -> str:
    """``reason`` followed by the tail of the guest's console (lines joined by `` | ``)."""
    last = tail(log)
    if not last:
        return reason
    return f"{reason}; last lines of {log.name}: {' | '.join(last.splitlines())}"[:MAX_REASON]


def explain_guest(reason: str, workdir: Path, runtime: object) -> str:
    """``explain`` for an instance: its runtime names the console file in its workdir."""
    return explain(reason, workdir / str(getattr(runtime, "log_name", "guest.log")))
