"""Ferry's benchmark: Ferry's migration methods side by side with Podman/CRIU on one testbed.

Modules (see ``bench/README.md`` for the whole picture):

- ``bench.netlab``: the emulated edge network (namespaces, a bridge, ``tbf``-shaped links).
- ``bench.records``: the run record, the one source of truth for ``results.json``.
- ``bench.stats``: median and nearest-rank p95, summaries per (method, state size).
- ``bench.report``: ``report.md``, the headline ratios against Podman and the PNG plots.

Nothing is re-exported here so that importing the network lab never pulls in matplotlib.
"""
