"""The commands, requests and replies on the wire, as types a reader (and mypy) can follow.

One ``TypedDict`` per command shape of ``executor-command.schema.json``,
``scheduler-command.schema.json`` and ``statestore-request.schema.json``, and one per reply an
executor gives: the schemas stay the one source of truth (``tests/test_messages.py`` checks
every type here against them: its literal names, its required and optional keys), and the
handlers of each component take and return these types. The bus validates every payload
against its schema before a handler sees it, so a handler may take the type it is dispatched
for at face value.

Records the statestore keeps (a service, a checkpoint, a migration) stay documents
(``dict[str, Any]``) checked by their own schemas (``service-state.schema.json``, the
``$defs`` of ``statestore-request.schema.json``): they are spread, merged and stored whole.

Not ``from __future__ import annotations`` here: a ``TypedDict`` reads ``NotRequired`` from its
evaluated annotations (its ``__required_keys__``), which that import would leave as strings.
"""

from typing import Any, Literal, NotRequired, TypedDict

# -- shared shapes ------------------------------------------------------------------------------


class BlobRefDoc(TypedDict):
    """``common.schema.json#/$defs/blob_ref``: where a blob lives and how to check it."""

    bucket: str
    key: str
    sha256: str
    size: int


class Expect(TypedDict, total=False):
    """A put_service compare-and-set: what the stored record must still say."""

    instance: str | None
    status: str
    epoch: int


class Claim(TypedDict):
    """A restore's (or a fresh recovery's) claim: the commit the target makes itself."""

    record: dict[str, Any]
    expect: Expect


# -- executor commands (executor-command.schema.json) -------------------------------------------


class StartCommand(TypedDict):
    """Boot an instance: run it now (``fresh``) or wait for a checkpoint (``wait``)."""

    command: Literal["start"]
    request_id: str
    service: str
    instance: str
    app: str
    runtime: str
    image: BlobRefDoc
    mode: Literal["fresh", "wait"]
    params: NotRequired[dict[str, Any]]
    migration: NotRequired[str]
    claim: NotRequired[Claim]


class CheckpointCommand(TypedDict):
    """``checkpoint``: capture for a move (pauses); ``checkpoint_now``: a fresh durable one."""

    command: Literal["checkpoint", "checkpoint_now"]
    request_id: str
    service: str
    instance: str
    migration: NotRequired[str]
    stop_after: NotRequired[bool]


class RestoreCommand(TypedDict):
    """Restore a waiting instance from ``checkpoint``, claim the service, serve."""

    command: Literal["restore"]
    request_id: str
    service: str
    instance: str
    checkpoint: BlobRefDoc
    migration: NotRequired[str]
    claim: NotRequired[Claim]


class InstanceCommand(TypedDict):
    """Resume a paused instance, or stop one."""

    command: Literal["resume", "stop"]
    request_id: str
    service: str
    instance: str
    migration: NotRequired[str]


class StatusCommand(TypedDict):
    """Ask for the node's full status now."""

    command: Literal["status"]
    request_id: str


ExecutorCommand = (
    StartCommand | CheckpointCommand | RestoreCommand | InstanceCommand | StatusCommand
)


# -- executor replies ---------------------------------------------------------------------------


class StartTimings(TypedDict):
    image_ms: float
    boot_ms: float


class StartReply(TypedDict):
    state: str
    instance: str
    claimed: NotRequired[bool]
    timings: NotRequired[StartTimings]


class CheckpointTimings(TypedDict):
    drain_ms: float
    checkpoint_ms: float
    upload_ms: float


class CheckpointReply(TypedDict):
    """A move's capture is stored and every output of what it covers is out."""

    checkpoint: BlobRefDoc
    watermark: dict[str, int]
    paused_at: float
    stored_at: float
    timings: CheckpointTimings


class CheckpointNowReply(TypedDict):
    checkpoint: BlobRefDoc
    instance: str
    taken_at: float


class RestoreTimings(TypedDict):
    fetch_ms: float
    restore_ms: float
    attach_ms: float


class RestoreReply(TypedDict):
    """The target serves: input flowed again at ``resumed_at`` (ms since the epoch)."""

    state: str
    resumed_at: float
    claimed: bool
    bytes: int
    timings: RestoreTimings


class ResumeReply(TypedDict):
    state: str
    resumed_at: float


class StopReply(TypedDict):
    state: str
    applied: NotRequired[int]
    already: NotRequired[bool]


# -- scheduler commands (scheduler-command.schema.json) -----------------------------------------


class DeployCommand(TypedDict):
    command: Literal["deploy"]
    service: str
    app: str
    node: str
    runtime: NotRequired[str]
    params: NotRequired[dict[str, Any]]
    device: NotRequired[str]


class MoveCommand(TypedDict):
    """Move a serving service to ``node``, or resume a suspended one there."""

    command: Literal["migrate", "resume"]
    service: str
    node: str


class ServiceCommand(TypedDict):
    """A command about one service: where it goes, if anywhere, is the scheduler's choice."""

    command: Literal["stop", "suspend", "rm", "upgrade", "checkpoint_now"]
    service: str
    node: NotRequired[str]
    version: NotRequired[str]
    purge: NotRequired[bool]


class BindCommand(TypedDict):
    command: Literal["bind"]
    service: str
    device: str


class NodeCommand(TypedDict):
    command: Literal["cordon", "uncordon", "drain"]
    node: str
    reason: NotRequired[str]


SchedulerCommand = DeployCommand | MoveCommand | ServiceCommand | BindCommand | NodeCommand


# -- scheduler replies (what the operator's CLI reads) -------------------------------------------


class Versions(TypedDict, total=False):
    """An upgrade's app versions (absent for every other kind of move)."""

    from_version: str | None
    to_version: str | None


class MigrationStarted(Versions):
    """A migrate, suspend, resume, upgrade or recovery was planned and runs in the background."""

    migration: str
    service: str
    kind: str


class DeployReply(StartReply):
    service: str
    node: str


class Purged(TypedDict, total=False):
    """What ``purge`` removed at once (stop and rm)."""

    purged: bool
    checkpoints: int


class StopServiceReply(Purged):
    service: str
    status: str


class RemoveReply(Purged):
    service: str
    removed: bool


class CheckpointTakenReply(CheckpointNowReply):
    service: str
    node: str


class BindReply(TypedDict):
    service: str
    device: str


class CordonReply(TypedDict):
    node: str
    cordoned: bool


class DrainStarted(MigrationStarted):
    target: str


class DrainRefusal(TypedDict):
    service: str
    error: str


class DrainReply(CordonReply):
    """The migrations a drain started (each then runs like any) and what it could not move."""

    migrations: list[DrainStarted]
    refused: list[DrainRefusal]


# -- statestore requests (statestore-request.schema.json) ---------------------------------------


class ListRequest(TypedDict):
    """Everything of one kind, newest first (``service`` narrows list_migrations)."""

    op: Literal["list_nodes", "list_services", "list_migrations", "open_migrations"]
    service: NotRequired[str]
    limit: NotRequired[int]


class ServiceRequest(TypedDict):
    """A question about (or the removal of) one service."""

    op: Literal["get_service", "delete_service", "latest_checkpoint", "list_checkpoints"]
    service: str
    purge: NotRequired[bool]
    limit: NotRequired[int]


class RecordRequest(TypedDict):
    """Store a record: a service (compare-and-set with ``expect``), a checkpoint, a migration."""

    op: Literal["put_service", "record_checkpoint", "put_migration"]
    record: dict[str, Any]
    expect: NotRequired[Expect]
    service: NotRequired[str]
    service_record: NotRequired[dict[str, Any]]


class MigrationRequest(TypedDict):
    op: Literal["get_migration"]
    migration: str


StatestoreRequest = ListRequest | ServiceRequest | RecordRequest | MigrationRequest
