"""Each component's command table names exactly the commands its schema lets through: a command
the schema admits but no handler serves (or a handler no schema admits) fails here, not on the
wire."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.executor.service import Executor
from services.scheduler.service import Scheduler
from services.statestore.service import StatestoreService

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"


def enum(schema: str, field: str) -> set[str]:
    document = json.loads((SCHEMAS / schema).read_text())
    return set(document["properties"][field]["enum"])


@pytest.mark.parametrize(
    ("table", "schema", "field", "answered_elsewhere"),
    [
        (Executor.COMMANDS, "executor-command.schema.json", "command", {"status"}),
        (Scheduler.COMMANDS, "scheduler-command.schema.json", "command", set()),
        (StatestoreService.OPS, "statestore-request.schema.json", "op", set()),
    ],
)
def test_the_dispatch_table_and_the_schema_name_the_same_commands(
    table: dict[str, object], schema: str, field: str, answered_elsewhere: set[str]
) -> None:
    assert set(table) == enum(schema, field) - answered_elsewhere
    for name, handler in table.items():
        assert getattr(handler, "__name__", "").endswith(f"_{name}"), (name, handler)
