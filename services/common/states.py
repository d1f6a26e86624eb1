"""The lifecycle words of the wire, as enums: a migration's phases, a service's status, an
instance's state. ``StrEnum`` members are the strings the schemas list (``tests/test_states.py``
checks both agree), so they compare equal to, and serialise as, the wire's values."""

from __future__ import annotations

from enum import StrEnum


class Phase(StrEnum):
    """migration-event.schema.json ``phase``: see services/scheduler/migration.py for the flows."""

    PLANNED = "planned"
    QUEUED = "queued"
    TARGET_READY = "target_ready"
    SOURCE_PAUSED = "source_paused"
    CHECKPOINT_STORED = "checkpoint_stored"
    TARGET_SERVING = "target_serving"
    SOURCE_STOPPED = "source_stopped"
    COMMITTED = "committed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


#: A migration has ended with one of these.
FINAL_PHASES = frozenset({Phase.COMMITTED, Phase.ROLLED_BACK, Phase.FAILED})


class ServiceStatus(StrEnum):
    """service-state.schema.json ``status``: where a service is in its life."""

    DEPLOYING = "deploying"
    SERVING = "serving"
    MIGRATING = "migrating"
    RECOVERING = "recovering"
    SUSPENDED = "suspended"
    STOPPED = "stopped"
    FAILED = "failed"


class InstanceState(StrEnum):
    """node-status.schema.json ``instances[].state``: one instance on one node."""

    BOOTING = "booting"
    WAITING = "waiting"
    SERVING = "serving"
    PAUSED = "paused"
    DETACHED = "detached"
    STOPPED = "stopped"
    FAILED = "failed"
    LOST = "lost"
