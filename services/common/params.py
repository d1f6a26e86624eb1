"""App parameters against the app's own declaration (``ferry_app.params`` in C, see ferry.h).

The guest reports its declarations in HELLO; ``ferry image push`` records them in the image
manifest. The CLI types ``--param KEY=VALUE`` by them (``30`` is a string for a string
parameter, a float for a float64 one) and the scheduler checks a deploy's params against them.
An app that declares nothing (``None``, an older SDK) takes any parameter as before.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

INT64 = (-(2**63), 2**63 - 1)
TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


class ParamError(ValueError):
    """A parameter the app does not declare, or a value of the wrong type."""


def split(pairs: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings as a dict of raw values (bad usage is reported here)."""
    raw: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ParamError(f"--param expects KEY=VALUE, got {pair!r}")
        raw[key] = value
    return raw


def _by_name(declared: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {decl["name"]: decl for decl in declared}


def _unknown(app: str, key: str, declared: list[dict[str, Any]]) -> ParamError:
    names = ", ".join(d["name"] for d in declared)
    takes = f"it takes: {names}" if names else "it declares no parameters"
    return ParamError(f"{app} has no parameter {key!r} ({takes}; see `ferry image show {app}`)")


def parse(app: str, declared: list[dict[str, Any]] | None, raw: dict[str, str]) -> dict[str, Any]:
    """Raw command-line values typed as the app declares them; undeclared apps get JSON guesses."""
    if declared is None:
        return {key: _guess(value) for key, value in raw.items()}
    by_name = _by_name(declared)
    typed: dict[str, Any] = {}
    for key, value in raw.items():
        decl = by_name.get(key)
        if decl is None:
            raise _unknown(app, key, declared)
        typed[key] = _typed(app, decl, value)
    return typed


def check(app: str, declared: list[dict[str, Any]] | None, params: dict[str, Any]) -> None:
    """Refuse params (already JSON values) that the declaration does not allow."""
    if declared is None:
        return
    by_name = _by_name(declared)
    for key, value in params.items():
        decl = by_name.get(key)
        if decl is None:
            raise _unknown(app, key, declared)
        if not _fits(decl["type"], value):
            raise ParamError(
                f"{app} parameter {key!r} is {decl['type']}, got {type(value).__name__} {value!r}"
            )


def _guess(value: str) -> Any:
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError:
        return value
    return parsed if isinstance(parsed, (int, float, str, bool)) else value


def _typed(app: str, decl: dict[str, Any], value: str) -> Any:
    kind, key = decl["type"], decl["name"]
    wrong = ParamError(f"{app} parameter {key!r} is {kind}, got {value!r}")
    if kind == "string":
        return value
    if kind == "bool":
        if value.lower() in TRUE:
            return True
        if value.lower() in FALSE:
            return False
        raise wrong
    if kind == "int64":
        try:
            number = int(value)
        except ValueError:
            raise wrong from None
        if not INT64[0] <= number <= INT64[1]:
            raise ParamError(f"{app} parameter {key!r} is out of the int64 range: {value}")
        return number
    if kind == "float64":
        try:
            real = float(value)
        except ValueError:
            raise wrong from None
        if not math.isfinite(real):
            raise ParamError(f"{app} parameter {key!r} must be a finite number, got {value}")
        return real
    raise ParamError(f"{app} declares {key!r} of an unknown type {kind!r}")


def _fits(kind: str, value: Any) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind == "int64":
        return isinstance(value, int) and INT64[0] <= value <= INT64[1]
    if kind == "float64":
        return isinstance(value, (int, float)) and math.isfinite(value)
    return False


def describe(declared: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(name, type, default, doc) rows for a listing."""
    return [
        (d["name"], d["type"], orjson.dumps(d.get("default")).decode(), d.get("doc", ""))
        for d in declared
    ]
