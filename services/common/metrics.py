"""Prometheus metrics of one Ferry process: its own registry and a ``/metrics`` HTTP endpoint.

Why a registry per process (not the library's global one): tests and embeddings run several
components in one interpreter, and each must expose only its own numbers. Counters of things the
code already counts (an instance's applied inputs, an output line's confirmations) are read at
scrape time by a ``LoopCollector``, so the data plane carries no extra bookkeeping; only events
nothing else remembers (a migration's downtime, a request's latency) are observed as they happen.

The HTTP server is prometheus_client's threaded one. A scrape arrives on its thread, so the
collector hands the actual reading to the event loop (``run_coroutine_threadsafe``): the state
it reads is only ever touched from the loop, and a scrape sees one consistent moment.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from services.common.config import FerryConfig

log = logging.getLogger(__name__)

#: Longest a scrape waits for the event loop before it fails (the loop is stuck: say so).
SCRAPE_TIMEOUT = 5.0

#: Seconds buckets for things measured in milliseconds to seconds (downtime, uploads, requests).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Bytes buckets for checkpoint sizes: 256 B to 256 MiB, by factors of 4.
SIZE_BUCKETS = tuple(float(256 * 4**i) for i in range(11))


class MetricsError(Exception):
    """The metrics endpoint cannot be served (e.g. its port is taken)."""


def metrics_port(config: FerryConfig, component: str, override: int | None = None) -> int:
    """The port ``component`` serves ``/metrics`` on: ``override`` (the ``--metrics-port``
    option) if given, else ``metrics.<component>_port``; 0 means not served."""
    if override is not None:
        return override
    return int(getattr(config.metrics, f"{component}_port"))


class LoopCollector(Collector):
    """Runs ``read`` on the event loop at every scrape and yields the metrics it returns."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, read: Callable[[], Coroutine[Any, Any, list[Metric]]]
    ) -> None:
        self._loop = loop
        self._read = read

    def collect(self) -> Iterable[Metric]:
        if self._loop.is_closed():
            return []
        future = asyncio.run_coroutine_threadsafe(self._read(), self._loop)
        try:
            return future.result(SCRAPE_TIMEOUT)
        except TimeoutError:
            future.cancel()
            raise MetricsError(f"event loop did not answer within {SCRAPE_TIMEOUT:g} s") from None


class MetricsServer:
    """A registry (with the process's CPU and memory) and, once started, its HTTP endpoint."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._collector: LoopCollector | None = None
        self.port = 0

    def add(self, read: Callable[[], Coroutine[Any, Any, list[Metric]]]) -> None:
        """Read ``read()``'s metrics on the running loop at every scrape (this run's loop: a
        component run again replaces its previous collector)."""
        if self._collector is not None:
            self.registry.unregister(self._collector)
        self._collector = LoopCollector(asyncio.get_running_loop(), read)
        self.registry.register(self._collector)

    def start(self, host: str, port: int) -> None:
        """Serve ``http://host:port/metrics`` (no-op for port 0); MetricsError if it cannot."""
        if port == 0:
            return
        try:
            self._server, self._thread = start_http_server(port, host, registry=self.registry)
        except (OSError, OverflowError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise MetricsError(f"cannot serve metrics on {host}:{port}: {reason}") from exc
        self.port = int(self._server.server_port)
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None
