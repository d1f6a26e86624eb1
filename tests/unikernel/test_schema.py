"""schemas/checkpoint.schema.json describes what the guests actually write."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import orjson
import pytest
from conftest import REPO, spawn

SCHEMA = json.loads((REPO / "schemas" / "checkpoint.schema.json").read_text())


def validator() -> jsonschema.Draft202012Validator:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    return jsonschema.Draft202012Validator(SCHEMA)


def test_examples_are_valid() -> None:
    assert SCHEMA["examples"]
    for example in SCHEMA["examples"]:
        validator().validate(example)


async def test_example_restores_into_the_counter() -> None:
    example = SCHEMA["examples"][0]
    assert example["app"]["name"] == "counter"
    async with spawn("counter") as g:
        await g.chan.restore(orjson.dumps(example))
        again = orjson.loads(await g.chan.checkpoint(example["created_ms"]))
    assert again == example


@pytest.mark.parametrize(
    ("app", "params"),
    [
        ("counter", {}),
        ("aggregator", {"window": 4, "threshold": 50}),
        ("procedural", {"rounds": 2}),
    ],
)
async def test_real_checkpoints_are_valid(app: str, params: dict[str, object]) -> None:
    async with spawn(app) as g:
        await g.chan.start(params)
        if g.hello["mode"] == "event":
            for seq in range(1, 20):
                g.chan.send_input("src", seq, {"value": seq * 7.25, "sensor": f"s{seq % 3}"})
        else:
            await asyncio.sleep(0.05)
        doc = orjson.loads(await g.chan.checkpoint(1732480000000))
    validator().validate(doc)


def test_schema_rejects_what_the_guest_rejects() -> None:
    v = validator()
    bad = json.loads(json.dumps(SCHEMA["examples"][0]))
    bad["vars"]["total"] = {"type": "int64", "value": "5"}
    assert not v.is_valid(bad)
    bad = json.loads(json.dumps(SCHEMA["examples"][0]))
    bad["extra"] = 1
    assert not v.is_valid(bad)
