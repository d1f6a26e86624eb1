"""Letting go of a persistent session the next owner already took over is immediate.

Found by ``bench.drain``: a migration's target can take the input session over before the
source lets go of it (the source waits for its checkpoint's record first). The source's close
then asked the broker for a SUBACK on a connection the broker had already dropped, and waited
the full 5 s for it, holding the service's lock; the source's stop, and so the migration's
commit, waited with it. Real broker; the takeover is a blocking paho connect, so this loop's
reader cannot notice it before ``close`` starts.
"""

from __future__ import annotations

import time
import uuid

from services.common.bus import Bus
from services.common.config import FerryConfig
from tools.cli.simulate import connect_paho


async def test_closing_a_session_taken_over_does_not_wait_for_an_answer(
    infra: FerryConfig,
) -> None:
    client_id = f"ferry-svc-takeover-{uuid.uuid4().hex[:6]}"
    session = Bus(infra.broker, client_id, session_expiry=60, manual_ack=True, on_lost=print)
    await session.__aenter__()
    next_owner = connect_paho(infra.broker, client_id)  # blocks this loop until it is connected
    try:
        started = time.monotonic()
        await session.close()
        assert time.monotonic() - started < 1.0
    finally:
        next_owner.disconnect()
        next_owner.loop_stop()


async def test_closing_a_live_session_still_waits_for_the_broker_to_read_its_acks(
    infra: FerryConfig,
) -> None:
    session = Bus(infra.broker, f"ferry-svc-live-{uuid.uuid4().hex[:6]}", manual_ack=True)
    await session.__aenter__()
    client = session._client
    assert client is not None
    asked: list[str] = []
    subscribe = client.subscribe

    async def recorded(topic: str, *args: object, **kwargs: object) -> object:
        asked.append(topic)
        return await subscribe(topic, *args, **kwargs)  # type: ignore[arg-type]

    client.subscribe = recorded  # type: ignore[method-assign]
    await session.close()
    assert asked == [session.reply_topic]  # the SUBACK that proves the acks were read
