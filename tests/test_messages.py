"""The typed commands of ``services/common/messages.py`` say what the schemas say: every name a
schema admits has exactly one type, each type requires exactly the keys the schema requires for
its names and allows no key the schema does not know, and each handler in a dispatch table
takes the type of the names it is dispatched for. A schema change that the types miss (or the
other way round) fails here, not as a KeyError on the wire."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest

from services.common import messages
from services.executor.service import Executor
from services.scheduler.service import Scheduler
from services.statestore.service import StatestoreService

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"

UNIONS = [
    (messages.ExecutorCommand, "executor-command.schema.json", "command", Executor.COMMANDS),
    (messages.SchedulerCommand, "scheduler-command.schema.json", "command", Scheduler.COMMANDS),
    (messages.StatestoreRequest, "statestore-request.schema.json", "op", StatestoreService.OPS),
]


def schema(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((SCHEMAS / name).read_text())
    return document


def names_of(typed: type, field: str) -> set[str]:
    """The literal values a TypedDict allows for its discriminator ``field``."""
    hint = typing.get_type_hints(typed)[field]
    assert get_origin(hint) is Literal, f"{typed.__name__}.{field} is not a Literal"
    return set(get_args(hint))


def required_for(document: dict[str, Any], field: str, name: str) -> set[str]:
    """What the schema requires of a payload whose ``field`` is ``name`` (its if/then rules)."""
    required = set(document.get("required", []))
    for rule in document.get("allOf", []):
        condition = rule["if"]["properties"][field]
        if name == condition.get("const") or name in condition.get("enum", []):
            required |= set(rule["then"].get("required", []))
    return required


@pytest.mark.parametrize(("union", "schema_name", "field", "table"), UNIONS)
def test_every_name_the_schema_admits_has_exactly_one_type(
    union: Any, schema_name: str, field: str, table: dict[str, Any]
) -> None:
    admitted = set(schema(schema_name)["properties"][field]["enum"])
    covered = [name for typed in get_args(union) for name in names_of(typed, field)]
    assert sorted(covered) == sorted(admitted)


@pytest.mark.parametrize(("union", "schema_name", "field", "table"), UNIONS)
def test_each_type_requires_what_the_schema_requires_and_knows_every_key(
    union: Any, schema_name: str, field: str, table: dict[str, Any]
) -> None:
    document = schema(schema_name)
    known = set(document["properties"])
    for typed in get_args(union):
        for name in names_of(typed, field):
            assert set(typed.__required_keys__) == required_for(document, field, name), (
                typed.__name__,
                name,
            )
        assert set(typed.__optional_keys__) <= known, typed.__name__


@pytest.mark.parametrize(("union", "schema_name", "field", "table"), UNIONS)
def test_each_handler_takes_the_type_of_the_names_it_is_dispatched_for(
    union: Any, schema_name: str, field: str, table: dict[str, Any]
) -> None:
    by_name = {name: typed for typed in get_args(union) for name in names_of(typed, field)}
    for name, handler in table.items():
        hints = typing.get_type_hints(handler)
        argument = next(iter(v for k, v in hints.items() if k not in ("return", "trigger")))
        assert argument is by_name[name], (name, handler.__name__, argument)


def test_the_shared_shapes_match_their_schema_definitions() -> None:
    blob_ref = schema("common.schema.json")["$defs"]["blob_ref"]
    assert set(messages.BlobRefDoc.__required_keys__) == set(blob_ref["required"])
    assert set(messages.BlobRefDoc.__annotations__) == set(blob_ref["properties"])
    claim = schema("executor-command.schema.json")["properties"]["claim"]
    assert set(messages.Claim.__required_keys__) == set(claim["required"])
    expect = schema("statestore-request.schema.json")["properties"]["expect"]
    assert set(messages.Expect.__optional_keys__) == set(expect["properties"])
