"""Thousands of random and mutated documents: the parser never crashes, leaks out of
bounds (ASan/UBSan build), or hangs; accepted documents rewrite to a fixpoint."""

from __future__ import annotations

import asyncio
import json
import random
import struct
import subprocess

import orjson
from conftest import REPO, UNIKERNEL, spawn, to_format_v1

from services.executor.channel import GuestError

FUZZ_BIN = UNIKERNEL / "build" / "tests" / "fuzz_parser"


async def seed_documents() -> list[bytes]:
    schema = json.loads((REPO / "schemas" / "checkpoint.schema.json").read_text())
    docs = [orjson.dumps(e) for e in schema["examples"]]
    apps = (("counter", {}), ("aggregator", {"window": 5}), ("procedural", {"rounds": 3}))
    for app, params in apps:
        async with spawn(app) as g:
            await g.chan.start(params)
            if g.hello["mode"] == "event":
                for seq in range(1, 12):
                    g.chan.send_input("s", seq, {"value": seq / 3, "sensor": f"x{seq % 2}"})
            else:
                await asyncio.sleep(0.01)
            doc = await g.chan.checkpoint(99)
            docs += [doc, to_format_v1(doc)]  # the current and the previous format
    return docs


TOKENS = [
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b'"',
    b"\\",
    b"\\u",
    b"\\ud800",
    b"null",
    b"true",
    b"-",
    b"0",
    b"1e999",
    b"9223372036854775808",
    b'"type"',
    b'"bits"',
    b'"value"',
    b'"base64"',
    b'"AAAAAAAA+D8="',
    b"==",
    b"/",
    b'"format_version":1',
    b'"format_version":2',
    b'"int64_list"',
    b'"float64_list"',
    b"\x00",
    b"\xff",
    b"\xc3\xa9",
    b" ",
]


def mutate(rng: random.Random, doc: bytes, pool: list[bytes]) -> bytes:
    data = bytearray(doc)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if not data:
            data = bytearray(rng.choice(pool))
        pos = rng.randrange(len(data))
        if op == 0:  # bit flip
            data[pos] ^= 1 << rng.randrange(8)
        elif op == 1:  # truncate
            del data[pos:]
        elif op == 2:  # splice with another document
            other = rng.choice(pool)
            cut = rng.randrange(len(other))
            data = data[:pos] + other[cut:]
        elif op == 3:  # insert a token
            data[pos:pos] = rng.choice(TOKENS)
        elif op == 4:  # delete a range
            del data[pos : pos + rng.randint(1, 16)]
        else:  # duplicate a range
            end = min(len(data), pos + rng.randint(1, 64))
            data[pos:pos] = data[pos:end]
    return bytes(data)


def random_json(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(7 if depth < 6 else 4)
    if kind == 0:
        return rng.randint(-(2**63), 2**63 - 1)
    if kind == 1:
        return rng.choice(["", "a", "int64", "float64", "é", "\u0000", "x" * 300])
    if kind == 2:
        return rng.choice([True, False, None])
    if kind == 3:
        return rng.uniform(-1e300, 1e300)
    if kind in (4, 5):
        return {
            rng.choice(["type", "value", "bits", "vars", "app", "k"]) + str(i): random_json(
                rng, depth + 1
            )
            for i in range(rng.randrange(4))
        }
    return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]


async def test_fuzz_parser() -> None:
    await asyncio.to_thread(
        subprocess.run, ["make", "-C", str(UNIKERNEL), "fuzz"], check=True, capture_output=True
    )
    rng = random.Random(20241124)
    pool = await seed_documents()
    cases = list(pool)
    cases += [mutate(rng, rng.choice(pool), pool) for _ in range(4000)]
    cases += [orjson.dumps(random_json(rng)) for _ in range(500)]
    cases += [bytes(rng.randrange(256) for _ in range(rng.randrange(64))) for _ in range(300)]
    cases += [b"[" * 5000, b'{"a":' * 5000, b'"' + b"\\" * 999, b"-", b"1e", b"0.", b"--1"]
    stream = b"".join(struct.pack("<I", len(c)) + c for c in cases)
    proc = await asyncio.to_thread(
        subprocess.run, [str(FUZZ_BIN)], input=stream, capture_output=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-4000:]
    accepted = int(proc.stdout.split(b"accepted=")[1].split()[0])
    rejected = int(proc.stdout.split(b"rejected=")[1].split()[0])
    assert accepted >= len(pool)  # the seeds themselves parse
    assert accepted + rejected == 2 * len(cases)


async def test_fuzz_through_restore() -> None:
    """A sample of mutated documents through the real guest: READY, or ERROR + exit 3."""
    rng = random.Random(7)
    pool = await seed_documents()
    counter_docs = [d for d in pool if b'"name":"counter"' in d]
    for _ in range(40):
        doc = mutate(rng, rng.choice(counter_docs), counter_docs)
        async with spawn("counter") as g:
            try:
                await asyncio.wait_for(g.chan.restore(doc), 10)
            except GuestError as exc:
                assert exc.exit_code == 3
                assert await g.wait() == 3
            else:
                await g.chan.checkpoint(1)
