"""What the scheduler knows of each node's health: its own view of each node, from the node's
full status (retained, and its will) and the instance changes that follow it.

Why its own module: a migration must not sit out a whole phase timeout when the node it waits
for is already known to be gone. The executor's last will (``status: offline``) arrives as node
status, its own report of a guest that died (instance ``failed``/``lost``) as a node change (or
in a full status); ``gone`` turns them into something a phase can race against.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from services.common import node_view

DEAD_STATES = frozenset({"failed", "lost"})


class Liveness:
    """Latest status per node, and waiters for a node (or one of its instances) to be lost."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}
        self._waiters: defaultdict[tuple[str, str | None], list[asyncio.Future[str]]] = defaultdict(
            list
        )

    def update(self, status: dict[str, Any]) -> bool:
        """Take a full status (or the will) in; False if it is older than the view."""
        node = status["node"]
        merged = node_view.merge_status(self.nodes.get(node), status)
        if merged is None:
            return False
        self.nodes[node] = merged
        if status.get("status") != "online":
            for (waited_node, _), futures in list(self._waiters.items()):
                if waited_node == node:
                    self._resolve(futures, f"node {node} went offline")
            return True
        for instance in status.get("instances", []):
            self._dead(node, instance)
        return True

    def change(self, change: dict[str, Any]) -> bool:
        """Take one instance change in; True if changes were missed (ask for a full status)."""
        node = change["node"]
        merged, missed = node_view.apply_change(self.nodes.get(node), change)
        if merged is not None:
            self.nodes[node] = merged
        self._dead(node, change["instance"])
        return missed

    def _dead(self, node: str, instance: dict[str, Any]) -> None:
        if instance.get("state") in DEAD_STATES:
            futures = self._waiters.get((node, instance["instance"]), [])
            reason = instance.get("reason") or "its guest ended"
            self._resolve(futures, f"instance {instance['instance']} on {node}: {reason}")

    def online(self, node: str) -> bool:
        return self.nodes.get(node, {}).get("status") == "online"

    def instance_state(self, node: str, instance: str) -> str | None:
        for entry in self.nodes.get(node, {}).get("instances", []):
            if entry.get("instance") == instance:
                return str(entry.get("state"))
        return None

    async def gone(self, node: str, instance: str | None = None) -> str:
        """Return (with the reason) once ``node`` is offline or ``instance`` on it died."""
        if not self.online(node) and node in self.nodes:
            return f"node {node} is offline"
        if instance is not None and self.instance_state(node, instance) in DEAD_STATES:
            return f"instance {instance} on {node} ended"
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters[(node, instance)].append(future)
        try:
            return await future
        finally:
            waiters = self._waiters.get((node, instance))
            if waiters is not None and future in waiters:
                waiters.remove(future)
                if not waiters:
                    del self._waiters[(node, instance)]

    @staticmethod
    def _resolve(futures: list[asyncio.Future[str]], reason: str) -> None:
        for future in futures:
            if not future.done():
                future.set_result(reason)
