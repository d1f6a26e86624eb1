"""The wire contract: every schema is valid, every example validates, every topic is declared."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import orjson
import pytest
from jsonschema import Draft202012Validator

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
        errors = [e.message for e in validator.iter_errors(example)]
        assert not errors, f"{path.name} example invalid: {errors}"


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


def test_asyncapi_channels_declare_qos_retain_and_actors() -> None:
    import yaml

    document = yaml.safe_load(contract.ASYNCAPI_FILE.read_text())
    assert document["asyncapi"].startswith("3.")
    for name, channel in document["channels"].items():
        assert channel["bindings"]["mqtt"]["qos"] in (0, 1), name
        assert "retain" in channel["bindings"]["mqtt"], name
        assert channel["x-publishers"] and channel["x-subscribers"], name


def test_validation_names_the_offending_field() -> None:
    with pytest.raises(contract.ContractError, match="at seq"):
        contract.validate(topics.app_input("s1"), {"producer": "p", "seq": 0, "data": {}})
    with pytest.raises(contract.ContractError, match="not declared"):
        contract.validate("ferry/v1/unknown", {})
