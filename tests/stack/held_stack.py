"""Not collected by the suite: ``test_stack_hygiene.py`` runs it as a test run of its own (the
suite's conftest, the session ``infra`` stack), then kills that run from outside."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from services.common.config import FerryConfig


async def test_hold_the_stack(infra: FerryConfig) -> None:
    # Written whole, then renamed: the watcher reads it as soon as it exists (an empty file
    # seen between create and write made it read no stack at all).
    out = Path(os.environ["FERRY_HELD_STACK_OUT"])
    partial = out.with_name(out.name + ".partial")
    partial.write_text(str(infra.stack.dir))
    partial.replace(out)
    await asyncio.sleep(600)
