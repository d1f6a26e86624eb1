"""The runtime registry: every configurable runtime has a probe, and a node without QEMU says so
for both QEMU runtimes without choosing an accelerator, while the others stay available."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from services.common.config import load_config
from services.executor.runtimes import REGISTRY, available_runtimes
from services.executor.runtimes.node import QEMU


def test_every_default_runtime_is_registered() -> None:
    assert set(load_config(env={}).executor.runtimes) <= set(REGISTRY)


async def test_a_node_without_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no QEMU here
    config = load_config(env={})
    wanted = dataclasses.replace(config.executor, runtimes=["unix", "microvm", "microvm-snapshot"])
    runtimes, unavailable, accel = await available_runtimes(
        dataclasses.replace(config, executor=wanted)
    )
    assert list(runtimes) == ["unix"] and runtimes["unix"].name == "unix"
    missing = f"{QEMU} not installed"
    assert unavailable == {"microvm": missing, "microvm-snapshot": missing}
    assert accel == {}
