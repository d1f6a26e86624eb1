"""The operator CLI without a stack: errors say what is wrong and what to do, with exit codes."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tools.cli.output import format_detail


def ferry(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "ferry.toml"
    config.write_text(f'[stack]\ndir = "{tmp_path / "stack"}"\n[broker]\nport = {port}\n')
    return subprocess.run(
        [sys.executable, "-m", "tools.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_unreachable_stack_is_named_with_a_hint(tmp_path: Path) -> None:
    result = ferry(tmp_path, "services")
    assert result.returncode == 2
    assert "cannot connect to MQTT broker" in result.stderr and "ferry up" in result.stderr


def test_status_without_a_stack_says_so(tmp_path: Path) -> None:
    result = ferry(tmp_path, "status")
    assert result.returncode == 1
    assert "no stack is running" in result.stderr


def test_bad_usage_and_bad_config_are_explained(tmp_path: Path) -> None:
    result = ferry(tmp_path, "deploy", "svc")
    assert result.returncode == 2 and "--app" in result.stderr
    result = ferry(tmp_path, "deploy", "svc", "--app", "counter", "--node", "a", "--param", "x")
    assert result.returncode != 0 and "KEY=VALUE" in result.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[broker]\nport = 'x'\n")
    result = subprocess.run(
        [sys.executable, "-m", "tools.cli", "--config", str(broken), "services"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "broker.port" in result.stderr


def test_event_details_show_flat_values_with_times_rounded() -> None:
    detail = {"image_ms": 0.0963019992923364, "bytes": 338, "key": "k", "nested": {"a": 1}}
    assert format_detail(detail) == "image_ms=0.1, bytes=338, key=k"
