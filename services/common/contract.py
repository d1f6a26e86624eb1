"""The wire contract: which payload schema governs which topic, read from ``schemas/asyncapi.yaml``.

asyncapi.yaml is the single source of truth for topics; this module turns each channel address
(``ferry/v1/nodes/{node}/status``) into a matcher and compiles the JSON Schema its messages name, so
the bus can validate every payload on send and on receive without a second table in code.

Schemas are compiled to Python code by ``fastjsonschema`` (a few µs per payload) rather than
interpreted by ``jsonschema``, whose ``referencing`` resolves every ``$ref`` at each call (0.25 ms
for a one-instance node status, 6 ms for fifty; ``python -m bench.validation``). ``$ref`` between
files is resolved at compile time from ``schemas/`` only, never from the network; the keywords our
schemas use (``$defs``, ``if/then/else``, ``oneOf``, ``const``, ``propertyNames``, ...) are all in
the draft-07 subset fastjsonschema implements, and ``tests/test_contract.py`` checks that it agrees
with the spec-complete ``jsonschema`` on every example and on hundreds of broken variants of each.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import fastjsonschema
import orjson
import yaml

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
ASYNCAPI_FILE = SCHEMA_DIR / "asyncapi.yaml"
_SHOWN = 120  # characters of an offending value quoted in an error message


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
def schema_documents() -> dict[str, dict[str, Any]]:
    """Every ``*.schema.json`` in ``schemas/`` by file name."""
    return {p.name: orjson.loads(p.read_bytes()) for p in sorted(SCHEMA_DIR.glob("*.schema.json"))}


def _local_schema(uri: str) -> dict[str, Any]:
    """Resolve a cross-file ``$ref`` (``common.schema.json``, or an absolute ``$id`` ending in a
    file name) from ``schemas/``; anything else is a broken contract, never a network fetch."""
    name = urlsplit(uri).path.rsplit("/", 1)[-1]
    document = schema_documents().get(name)
    if document is None:
        raise ContractError(f"$ref {uri!r} names no schema in {SCHEMA_DIR}")
    return document


# fastjsonschema fetches unknown URIs with urllib unless a handler claims their scheme.
_HANDLERS = {scheme: _local_schema for scheme in ("", "file", "http", "https")}


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def _message(error: fastjsonschema.JsonSchemaValueException) -> str:
    """Phrase a violation as jsonschema does ("'status' is a required property"), quoting the
    offending value, instead of fastjsonschema's "data.x must ..." with its internal names."""
    rule, value, limit = error.rule, error.value, error.rule_definition
    definition = error.definition if isinstance(error.definition, dict) else {}
    if rule == "required" and isinstance(value, dict) and isinstance(limit, list):
        missing = next((key for key in limit if key not in value), None)
        if missing is not None:
            return f"{missing!r} is a required property"
    if rule == "additionalProperties" and isinstance(value, dict):
        known = definition.get("properties", {})
        extra = ", ".join(repr(key) for key in value if key not in known)
        return f"Additional properties are not allowed ({extra} was unexpected)"
    phrases: dict[str, Callable[[], str]] = {
        "enum": lambda: f"{_shown(value)} is not one of {_shown(limit)}",
        "const": lambda: f"{_shown(limit)} was expected, not {_shown(value)}",
        "pattern": lambda: f"{_shown(value)} does not match {limit!r}",
        "type": lambda: f"{_shown(value)} is not of type {limit!r}",
        "minimum": lambda: f"{_shown(value)} is less than the minimum of {limit}",
        "maximum": lambda: f"{_shown(value)} is greater than the maximum of {limit}",
        "minLength": lambda: f"{_shown(value)} is shorter than {limit} characters",
        "maxLength": lambda: f"{_shown(value)} is longer than {limit} characters",
        "oneOf": lambda: f"{_shown(value)} is not valid under exactly one of the given schemas",
    }
    phrase = phrases.get(str(rule))
    if phrase is not None:
        return phrase()
    # Any other keyword: fastjsonschema's own words, minus its "data.path" prefix.
    name = error.name or ""
    text = error.message
    return text[len(name) :].strip() if name and text.startswith(name) else text


class Validator:
    """One schema file compiled to code; ``first_error`` says where and what, or None."""

    def __init__(self, schema_file: str, document: dict[str, Any]) -> None:
        self.schema_file = schema_file
        self._check = fastjsonschema.compile(document, handlers=_HANDLERS, use_default=False)

    def first_error(self, payload: Any) -> tuple[str, str] | None:
        """``(where, message)`` of the first violation, ``where`` like ``instances/0/state``."""
        try:
            self._check(payload)
        except fastjsonschema.JsonSchemaValueException as exc:
            where = "/".join(str(p) for p in (exc.path or [])[1:]) or "(root)"
            return where, _message(exc)
        return None

    def is_valid(self, payload: Any) -> bool:
        return self.first_error(payload) is None


@cache
def validator(schema_file: str) -> Validator:
    """The compiled validator for one schema file in ``schemas/``."""
    document = schema_documents().get(schema_file)
    if document is None:
        raise ContractError(f"schema {schema_file} is not in {SCHEMA_DIR}")
    return Validator(schema_file, document)


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


@lru_cache(maxsize=4096)  # topics repeat (a service's inputs, a node's status): skip the scan
def channel_for(topic: str) -> Channel:
    """The channel a concrete topic belongs to; unknown topics are a contract violation."""
    for channel in channels():
        if channel.matches(topic):
            return channel
    raise ContractError(f"topic {topic!r} is not declared in schemas/asyncapi.yaml")


def validate(topic: str, payload: Any) -> None:
    """Raise ContractError naming the first violation if ``payload`` is not valid for ``topic``."""
    channel = channel_for(topic)
    error = validator(channel.schema_file).first_error(payload)
    if error is not None:
        where, message = error
        raise ContractError(f"{channel.schema_file}: at {where}: {message}")
