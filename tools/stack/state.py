"""``<dir>/stack.json``: what ``up`` started, so ``down`` and ``status`` work from any process.

The file is rewritten atomically after every spawn, so even an ``up`` that dies half-way leaves
a record ``down`` can clean up from. A lock file serialises ``up`` and ``down`` on one directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.stack.errors import StackError
from tools.stack.process import ProcessHandle

STATE_FILE = "stack.json"
LOCK_FILE = "stack.lock"
FORMAT_VERSION = 1


@dataclass
class StackState:
    """Ports chosen at ``up`` time, every component started (in start order), and the
    retained status topic of each Ferry service (how ``status`` asks whether it is ready)."""

    started_at: str
    ports: dict[str, int]
    components: list[ProcessHandle] = field(default_factory=list)
    status_topics: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "started_at": self.started_at,
            "ports": self.ports,
            "status_topics": self.status_topics,
            "components": [
                {
                    "name": c.name,
                    "pid": c.pid,
                    "start_ticks": c.start_ticks,
                    "started_at": c.started_at,
                    "log": str(c.log),
                    "argv": c.argv,
                }
                for c in self.components
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StackState:
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported stack.json version {data.get('version')!r}")
        return cls(
            started_at=data["started_at"],
            ports={k: int(v) for k, v in data["ports"].items()},
            components=[
                ProcessHandle(
                    name=c["name"],
                    pid=int(c["pid"]),
                    start_ticks=int(c["start_ticks"]),
                    started_at=c["started_at"],
                    log=Path(c["log"]),
                    argv=list(c["argv"]),
                )
                for c in data["components"]
            ],
            status_topics=dict(data.get("status_topics", {})),
        )


def load(stack_dir: Path) -> StackState | None:
    """The recorded state, or None when no stack was started in ``stack_dir``."""
    path = stack_dir / STATE_FILE
    try:
        return StackState.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise StackError("stack", f"{path} is unreadable ({exc}); remove it by hand") from exc


def save(stack_dir: Path, state: StackState) -> None:
    """Write the state atomically (readers never see half a file)."""
    path = stack_dir / STATE_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state.to_json(), indent=2) + "\n")
    os.replace(tmp, path)


def remove(stack_dir: Path) -> None:
    (stack_dir / STATE_FILE).unlink(missing_ok=True)


@contextlib.contextmanager
def locked(stack_dir: Path) -> Iterator[None]:
    """Hold the directory's lock, or fail at once if another ``up``/``down`` holds it."""
    stack_dir.mkdir(parents=True, exist_ok=True)
    with (stack_dir / LOCK_FILE).open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StackError(
                "stack", f"another `ferry up` or `ferry down` is running on {stack_dir}"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
