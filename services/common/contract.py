"""The wire contract: which payload schema governs which topic, read from ``schemas/asyncapi.yaml``.

asyncapi.yaml is the single source of truth for topics; this module turns each channel address
(``ferry/v1/nodes/{node}/status``) into a matcher and compiles the JSON Schema its messages name, so
the bus can validate every payload on send and on receive without a second table in code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import orjson
import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
ASYNCAPI_FILE = SCHEMA_DIR / "asyncapi.yaml"


class ContractError(ValueError):
    """A payload breaks its topic's schema, or a topic is not in the contract at all."""


@dataclass(frozen=True)
class Channel:
    """One topic template and the schema of the payloads it carries."""

    name: str
    address: str
    schema_file: str
    pattern: re.Pattern[str]

    def matches(self, topic: str) -> bool:
        return self.pattern.fullmatch(topic) is not None


def _address_pattern(address: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[a-z_]+\})", address)
    regex = "".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(regex)


@cache
def schema_registry() -> Registry:
    """Every ``*.schema.json`` by file name, so schemas can ``$ref`` each other."""
    resources = []
    for path in sorted(SCHEMA_DIR.glob("*.schema.json")):
        contents = orjson.loads(path.read_bytes())
        resources.append((path.name, Resource.from_contents(contents)))
    return Registry().with_resources(resources)


@cache
def validator(schema_file: str) -> Draft202012Validator:
    """A compiled validator for one schema file in ``schemas/``."""
    resource = schema_registry().get(schema_file)
    if resource is None:
        raise ContractError(f"schema {schema_file} is not in {SCHEMA_DIR}")
    return Draft202012Validator(resource.contents, registry=schema_registry())


@cache
def channels() -> tuple[Channel, ...]:
    """All channels of asyncapi.yaml, each with its payload schema file."""
    document = yaml.safe_load(ASYNCAPI_FILE.read_text())
    messages = document["components"]["messages"]
    found = []
    for name, channel in document["channels"].items():
        refs = [m["$ref"].rsplit("/", 1)[-1] for m in channel["messages"].values()]
        schema_files = {messages[ref]["payload"]["$ref"].removeprefix("./") for ref in refs}
        if len(schema_files) != 1:
            raise ContractError(f"channel {name} must carry exactly one payload schema")
        address = channel["address"]
        found.append(Channel(name, address, schema_files.pop(), _address_pattern(address)))
    return tuple(found)


def channel_for(topic: str) -> Channel:
    """The channel a concrete topic belongs to; unknown topics are a contract violation."""
    for channel in channels():
        if channel.matches(topic):
            return channel
    raise ContractError(f"topic {topic!r} is not declared in schemas/asyncapi.yaml")


def validate(topic: str, payload: Any) -> None:
    """Raise ContractError naming the first violation if ``payload`` is not valid for ``topic``."""
    channel = channel_for(topic)
    error = next(iter(validator(channel.schema_file).iter_errors(payload)), None)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        raise ContractError(f"{channel.schema_file}: at {where}: {error.message}")
