"""The wire contract: every schema is valid, every example validates, every topic is declared."""

from __future__ import annotations

import ast
import copy
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from services.common import contract, topics

SCHEMAS = sorted(contract.SCHEMA_DIR.glob("*.schema.json"))
SERVICES = Path(__file__).resolve().parents[1] / "services"


@pytest.mark.parametrize("path", SCHEMAS, ids=lambda p: p.name)
def test_schema_is_valid_2020_12_and_examples_validate(path: Path) -> None:
    schema = orjson.loads(path.read_bytes())
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    validator = contract.validator(path.name)
    for example in schema.get("examples", []):
        assert validator.first_error(example) is None, f"{path.name} example invalid"
        assert reference(path.name).is_valid(example), f"{path.name} example invalid"


@cache
def reference(schema_file: str) -> Draft202012Validator:
    """The spec-complete (slow) jsonschema validator, to check the compiled one against."""
    registry: Registry = Registry().with_resources(
        (name, Resource.from_contents(doc)) for name, doc in contract.schema_documents().items()
    )
    return Draft202012Validator(contract.schema_documents()[schema_file], registry=registry)


WRONG_VALUES: list[Any] = [None, True, -1, 1.5, "", "Bad Name!", "x" * 100, [], {}, {"zz": 1}]


def mutations(value: Any) -> Iterator[Any]:
    """The value with, one at a time, each member dropped, replaced by each wrong value, or an
    unknown member added; recursively, so every nested field gets broken in every way."""
    if isinstance(value, dict):
        for key in value:
            yield {k: v for k, v in value.items() if k != key}
            for wrong in WRONG_VALUES:
                yield {**value, key: wrong}
            for inner in mutations(value[key]):
                yield {**value, key: inner}
        yield {**value, "unexpected_member": 1}
        yield {**value, "Bad Key!": {"type": "int64", "value": 1}}
    elif isinstance(value, list):
        for i, item in enumerate(value):
            for inner in mutations(item):
                yield [*value[:i], inner, *value[i + 1 :]]
        yield [*value, None]


@pytest.mark.parametrize("path", SCHEMAS, ids=lambda p: p.name)
def test_compiled_validator_agrees_with_jsonschema(path: Path) -> None:
    """fastjsonschema implements draft 7, our schemas declare 2020-12: on every example and
    thousands of broken variants of each, both must accept and refuse exactly the same."""
    examples = orjson.loads(path.read_bytes()).get("examples", [])
    compiled, spec = contract.validator(path.name), reference(path.name)
    checked = refused = 0
    for example in examples:
        for candidate in mutations(copy.deepcopy(example)):
            verdict = spec.is_valid(candidate)
            error = compiled.first_error(candidate)
            assert (error is None) == verdict, f"{path.name}: {candidate!r}: {error}"
            checked += 1
            refused += not verdict
    assert not examples or refused > 0
    assert checked >= 10 * len(examples)


def test_every_payload_schema_has_examples() -> None:
    payload_schemas = {c.schema_file for c in contract.channels()}
    for name in payload_schemas:
        assert orjson.loads((contract.SCHEMA_DIR / name).read_bytes()).get("examples"), name


def test_every_topic_template_in_code_is_declared() -> None:
    addresses = {c.address for c in contract.channels()}
    assert set(topics.TEMPLATES) <= addresses
    assert addresses <= set(topics.TEMPLATES), "asyncapi declares topics the code never builds"


def test_code_builds_topics_only_through_the_topics_module() -> None:
    """A literal 'ferry/v1/...' outside topics.py would bypass the declared contract."""
    offenders = []
    for path in SERVICES.rglob("*.py"):
        if path.name == "topics.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if re.match(r"^ferry/v1/", node.value):
                    offenders.append(f"{path.relative_to(SERVICES)}: {node.value}")
    assert not offenders


def test_asyncapi_channels_declare_qos_and_retain() -> None:
    """Who sends and receives on each channel: tests/test_asyncapi.py."""
    import yaml

    document = yaml.safe_load(contract.ASYNCAPI_FILE.read_text())
    assert document["asyncapi"].startswith("3.")
    for name, channel in document["channels"].items():
        assert channel["bindings"]["mqtt"]["qos"] in (0, 1), name
        assert "retain" in channel["bindings"]["mqtt"], name


def test_validation_names_the_offending_field() -> None:
    with pytest.raises(contract.ContractError, match="at seq"):
        contract.validate(topics.app_input("s1"), {"producer": "p", "seq": 0, "data": {}})
    with pytest.raises(contract.ContractError, match="not declared"):
        contract.validate("ferry/v1/unknown", {})


@pytest.mark.parametrize(
    ("topic", "payload", "message"),
    [
        (
            topics.app_input("s1"),
            {"producer": "p", "seq": 0, "data": {}},
            "app-input.schema.json: at seq: 0 is less than the minimum of 1",
        ),
        (
            topics.node_status("edge-a"),
            {"node": "edge-a", "time": 1},
            "node-status.schema.json: at (root): 'status' is a required property",
        ),
        (
            topics.node_status("edge-a"),
            {"node": "edge-a", "time": 1, "status": "online", "colour": "red"},
            "at (root): Additional properties are not allowed ('colour' was unexpected)",
        ),
        (
            topics.node_status("edge-a"),
            {"node": "edge-a", "time": 1, "status": "online",
             "instances": [{"service": "s", "instance": "i", "runtime": "vax", "state": "on"}]},
            "at instances/0/runtime: 'vax' is not one of ['unix', 'microvm',",
        ),
        (
            topics.app_input("s1"),
            {"producer": "no spaces", "seq": 1, "data": {}},
            "at producer: 'no spaces' does not match '^[A-Za-z0-9]",
        ),
        (
            topics.app_input("s1"),
            {"producer": "p", "seq": "1", "data": {}},
            "at seq: '1' is not of type 'integer'",
        ),
        (topics.app_input("s1"), [1], "at (root): [1] is not of type 'object'"),
    ],
)  # fmt: skip
def test_error_messages_say_where_and_what(topic: str, payload: Any, message: str) -> None:
    with pytest.raises(contract.ContractError) as caught:
        contract.validate(topic, payload)
    assert message in str(caught.value)


def test_a_huge_offending_value_is_quoted_short() -> None:
    with pytest.raises(contract.ContractError) as caught:
        contract.validate(topics.app_input("s1"), {"producer": "p" * 5000, "seq": 1, "data": {}})
    assert len(str(caught.value)) < 400


def test_the_query_topic_takes_reads_only() -> None:
    """The operator's login writes only statestore/queries: a write op there is no query."""
    contract.validate(topics.STATESTORE_QUERIES, {"op": "get_service", "service": "s1"})
    with pytest.raises(contract.ContractError, match="put_service"):
        contract.validate(topics.STATESTORE_QUERIES, {"op": "put_service", "record": {}})
    with pytest.raises(contract.ContractError, match="service"):
        contract.validate(topics.STATESTORE_QUERIES, {"op": "get_service"})  # as for requests
    contract.validate(topics.STATESTORE_REQUESTS, {"op": "delete_service", "service": "s1"})
