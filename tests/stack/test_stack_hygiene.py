"""The test suite's own stack hygiene: no user state leaks in, no process outlives a test run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.common.config import load_config
from tools.stack import state
from tools.stack.process import is_alive

HELD = Path(__file__).with_name("held_stack.py")
REPO = Path(__file__).resolve().parents[2]


def test_a_users_ferry_up_state_does_not_reach_tests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user_state = tmp_path / ".ferry"
    user_state.mkdir()
    (user_state / "ferry.toml").write_text('[broker]\nport = 32779\n[s3]\nendpoint = "h:32780"\n')
    monkeypatch.chdir(tmp_path)  # a checkout where its user ran `ferry up`
    config = load_config(env={})
    assert config.source is None
    assert config.broker.port == 1883 and config.s3.endpoint == "127.0.0.1:9000"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "term"])
def test_a_test_run_killed_from_outside_leaves_no_process_behind(
    tmp_path: Path, sig: signal.Signals
) -> None:
    out = tmp_path / "stack-dir"
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(HELD),
            "--basetemp",
            str(tmp_path / "run"),
            "-o",
            "timeout=0",
        ],
        cwd=REPO,
        env={**os.environ, "FERRY_HELD_STACK_OUT": str(out)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not out.exists():
            assert run.poll() is None, "the held test run ended before its stack was up"
            assert time.monotonic() < deadline, "the held test run's stack never came up"
            time.sleep(0.1)
        record = state.load(Path(out.read_text()))
        assert record is not None
        parts = {c.name: c for c in record.components}
        assert {"mosquitto", "memcached", "swift-proxy", "swift-object"} <= set(parts)
        assert all(is_alive(c.pid, c.start_ticks) for c in parts.values())
    finally:
        run.send_signal(sig)
        run.wait(30)
    deadline = time.monotonic() + 10
    while (alive := [n for n, c in parts.items() if is_alive(c.pid, c.start_ticks)]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert not alive, f"outlived the test run killed with {sig.name}: {alive}"
