"""``ferry watch``: a live, readable stream of Ferry's topics for operators."""

from __future__ import annotations

import time
import uuid
from typing import Any

from rich.markup import escape

from services.common import topics
from services.common.bus import Bus
from services.common.config import FerryConfig
from tools.cli.operator import CONNECT_TIMEOUT
from tools.cli.output import console, format_detail

STYLE = {"migrations": "bold cyan", "errors": "bold red", "nodes": "green", "apps": "dim"}


def summarize(topic: str, payload: dict[str, Any]) -> str:
    """One line that says what a message means, not everything it holds."""
    kind = topic.split("/")[2] if topic.count("/") >= 2 else topic
    if kind == "migrations":
        detail = payload.get("detail") or {}
        shown = format_detail(detail)
        route = f"{payload.get('source') or '-'} → {payload.get('target') or '-'}"
        return f"{payload['service']} {payload.get('kind', '')} {route}: {payload['phase']} {shown}"
    if kind == "nodes" and topic.endswith("/status"):
        names = [i["service"] + ":" + i["state"] for i in payload.get("instances", [])]
        return f"{payload.get('node')} {payload.get('status')} [{', '.join(names)}]"
    if kind == "nodes" and topic.endswith("/changes"):
        instance = payload.get("instance") or {}
        reason = f" ({instance['reason']})" if instance.get("reason") else ""
        return f"{payload.get('node')} {instance.get('instance')}: {instance.get('state')}{reason}"
    if kind == "errors":
        return f"{payload.get('source')}: {payload.get('reason')} (on {payload.get('topic')})"
    if kind == "apps":
        return f"{payload.get('producer')}#{payload.get('seq')} {payload.get('data')}"
    return str(payload)[:160]


async def watch(config: FerryConfig, topic_filter: str = "#") -> None:
    """Print every message under ferry/v1/<filter> until interrupted."""
    async with Bus(
        config.broker,
        f"ferry-watch-{uuid.uuid4().hex[:8]}",
        validate_inbound=False,
        connect_timeout=CONNECT_TIMEOUT,
    ) as bus:
        await bus.subscribe(f"{topics.PREFIX}/{topic_filter}", qos=0)
        async for message in bus.messages():
            kind = message.topic.split("/")[2] if message.topic.count("/") >= 2 else ""
            short = message.topic.removeprefix(topics.PREFIX + "/")
            stamp = time.strftime("%H:%M:%S")
            line = escape(summarize(message.topic, message.payload))  # guest text is not markup
            console.print(f"{stamp} [{STYLE.get(kind, 'white')}]{escape(short):<40}[/] {line}")
