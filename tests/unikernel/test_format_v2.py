"""Checkpoint format_version 2: float64_list as base64 of little-endian IEEE-754 bytes.

Version 1 documents (float64_list as arrays of 16-hex-digit strings) still restore and are
rewritten as version 2 with the same values, bit for bit.
"""

from __future__ import annotations

import base64
import json
import random
import struct
from typing import Any

import jsonschema
import orjson
import pytest
from conftest import REPO, f64_list_bits, spawn, to_format_v1

from services.executor.channel import FrameType

SCHEMA = json.loads((REPO / "schemas" / "checkpoint.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


async def aggregator_checkpoint(window: int, values: list[float]) -> bytes:
    async with spawn("aggregator") as g:
        await g.chan.start({"window": window, "threshold": 50})
        for seq, value in enumerate(values, 1):
            g.chan.send_input("s1", seq, {"sensor": "s1", "value": value})
        return await g.chan.checkpoint(1234)


async def counter_checkpoint() -> dict[str, Any]:
    async with spawn("counter") as g:
        await g.chan.start({"threshold": 1.5})
        g.chan.send_input("dev1", 1, {"value": 2.5})
        return orjson.loads(await g.chan.checkpoint(77))


async def restore_and_checkpoint(app: str, doc: bytes, created_ms: int) -> bytes:
    async with spawn(app) as g:
        await g.chan.restore(doc)
        return await g.chan.checkpoint(created_ms)


async def test_window_is_base64_of_little_endian_bits() -> None:
    values = [i * 0.1 for i in range(1, 8)]  # 7 samples into a ring of 5
    doc = orjson.loads(await aggregator_checkpoint(5, values))
    assert doc["format_version"] == 2
    win = doc["vars"]["win/s1"]
    assert set(win) == {"type", "base64"} and win["type"] == "float64_list"
    raw = base64.b64decode(win["base64"], validate=True)
    assert list(struct.unpack("<5d", raw)) == [values[5], values[6], *values[2:5]]
    VALIDATOR.validate(doc)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 95, 96, 97, 192, 193, 1000])
async def test_float64_list_round_trips_bit_for_bit(n: int) -> None:
    """Any bit pattern (NaN payloads, -0.0, subnormals, infinities) and any length,
    including the encoder's chunk boundaries (96 values), survive restore + checkpoint."""
    rng = random.Random(n)
    special = [
        0x7FF8000000000000,
        0xFFF8000000000001,
        0x7FF0000000000001,
        0x7FF0000000000000,
        0xFFF0000000000000,
        0x8000000000000000,
        0x0000000000000001,
        0x000FFFFFFFFFFFFF,
        0x3FF8000000000000,
        0xFFFFFFFFFFFFFFFF,
    ]
    bits = [special[i] if i < len(special) else rng.getrandbits(64) for i in range(n)]
    raw = struct.pack(f"<{n}Q", *bits)
    doc = await counter_checkpoint()
    doc["vars"]["w"] = {"type": "float64_list", "base64": base64.b64encode(raw).decode()}
    VALIDATOR.validate(doc)
    again = orjson.loads(await restore_and_checkpoint("counter", orjson.dumps(doc), 77))
    assert again == doc
    assert f64_list_bits(again["vars"]["w"]["base64"]) == [f"{b:016x}" for b in bits]


async def test_format_v1_document_restores_as_v2() -> None:
    values = [v * 1.25 - 3 for v in range(40)] + [5e-324, -0.0, 1.7976931348623157e308]
    doc_v2 = await aggregator_checkpoint(32, values)
    doc_v1 = to_format_v1(doc_v2)
    assert b'"bits":["' in doc_v1 and orjson.loads(doc_v1)["format_version"] == 1
    VALIDATOR.validate(orjson.loads(doc_v1))
    again = await restore_and_checkpoint("aggregator", doc_v1, 1234)
    assert orjson.loads(again) == orjson.loads(doc_v2)
    # The restored guest continues exactly like one restored from the version 2 document.
    outputs = []
    for doc in (doc_v1, doc_v2):
        async with spawn("aggregator") as g:
            await g.chan.restore(doc)
            g.chan.send_input("s1", len(values) + 1, {"sensor": "s1", "value": 99.5})
            await g.chan.checkpoint(1)
            outputs.append(g.take(FrameType.OUTPUT))
    assert outputs[0] == outputs[1] and outputs[0]


async def test_schema_v1_example_restores_as_the_v2_example() -> None:
    v2, v1 = SCHEMA["examples"][0], SCHEMA["examples"][1]
    assert (v2["format_version"], v1["format_version"]) == (2, 1)
    assert orjson.loads(to_format_v1(orjson.dumps(v2))) == v1
    again = await restore_and_checkpoint("counter", orjson.dumps(v1), v1["created_ms"])
    assert orjson.loads(again) == v2


def test_schema_keeps_each_version_to_its_own_list_form() -> None:
    v2, v1 = SCHEMA["examples"][0], SCHEMA["examples"][1]
    assert not VALIDATOR.is_valid({**v2, "format_version": 1})
    assert not VALIDATOR.is_valid({**v1, "format_version": 2})
    assert not VALIDATOR.is_valid({**v2, "format_version": 3})
    for bad in ("AAAAAAAA", "AAAAAAAAAAAA", "AAAAAAAA+D9=", "AAAAAAAA+D8", "AA==AAAAAAAA+D8="):
        doc = json.loads(json.dumps(v2))
        doc["vars"]["window"]["base64"] = bad
        assert not VALIDATOR.is_valid(doc), bad


async def test_document_size_per_value() -> None:
    """About 10.7 bytes of document per float64 sample (was 19 with hex strings)."""
    small = await aggregator_checkpoint(8, [1.0])
    large = await aggregator_checkpoint(8 + 3 * 4096, [1.0])
    # 3 values = 24 bytes -> 32 base64 characters; the window param gains 4 digits.
    assert len(large) - len(small) == 32 * 4096 + len("12296") - len("8")


async def test_list_near_the_frame_limit_round_trips() -> None:
    """1.5 M values: a 16 MB document, just under the 16 MiB frame limit."""
    n = 1_500_000
    doc = await counter_checkpoint()
    raw = struct.pack(f"<{n}d", *(i / 7 for i in range(n)))
    doc["vars"]["w"] = {"type": "float64_list", "base64": base64.b64encode(raw).decode()}
    text = orjson.dumps(doc)
    assert 16_000_000 < len(text) < 16 * 1024 * 1024
    again = await restore_and_checkpoint("counter", text, 77)
    assert orjson.loads(again) == doc
