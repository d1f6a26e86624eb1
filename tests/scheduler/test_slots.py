"""Node slots: a plan's slots can be freed early (when its target serves) and again at the end
without ever freeing another plan's slot twice."""

from __future__ import annotations

import asyncio

import pytest

from services.scheduler.service import NodeSlots

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_an_early_release_lets_the_next_plan_in_and_the_late_one_is_harmless() -> None:
    slots = NodeSlots(per_node=1)
    first = await slots.take(["edge-b", "edge-a"])
    waiting = asyncio.ensure_future(slots.take(["edge-a", "edge-b"]))
    await asyncio.sleep(0.01)
    assert not waiting.done() and slots.would_wait(["edge-a"])
    first()  # the target serves: the commit does not hold the nodes
    second = await asyncio.wait_for(waiting, 1)
    first()  # the end of the first plan releases nothing more
    assert slots.would_wait(["edge-a"]) and slots.would_wait(["edge-b"])
    second()
    assert not slots.would_wait(["edge-a", "edge-b"])


async def test_a_cancelled_wait_gives_back_what_it_took() -> None:
    slots = NodeSlots(per_node=1)
    holder = await slots.take(["edge-b"])
    waiting = asyncio.ensure_future(slots.take(["edge-a", "edge-b"]))  # has edge-a, waits on b
    await asyncio.sleep(0.01)
    assert slots.would_wait(["edge-a"])
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not slots.would_wait(["edge-a"])
    holder()
