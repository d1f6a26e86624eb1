"""A RESTORE with a bad document, or a bad frame, ends the guest with ERROR + non-zero EXITED."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from conftest import spawn, to_format_v1

from services.executor.channel import FrameType, GuestError


async def real_checkpoint() -> bytes:
    async with spawn("counter") as g:
        await g.chan.start({"threshold": 1.5})
        for i in range(1, 6):
            g.chan.send_input("dev1", i, {"value": i})
        return await g.chan.checkpoint(1000)


def edit(fn: Callable[[dict[str, Any]], None]) -> Callable[[bytes], bytes]:
    def apply(doc: bytes) -> bytes:
        d = orjson.loads(doc)
        fn(d)
        return orjson.dumps(d)

    return apply


def _set(path: list[str], value: Any) -> Callable[[dict[str, Any]], None]:
    def fn(d: dict[str, Any]) -> None:
        for key in path[:-1]:
            d = d[key]
        d[path[-1]] = value

    return fn


def _del(path: list[str]) -> Callable[[dict[str, Any]], None]:
    def fn(d: dict[str, Any]) -> None:
        for key in path[:-1]:
            d = d[key]
        del d[path[-1]]

    return fn


def var(name: str, value: Any) -> Callable[[bytes], bytes]:
    return edit(_set(["vars", name], value))


def swap(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    return lambda d: d.replace(old, new, 1)


TOTAL = b'"total":{"type":"int64","value":5}'
BAD = "bad_document"
F64L = "float64_list"
ONE_AND_HALF = "AAAAAAAA+D8="  # 1.5: 00 00 00 00 00 00 f8 3f


def v1(fn: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    """Apply (fn) to the format_version 1 form of the document."""
    return lambda d: fn(to_format_v1(d))


BAD_DOCUMENTS: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "empty": (lambda d: b"", BAD),
    "not_json": (lambda d: b"hello", BAD),
    "truncated_half": (lambda d: d[: len(d) // 2], BAD),
    "truncated_one_byte": (lambda d: d[:-1], BAD),
    "trailing_garbage": (lambda d: d + b"x", BAD),
    "array": (lambda d: b"[" + d + b"]", BAD),
    "deep_nesting": (lambda d: b"[" * 100000 + b"]" * 100000, BAD),
    "deep_in_vars": (swap(b'"vars":{', b'"vars":{"x":' + b"[" * 50 + b"]" * 50 + b","), BAD),
    "wrong_app": (edit(_set(["app", "name"], "aggregator")), "wrong_app"),
    "wrong_version": (edit(_set(["app", "version"], "9.9.9")), "wrong_app"),
    "wrong_mode": (edit(_set(["mode"], "procedural")), "wrong_app"),
    "unknown_step": (edit(_set(["next_step"], "nope")), "wrong_app"),
    "null_step_event": (edit(_set(["next_step"], None)), BAD),
    "wrong_format": (edit(_set(["format"], "criu")), BAD),
    "future_format_version": (edit(_set(["format_version"], 3)), BAD),
    "format_version_zero": (edit(_set(["format_version"], 0)), BAD),
    "format_version_string": (edit(_set(["format_version"], "2")), BAD),
    # float64_list, format_version 2: base64 of 8 little-endian bytes per element.
    "f64list_bad_base64": (var("x", {"type": F64L, "base64": "AAE"}), BAD),
    "f64list_truncated": (var("x", {"type": F64L, "base64": ONE_AND_HALF[:-1]}), BAD),
    "f64list_truncated_group": (var("x", {"type": F64L, "base64": ONE_AND_HALF[:-4]}), BAD),
    "f64list_not_8_bytes": (var("x", {"type": F64L, "base64": "AAAAAAAA"}), BAD),
    "f64list_9_bytes": (var("x", {"type": F64L, "base64": "AAAAAAAAAAAA"}), BAD),
    "f64list_unused_bits": (var("x", {"type": F64L, "base64": "AAAAAAAA+D9="}), BAD),
    "f64list_bad_char": (var("x", {"type": F64L, "base64": "AAAAAAAA*D8="}), BAD),
    "f64list_inner_padding": (var("x", {"type": F64L, "base64": "AA==" + ONE_AND_HALF}), BAD),
    "f64list_whitespace": (var("x", {"type": F64L, "base64": "AAAA AAAA+D8="}), BAD),
    # "\/" is JSON for "/", but base64 payloads must be written without escapes.
    "f64list_escape": (
        lambda d: var("x", {"type": F64L, "base64": "AAAAAAAA/D8="})(d).replace(b"/", b"\\/"),
        BAD,
    ),
    "f64list_as_number": (var("x", {"type": F64L, "base64": 5}), BAD),
    "f64list_as_array": (var("x", {"type": F64L, "base64": [ONE_AND_HALF]}), BAD),
    "f64list_value_member": (var("x", {"type": F64L, "value": [1.5]}), BAD),
    "f64list_both_forms": (
        var("x", {"type": F64L, "base64": ONE_AND_HALF, "bits": ["3ff8000000000000"]}),
        BAD,
    ),
    "f64list_v1_form_in_v2": (var("x", {"type": F64L, "bits": ["3ff8000000000000"]}), BAD),
    "f64list_v2_form_in_v1": (v1(var("x", {"type": F64L, "base64": ONE_AND_HALF})), BAD),
    "f64list_v1_bits_short": (v1(var("x", {"type": F64L, "bits": ["3ff8"]})), BAD),
    "f64list_v1_future_version": (
        v1(lambda d: edit(_set(["format_version"], 3))(var("x", {"type": F64L, "bits": []})(d))),
        BAD,
    ),
    "missing_vars": (edit(_del(["vars"])), BAD),
    "missing_watermark": (edit(_del(["watermark"])), BAD),
    "unknown_member": (edit(_set(["extra"], 1)), BAD),
    "int_as_string": (var("total", {"type": "int64", "value": "5"}), BAD),
    "int_as_float": (var("total", {"type": "int64", "value": 5.0}), BAD),
    "int_overflow": (swap(TOTAL, TOTAL.replace(b"5", b"9223372036854775808")), BAD),
    "float_as_number": (var("mean/dev1", {"type": "float64", "value": 3.0}), BAD),
    "bits_short": (var("mean/dev1", {"type": "float64", "bits": "4008"}), BAD),
    "bits_not_hex": (var("mean/dev1", {"type": "float64", "bits": "400800000000000g"}), BAD),
    "unknown_type": (var("x", {"type": "int128", "value": 1}), BAD),
    "extra_member_in_value": (var("x", {"type": "bool", "value": True, "note": 1}), BAD),
    "bad_base64": (var("x", {"type": "bytes", "base64": "AAE"}), BAD),
    "list_mixed": (var("x", {"type": "int64_list", "value": [1, "2"]}), BAD),
    "watermark_zero": (edit(_set(["watermark", "dev1"], 0)), BAD),
    "watermark_string": (edit(_set(["watermark", "dev1"], "5")), BAD),
    "duplicate_var": (swap(b'"vars":{', b'"vars":{"total":{"type":"bool","value":true},'), BAD),
    "empty_key": (var("", {"type": "bool", "value": True}), BAD),
    "long_key": (var("k" * 257, {"type": "bool", "value": True}), BAD),
    "invalid_utf8": (swap(b'"total"', b'"tot\xffal"'), BAD),
    "nul_escape": (var("x", {"type": "string", "value": "a\u0000b"}), BAD),
    "lone_surrogate": (swap(b'"total"', b'"\\ud800"'), BAD),
    "negative_created": (edit(_set(["created_ms"], -1)), BAD),
}

# Why some are refused (ERROR.message), so a case cannot pass for an unrelated reason.
REASONS = {
    "future_format_version": "unsupported format_version",
    "format_version_zero": "unsupported format_version",
    "f64list_bad_base64": "strict base64",
    "f64list_truncated": "strict base64",
    "f64list_truncated_group": "multiple of 8 bytes",
    "f64list_not_8_bytes": "multiple of 8 bytes",
    "f64list_9_bytes": "multiple of 8 bytes",
    "f64list_unused_bits": "strict base64",
    "f64list_bad_char": "strict base64",
    "f64list_inner_padding": "strict base64",
    "f64list_whitespace": "strict base64",
    "f64list_escape": "escape",
    "f64list_both_forms": "duplicate member",
    "f64list_value_member": "wrong payload member",
    "f64list_v1_form_in_v2": 'format_version 2 float64_list takes "base64"',
    "f64list_v2_form_in_v1": 'format_version 1 float64_list takes "bits"',
    "f64list_v1_bits_short": "16 hex digits",
    "f64list_v1_future_version": "unsupported format_version",
}


@pytest.mark.parametrize("name", sorted(BAD_DOCUMENTS))
async def test_bad_document_is_refused(name: str) -> None:
    mutate, code = BAD_DOCUMENTS[name]
    doc = mutate(await real_checkpoint())
    async with spawn("counter") as g:
        with pytest.raises(GuestError) as info:
            await g.chan.restore(doc)
        assert info.value.code == code
        assert REASONS.get(name, "") in info.value.message
        assert info.value.exit_code == 3
        assert await g.wait() == 3


async def test_good_document_with_members_reordered_is_accepted() -> None:
    doc = orjson.loads(await real_checkpoint())
    shuffled = {k: doc[k] for k in reversed(list(doc))}
    shuffled["vars"] = {k: dict(reversed(list(v.items()))) for k, v in doc["vars"].items()}
    async with spawn("counter") as g:
        await g.chan.restore(orjson.dumps(shuffled))
        again = orjson.loads(await g.chan.checkpoint(1000))
    assert again == doc


async def test_oversized_frame_is_refused() -> None:
    async with spawn("counter") as g:
        g.chan._writer.write(struct.pack("<IB", 16 * 1024 * 1024 + 1, FrameType.RESTORE))
        await g.chan.drain()
        await asyncio.wait_for(g.chan.wait_exited(), 10)
        kinds = [(frame.type, frame.json()) for frame in g.events]
        assert kinds[0][0] is FrameType.ERROR and kinds[0][1]["code"] == "bad_frame"
        assert kinds[-1] == (FrameType.EXITED, {"code": 2, "reason": "bad_frame"})
        assert await g.wait() == 2


async def test_unknown_frame_type_and_out_of_place_frames() -> None:
    async with spawn("counter") as g:
        g.chan._writer.write(struct.pack("<IB", 3, 0x7F) + b"{}")
        await g.chan.drain()
        assert await g.wait() == 2
    async with spawn("counter") as g:
        g.chan.send_input("a", 1, {})  # INPUT before START
        await g.chan.drain()
        assert await g.wait() == 2
    async with spawn("counter") as g:
        await g.chan.start({})
        with pytest.raises(GuestError) as info:
            await g.chan.start({})
        assert info.value.code == "unexpected_frame"
