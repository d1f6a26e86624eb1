"""The lifecycle enums (services/common/states.py) and the schemas list the same words."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path

import pytest

from services.common.states import InstanceState, Phase, ServiceStatus

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"


def schema(name: str) -> dict[str, object]:
    document: dict[str, object] = json.loads((SCHEMAS / name).read_text())
    return document


@pytest.mark.parametrize(
    ("enum", "words"),
    [
        (Phase, schema("migration-event.schema.json")["properties"]["phase"]["enum"]),  # type: ignore[index]
        (ServiceStatus, schema("service-state.schema.json")["properties"]["status"]["enum"]),  # type: ignore[index]
        (
            InstanceState,
            schema("node-status.schema.json")["$defs"]["instance"]["properties"]["state"]["enum"],  # type: ignore[index]
        ),
    ],
)
def test_each_enum_is_its_schemas_list(enum: type[StrEnum], words: list[str]) -> None:
    assert [member.value for member in enum] == words
