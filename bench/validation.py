"""``python -m bench.validation``: per-call cost of validating one payload against its topic.

Times ``services.common.contract.validate`` (the compiled validators every bus send and receive
goes through) next to the spec-complete ``jsonschema`` Draft 2020-12 validator it replaced, on the
payloads that dominate control-plane traffic: a node status with 1 and with 50 instances, a
``record_checkpoint`` request and an app input. Prints µs per call, median of several rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from services.common import contract, topics


def reference_validator(schema_file: str) -> Draft202012Validator:
    """What contract.py used before: jsonschema with a ``referencing`` registry of schemas/."""
    registry: Registry = Registry().with_resources(
        (name, Resource.from_contents(doc)) for name, doc in contract.schema_documents().items()
    )
    return Draft202012Validator(contract.schema_documents()[schema_file], registry=registry)


def node_status(instances: int) -> dict[str, Any]:
    return {
        "node": "edge-a", "status": "online", "time": 1764000000000, "version": "0.1.0",
        "runtimes": ["unix", "microvm"], "capacity": 128,
        "instances": [
            {"service": f"svc-{i}", "instance": f"svc-{i}.3", "app": "counter",
             "runtime": "unix", "state": "serving", "applied": 120 + i}
            for i in range(instances)
        ],
    }  # fmt: skip


CHECKPOINT_REQUEST = {
    "op": "record_checkpoint",
    "record": {
        "service": "counter-1", "bucket": "ferry", "key": "checkpoints/counter-1/m-1/1.json",
        "sha256": "0" * 64, "size": 338, "watermark": {"dev-1": 42}, "time": 1764000000000,
        "migration": "m-1",
    },
}  # fmt: skip
APP_INPUT = {"producer": "dev-1", "seq": 42, "data": {"value": 21.5}}

CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("node status, 1 instance", topics.node_status("edge-a"), node_status(1)),
    ("node status, 50 instances", topics.node_status("edge-a"), node_status(50)),
    ("record_checkpoint request", topics.STATESTORE_REQUESTS, CHECKPOINT_REQUEST),
    ("app input", topics.app_input("counter-1"), APP_INPUT),
]


def per_call_us(call: Callable[[], object], budget_s: float, rounds: int = 5) -> float:
    """Median over ``rounds`` of the mean µs per call, each round about budget_s / rounds long."""
    call()  # compile / warm caches outside the timing
    start = time.perf_counter()
    n = 0
    while time.perf_counter() - start < 0.02:
        call()
        n += 1
    per_round = max(1, int(n / 0.02 * budget_s / rounds))
    results = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(per_round):
            call()
        results.append((time.perf_counter() - t0) / per_round * 1e6)
    return statistics.median(results)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="time budget per case and way")
    args = parser.parse_args(argv)
    print(f"{'payload':28} {'jsonschema µs':>14} {'compiled µs':>12} {'speed-up':>9}")
    for label, topic, payload in CASES:
        contract.validate(topic, payload)  # the payload is valid under both
        reference = reference_validator(contract.channel_for(topic).schema_file)
        assert reference.is_valid(payload), label

        def old_validate(
            r: Draft202012Validator = reference, t: str = topic, p: dict[str, Any] = payload
        ) -> None:
            """contract.validate as it was: scan the channels, then the first jsonschema error."""
            contract.channel_for.__wrapped__(t)
            next(iter(r.iter_errors(p)), None)

        before = per_call_us(old_validate, args.seconds)
        after = per_call_us(lambda t=topic, p=payload: contract.validate(t, p), args.seconds)
        print(f"{label:28} {before:14.1f} {after:12.1f} {before / after:8.0f}x")


if __name__ == "__main__":
    main()
