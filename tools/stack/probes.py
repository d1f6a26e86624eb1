"""Readiness checks shared by the parts: each answers "ready?" quickly and never raises."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Probe:
    """One check's answer: ``ready`` and a short human ``detail`` (what was seen, or why not)."""

    ready: bool
    detail: str


Prober = Callable[[], Awaitable[Probe]]
"""A readiness check; it must return within a few seconds and report failures as ``ready=False``."""


async def tcp_accepts(host: str, port: int, timeout: float = 1.0) -> Probe:
    """Ready when something accepts a TCP connection on (``host``, ``port``)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError) as exc:
        return Probe(False, f"no listener on {host}:{port} ({_reason(exc)})")
    await _close(writer)
    return Probe(True, f"listening on {host}:{port}")


async def http_status(
    host: str, port: int, path: str, timeout: float = 2.0, tls: ssl.SSLContext | None = None
) -> int | None:
    """The status code of ``GET path`` over HTTP/1.0 (https with ``tls``), or None if no
    answer came."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=tls, server_hostname=host if tls else None),
            timeout,
        )
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), timeout)
    except (OSError, TimeoutError):
        return None
    finally:
        await _close(writer)
    parts = line.split()
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None


def _reason(exc: OSError) -> str:
    return "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
