"""The statestore: Ferry's memory of nodes, services, checkpoints and migrations (SQLite + MQTT)."""

from services.statestore.service import StatestoreService

__all__ = ["StatestoreService"]
