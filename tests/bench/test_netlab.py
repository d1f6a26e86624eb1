"""The benchmark's network lab, measured for real: namespaces, addresses, tbf rates, teardown.

Throughput is timed at a TCP sink from its first byte to EOF. TCP goodput is ~96% of the shaped
rate (tbf counts 1514-byte frames for 1448 bytes of payload), well inside the 15% we allow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.netlab import NetLab, cleanup_stale, tbf_params, unavailable_reason

PROBE = Path(__file__).with_name("tcp_probe.py")
REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 0.15
PORT = "5201"  # the namespaces are fresh: nothing else listens there


@pytest.fixture(scope="module")
def netns_ok() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"network lab unavailable: {reason}")


@pytest.fixture(scope="module")
def lab(netns_ok: None) -> Iterator[NetLab]:
    with NetLab(["a", "b"], None, prefix="fbtest") as lab:
        yield lab


def _namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True).stdout
    return [e["name"] for e in json.loads(out or "[]") if e["name"].startswith(f"{prefix}-")]


def _transfer(lab: NetLab, src: str, dst: str, nbytes: int) -> float:
    """Send ``nbytes`` over TCP from ``src`` to ``dst``; the goodput in Mbit/s seen by the sink."""
    sink = lab.run(
        dst,
        [sys.executable, str(PROBE), "sink", lab.address(dst), PORT],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sink.stdout is not None
    assert sink.stdout.readline().strip() == "listening"
    sender = lab.run(src, [sys.executable, str(PROBE), "send", lab.address(dst), PORT, str(nbytes)])
    assert sender.wait(timeout=30) == 0
    result = json.loads(sink.stdout.readline())
    assert sink.wait(timeout=5) == 0
    assert result["bytes"] == nbytes
    return result["bytes"] * 8 / result["seconds"] / 1e6


def test_tbf_params_scale_burst_with_rate() -> None:
    assert tbf_params(1, 100) == ["tbf", "rate", "1000kbit", "burst", "16384", "latency", "100ms"]
    assert tbf_params(100, 50)[4] == "125000"  # 10 ms worth at 12.5 MB/s
    with pytest.raises(ValueError):
        tbf_params(0, 100)


def test_sites_have_their_addresses_and_reach_each_other(lab: NetLab) -> None:
    assert [lab.address(s) for s in ("cloud", "a", "b")] == [
        "10.213.7.1",
        "10.213.7.11",
        "10.213.7.12",
    ]
    assert lab.netns("a") == lab.netns("fbtest-a") == "fbtest-a"
    before = lab.link_bytes("b")
    assert _transfer(lab, "a", "b", 100_000) > 0
    after = lab.link_bytes("b")
    assert after.rx - before.rx > 100_000  # payload plus headers went over b's link


@pytest.mark.parametrize(
    ("rate", "direction", "nbytes"),
    [
        (1, "up", 600_000),  # ~5 s
        (10, "up", 4_000_000),  # ~3.3 s
        (10, "down", 4_000_000),
        (100, "up", 25_000_000),  # ~2 s
    ],
)
def test_throughput_matches_tbf_rate(lab: NetLab, rate: float, direction: str, nbytes: int) -> None:
    lab.set_rate("a", rate)
    assert lab.rate("a") == rate
    src, dst = ("a", "cloud") if direction == "up" else ("cloud", "a")
    mbit = _transfer(lab, src, dst, nbytes)
    print(f"tbf {rate} Mbit/s {direction}: measured {mbit:.2f} Mbit/s ({mbit / rate:.1%})")
    assert abs(mbit / rate - 1) <= TOLERANCE, f"{mbit:.2f} Mbit/s on a {rate} Mbit/s link"


def test_unshaped_link_is_much_faster_than_shaped(lab: NetLab) -> None:
    lab.set_rate("a", None)
    assert _transfer(lab, "a", "cloud", 20_000_000) > 500


def test_share_mounts_enters_only_the_network_namespace(lab: NetLab) -> None:
    argv = ["sh", "-c", "readlink /proc/self/ns/net /proc/self/ns/mnt; ip -br addr show eth0"]
    outs = {
        share: lab.run("a", argv, share_mounts=share, stdout=subprocess.PIPE, text=True)
        .communicate(timeout=5)[0]
        .split()
        for share in (False, True)
    }
    own_mnt = os.readlink("/proc/self/ns/mnt")
    assert outs[True][0] == outs[False][0]  # same network namespace
    assert outs[True][1] == own_mnt != outs[False][1]
    assert "10.213.7.11/24" in outs[True]


def test_exception_tears_everything_down(netns_ok: None) -> None:
    with pytest.raises(RuntimeError, match="boom"), NetLab(["x"], 5, prefix="fbtestexc") as lab:
        sleeper = lab.run("x", ["sleep", "60"])
        raise RuntimeError("boom")
    assert _namespaces("fbtestexc") == []
    assert sleeper.poll() is not None


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_tears_everything_down(netns_ok: None, signum: int) -> None:
    child = textwrap.dedent(
        """
        import time
        from bench.netlab import NetLab
        with NetLab(["x", "y"], 10, prefix="fbtestsig") as lab:
            lab.run("cloud", ["sleep", "60"])
            print("ready", flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    assert len(_namespaces("fbtestsig")) == 4
    proc.send_signal(signum)
    proc.wait(timeout=15)
    assert proc.returncode != 0  # the signal still ends the program, after teardown
    assert _namespaces("fbtestsig") == []


def test_cleanup_stale_removes_only_its_prefix(netns_ok: None) -> None:
    for ns in ("fbteststale-cloud", "fbteststale-e1", "fbteststalex-cloud"):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    sleeper = subprocess.Popen(["ip", "netns", "exec", "fbteststale-e1", "sleep", "60"])
    time.sleep(0.2)
    try:
        assert sorted(cleanup_stale("fbteststale")) == ["fbteststale-cloud", "fbteststale-e1"]
        assert _namespaces("fbteststale") == []
        assert _namespaces("fbteststalex") == ["fbteststalex-cloud"]
        assert sleeper.wait(timeout=5) != 0
    finally:
        subprocess.run(["ip", "netns", "del", "fbteststalex-cloud"], check=False)
