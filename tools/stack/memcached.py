"""memcached: the Swift proxy's token and metadata cache (tempauth refuses to run without one)."""

from __future__ import annotations

import asyncio
import contextlib
import os

from tools.stack.probes import Probe


def argv(binary: str, host: str, port: int) -> list[str]:
    """Command line: TCP on ``host:port`` only, no UDP, 64 MiB is plenty for one proxy."""
    args = [binary, "-l", host, "-p", str(port), "-U", "0", "-m", "64"]
    if os.geteuid() == 0:
        args += ["-u", "root"]  # memcached refuses to run as root without naming the user
    return args


async def probe(host: str, port: int, timeout: float = 1.0) -> Probe:
    """Ready when the server answers the ``version`` command."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return Probe(False, f"no listener on {host}:{port}")
    try:
        writer.write(b"version\r\n")
        line = await asyncio.wait_for(reader.readline(), timeout)
    except (OSError, TimeoutError) as exc:
        return Probe(False, f"no answer to `version` ({exc!r})")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if not line.startswith(b"VERSION "):
        return Probe(False, f"unexpected answer to `version`: {line[:80]!r}")
    return Probe(True, f"memcached {line.split()[1].decode()} on {host}:{port}")
