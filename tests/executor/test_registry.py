"""The runtime registry: every configurable runtime has a probe, and a node without QEMU says so
for both QEMU runtimes without choosing an accelerator, while the others stay available. The
registry is the one place a runtime is declared: the wire's runtime names and the image targets
agree with it, and a configured name it does not know is reported, not ignored."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import orjson
import pytest

from services.common import images
from services.common.config import load_config
from services.executor.runtimes import REGISTRY, available_runtimes
from services.executor.runtimes.node import QEMU

REPO = Path(__file__).resolve().parents[2]


def test_every_default_runtime_is_registered() -> None:
    assert set(load_config(env={}).executor.runtimes) <= set(REGISTRY)


def test_the_wire_names_the_registered_runtimes_and_their_builds() -> None:
    schemas = REPO / "schemas"
    common = orjson.loads((schemas / "common.schema.json").read_bytes())["$defs"]
    assert list(REGISTRY) == common["runtime"]["enum"]
    node_status = orjson.loads((schemas / "node-status.schema.json").read_bytes())
    advertised = node_status["properties"]["image_targets"]["additionalProperties"]["enum"]
    assert set(advertised) == set(images.TARGETS)
    assert {entry.image_target for entry in REGISTRY.values()} <= set(images.TARGETS)


async def test_a_configured_runtime_nobody_registered_is_reported() -> None:
    config = load_config(env={})
    wanted = dataclasses.replace(config.executor, runtimes=["unix", "docker"])
    configured = dataclasses.replace(config, executor=wanted)
    runtimes, unavailable, _ = await available_runtimes(configured)
    assert list(runtimes) == ["unix"]
    assert unavailable["docker"].startswith("no such runtime")


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
