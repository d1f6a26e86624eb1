"""An emulated edge network: one namespace per site, joined by a bridge, edge links shaped by tbf.

Wiring (``bench/README.md`` has the full picture)::

    <prefix>-cloud         <prefix>-<edge> ...      each site: lo up, eth0 with one IPv4 address
       eth0 10.213.7.1        eth0 10.213.7.11      tbf on edge eth0 egress = edge upload
         |                      |
       hv0 ---- br0 ----      hv1                   tbf on hub-side hv<i> egress = edge download
              <prefix>-hub                          (a pure L2 switch, no address)

Everything lives in namespaces this module creates; the root namespace's network is never touched.
Only the edge links are shaped: the cloud link stands for a data-centre uplink and is not the
bottleneck. netem is not available on the hosts we run on, so links add no delay and lose nothing
except what a full tbf queue drops; see ``bench/README.md`` ("Limits").

The lab is torn down on a normal exit, on an exception, on SIGINT/SIGTERM (handlers installed while
the lab is up, chained to the previous ones) and at interpreter exit. ``cleanup_stale(prefix)``
removes what a killed run (SIGKILL, power loss) left behind.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any

__all__ = [
    "LinkBytes",
    "NetLab",
    "NetLabError",
    "cleanup_stale",
    "tbf_params",
    "unavailable_reason",
]

log = logging.getLogger(__name__)

CLOUD = "cloud"
HUB = "hub"
IFACE = "eth0"  # every site's link, whatever the site
BRIDGE = "br0"
DEFAULT_SUBNET = "10.213.7.0/24"
FIRST_EDGE_HOST = 11  # cloud is host 1, edges are 11, 12, ...

_PREFIX = re.compile(r"^[a-z0-9]{1,16}$")  # no "-": "fb" must never match another prefix "fb-x"
_EDGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_TERM_GRACE_S = 2.0


class NetLabError(RuntimeError):
    """A command building or changing the lab failed; ``argv`` and ``stderr`` say which and why."""

    def __init__(self, argv: Sequence[str], stderr: str) -> None:
        self.argv = list(argv)
        self.stderr = stderr.strip()
        super().__init__(f"{' '.join(self.argv)}: {self.stderr or 'failed'}")


@dataclass(frozen=True)
class LinkBytes:
    """Bytes counted by the kernel on a site's ``eth0`` since the lab was built (L2 frames)."""

    rx: int
    tx: int


def tbf_params(rate_mbit: float, queue_ms: float) -> list[str]:
    """``tc`` tbf arguments for a ``rate_mbit`` (10^6 bit/s) link with ``queue_ms`` of queue.

    burst: at least 16 KiB (above one 64 KiB GSO segment's share at low rates, tbf splits bigger
    ones) and 10 ms worth of rate at high rates, so the 100 Mbit/s shaper is not limited by timer
    granularity. A burst lets that many bytes through at line speed after an idle period; for a
    1 Mbit/s link that is 16 KiB, i.e. ~0.13 s "for free" — small against the transfers we time.
    latency: how long a packet may wait in the queue; tbf drops beyond it (no netem, so this is the
    only loss on a link). Raises ValueError for a non-positive rate.
    """
    if rate_mbit <= 0:
        raise ValueError(f"rate must be > 0 Mbit/s, got {rate_mbit}")
    rate_bytes = rate_mbit * 1e6 / 8
    burst = max(16 * 1024, int(rate_bytes / 100))
    kbit = max(1, round(rate_mbit * 1000))
    return ["tbf", "rate", f"{kbit}kbit", "burst", str(burst), "latency", f"{queue_ms:g}ms"]


def _cmd(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise NetLabError(argv, proc.stderr)
    return proc


def _namespaces() -> list[str]:
    out = _cmd(["ip", "-j", "netns", "list"]).stdout.strip()
    return [entry["name"] for entry in json.loads(out or "[]")]


def _namespace_pids(ns: str) -> list[int]:
    out = _cmd(["ip", "netns", "pids", ns], check=False).stdout
    return [int(word) for word in out.split() if word.isdigit()]


def _signal_pids(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _delete_namespace(ns: str) -> None:
    """Stop every process inside ``ns`` (TERM, then KILL after a grace period) and delete it."""
    pids = _namespace_pids(ns)
    if pids:
        _signal_pids(pids, signal.SIGTERM)
        deadline = time.monotonic() + _TERM_GRACE_S
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = _namespace_pids(ns)
        _signal_pids(pids, signal.SIGKILL)
    # Deleting a namespace destroys its veth ends, and with them their peers in the hub.
    proc = _cmd(["ip", "netns", "del", ns], check=False)
    if proc.returncode != 0 and ns in _namespaces():
        log.warning("could not delete namespace %s: %s", ns, proc.stderr.strip())


def cleanup_stale(prefix: str) -> list[str]:
    """Delete every namespace named ``<prefix>-*`` and stop the processes inside; the names deleted.

    For leftovers of a run that could not clean up (SIGKILL, power loss). Only one lab per
    ``prefix`` may exist at a time: this also removes a live lab with the same prefix.
    """
    _check_prefix(prefix)
    stale = [ns for ns in _namespaces() if ns.startswith(f"{prefix}-")]
    for ns in stale:
        _delete_namespace(ns)
    return stale


def unavailable_reason() -> str | None:
    """Why a lab cannot be built on this host (not root, no ``ip``/``tc``, no netns), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc", "sysctl", "nsenter"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = f"fbprobe{os.getpid()}-x"
    try:
        _cmd(["ip", "netns", "add", probe])
    except NetLabError as exc:
        return f"`ip netns add` fails: {exc.stderr}"
    _cmd(["ip", "netns", "del", probe], check=False)
    return None


def _check_prefix(prefix: str) -> None:
    if not _PREFIX.match(prefix):
        raise ValueError(f"prefix must be 1-16 of [a-z0-9] (no '-'), got {prefix!r}")


class NetLab:
    """A cloud site and edge sites in namespaces, edge links shaped to ``rate_mbit`` both ways.

    Use as ``with NetLab(["a", "b"], 10) as lab:`` (or ``async with``: setup and teardown then
    block the event loop for a few hundred ms, which a benchmark can afford between runs).
    Sites are named ``"cloud"`` and the edge names; a namespace's full name (``fb-a``) is accepted
    wherever a site is. ``rate_mbit=None`` leaves the links unshaped. ``queue_ms`` bounds how long a
    packet may queue in a shaper (tbf ``latency``). ``clean_stale`` first removes leftovers with the
    same prefix (see ``cleanup_stale``). ``handle_signals`` installs the SIGINT/SIGTERM handlers
    (only possible from the main thread; silently skipped elsewhere).
    """

    def __init__(
        self,
        edges: Sequence[str],
        rate_mbit: float | None,
        prefix: str = "fb",
        *,
        subnet: str = DEFAULT_SUBNET,
        queue_ms: float = 100.0,
        clean_stale: bool = True,
        handle_signals: bool = True,
    ) -> None:
        _check_prefix(prefix)
        if not edges:
            raise ValueError("a lab needs at least one edge")
        if len(set(edges)) != len(edges):
            raise ValueError(f"edge names repeat: {list(edges)}")
        for edge in edges:
            if not _EDGE.match(edge) or edge in (CLOUD, HUB):
                raise ValueError(f"bad edge name {edge!r}: [A-Za-z0-9_.-], not 'cloud'/'hub'")
        network = ipaddress.IPv4Network(subnet)
        if FIRST_EDGE_HOST + len(edges) >= network.num_addresses - 1:
            raise ValueError(f"{subnet} has no room for {len(edges)} edges")
        self.prefix = prefix
        self.edges = list(edges)
        self.sites = [CLOUD, *self.edges]
        self.queue_ms = queue_ms
        self._network = network
        self._initial_rate = rate_mbit
        self._clean_stale = clean_stale
        self._handle_signals = handle_signals
        self._rates: dict[str, float | None] = {}
        self._procs: list[subprocess.Popen[Any]] = []
        self._previous: dict[int, Any] = {}
        self._pending: list[int] = []
        self._lock = threading.RLock()
        self._up = False
        self._closing = False

    # -- naming -------------------------------------------------------------------------------

    def netns(self, site: str) -> str:
        """The namespace name of ``site`` (``"cloud"``, ``"hub"``, an edge, or a full name)."""
        short = site.removeprefix(f"{self.prefix}-")
        if short not in (*self.sites, HUB):
            raise KeyError(f"no site {site!r} in lab {self.prefix} (sites: {self.sites})")
        return f"{self.prefix}-{short}"

    def address(self, site: str) -> str:
        """The IPv4 address of ``site`` on the lab network (cloud .1, edges .11, .12, ...)."""
        short = self.netns(site).removeprefix(f"{self.prefix}-")
        if short == HUB:
            raise KeyError("the hub is a switch and has no address")
        index = 1 if short == CLOUD else FIRST_EDGE_HOST + self.edges.index(short)
        return str(self._network.network_address + index)

    def _hub_port(self, site: str) -> str:
        return f"hv{self.sites.index(self.netns(site).removeprefix(f'{self.prefix}-'))}"

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> NetLab:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> NetLab:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Build the lab; on a failure (or signal) tear down what was built and raise."""
        with self._lock:
            if self._up:
                return
            self._up = True
            self._install_signal_handlers()
            atexit.register(self.close)
        try:
            if self._clean_stale:
                cleanup_stale(self.prefix)
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        hub = self.netns(HUB)
        for ns in (hub, *(self.netns(site) for site in self.sites)):
            _cmd(["ip", "netns", "add", ns])
            _cmd(["ip", "-n", ns, "link", "set", "lo", "up"])
            # No IPv6: no DAD/MLD chatter in the byte counters, one address family to reason about.
            sysctl = "net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1"
            _cmd(f"ip netns exec {ns} sysctl -qw {sysctl}".split(), check=False)
        _cmd(["ip", "-n", hub, "link", "add", BRIDGE, "type", "bridge"])
        _cmd(["ip", "-n", hub, "link", "set", BRIDGE, "up"])
        prefixlen = self._network.prefixlen
        for site in self.sites:
            ns, port = self.netns(site), self._hub_port(site)
            # Names are validated (no whitespace), so these command lines split safely.
            _cmd(f"ip -n {hub} link add {port} type veth peer name {IFACE} netns {ns}".split())
            _cmd(["ip", "-n", hub, "link", "set", port, "master", BRIDGE, "up"])
            _cmd(["ip", "-n", ns, "addr", "add", f"{self.address(site)}/{prefixlen}", "dev", IFACE])
            _cmd(["ip", "-n", ns, "link", "set", IFACE, "up"])
        for edge in self.edges:
            self.set_rate(edge, self._initial_rate)

    def close(self) -> None:
        """Stop the processes started in the lab and delete its namespaces. Idempotent, never raises
        for a part already gone; a signal arriving meanwhile is delivered once teardown is done."""
        with self._lock:
            if not self._up or self._closing:
                return
            self._closing = True
        try:
            self._stop_processes()
            for site in (*self.edges, CLOUD, HUB):
                _delete_namespace(self.netns(site))
        finally:
            atexit.unregister(self.close)
            self._restore_signal_handlers()
            with self._lock:
                self._up = False
                self._closing = False
                pending, self._pending = self._pending, []
            for signum in pending:
                self._chain(signum, None)

    def _stop_processes(self) -> None:
        running = [proc for proc in self._procs if proc.poll() is None]
        for proc in running:
            self._signal_proc(proc, signal.SIGTERM)
        deadline = time.monotonic() + _TERM_GRACE_S
        for proc in running:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal_proc(proc, signal.SIGKILL)
                proc.wait()
        self._procs.clear()

    @staticmethod
    def _signal_proc(proc: subprocess.Popen[Any], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            # A process started in its own session leads a group: signal its children too.
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)

    # -- signals ------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        if not self._handle_signals or threading.current_thread() is not threading.main_thread():
            return
        for signum in _SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for signum, previous in self._previous.items():
            # Only undo our own handler: someone may have installed theirs on top since.
            if signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, previous)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        with self._lock:
            if self._closing:
                self._pending.append(signum)
                return
        self.close()  # restores the previous handlers and delivers what queued meanwhile
        self._chain(signum, frame)

    def _chain(self, signum: int, frame: FrameType | None) -> None:
        """Deliver ``signum`` the way the process would have handled it without the lab."""
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)  # e.g. default_int_handler: raises KeyboardInterrupt
        elif previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    # -- use ----------------------------------------------------------------------------------

    def set_rate(self, edge: str, rate_mbit: float | None) -> None:
        """Shape ``edge``'s link to ``rate_mbit`` in both directions (None: unshaped).

        Upload is shaped on the edge's ``eth0`` egress, download on the hub port's egress. Takes
        effect at once; packets queued under the old rate are dropped, so change rates between runs.
        """
        if edge not in self.edges:
            raise KeyError(f"{edge!r} is not an edge of this lab (edges: {self.edges})")
        for ns, dev in ((self.netns(edge), IFACE), (self.netns(HUB), self._hub_port(edge))):
            if rate_mbit is None:
                _cmd(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)
            else:
                qdisc = f"tc -n {ns} qdisc replace dev {dev} root".split()
                _cmd([*qdisc, *tbf_params(rate_mbit, self.queue_ms)])
        self._rates[edge] = rate_mbit

    def rate(self, edge: str) -> float | None:
        """The rate ``edge``'s link is shaped to in Mbit/s, None when unshaped."""
        return self._rates[edge]

    def run(
        self, site: str, argv: Sequence[str], *, share_mounts: bool = False, **popen_kwargs: Any
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``site``'s namespace; the Popen, stopped (TERM, then KILL) at close.

        ``popen_kwargs`` go to ``subprocess.Popen``; by default the child gets its own session so
        that closing the lab also reaches its children. Sockets it opens see only the lab network
        and its own ``lo``: bind servers to ``address(site)`` (or 0.0.0.0), or to 127.0.0.1 for
        what only the same site uses.

        ``ip netns exec`` gives the child a private mount namespace (to remount ``/sys``), so
        mounts it makes are invisible to later commands. Podman needs its overlay mounts seen by
        every ``podman`` call: ``share_mounts=True`` switches only the network namespace
        (``nsenter --net``) and keeps the host's mounts.
        """
        popen_kwargs.setdefault("start_new_session", True)
        ns = self.netns(site)
        enter = (
            ["nsenter", f"--net=/run/netns/{ns}", "--"]
            if share_mounts
            else ["ip", "netns", "exec", ns]
        )
        proc: subprocess.Popen[Any] = subprocess.Popen([*enter, *argv], **popen_kwargs)
        self._procs.append(proc)
        return proc

    def link_bytes(self, site: str) -> LinkBytes:
        """Bytes the kernel counted on ``site``'s ``eth0`` (frames incl. Ethernet header)."""
        out = _cmd(["ip", "-n", self.netns(site), "-j", "-s", "link", "show", IFACE]).stdout
        stats = json.loads(out)[0]["stats64"]
        return LinkBytes(rx=int(stats["rx"]["bytes"]), tx=int(stats["tx"]["bytes"]))
