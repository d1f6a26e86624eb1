"""Every MQTT topic Ferry uses, built in one place (each must appear in schemas/asyncapi.yaml)."""

from __future__ import annotations

PREFIX = "ferry/v1"
ERRORS = f"{PREFIX}/errors"
SCHEDULER_COMMANDS = f"{PREFIX}/scheduler/commands"
STATESTORE_REQUESTS = f"{PREFIX}/statestore/requests"  # reads and writes, components only
STATESTORE_QUERIES = f"{PREFIX}/statestore/queries"  # reads only: what the operator may send
ALL = f"{PREFIX}/#"


def node_status(node: str) -> str:
    return f"{PREFIX}/nodes/{node}/status"


def node_changes(node: str) -> str:
    """Each instance's state change between two full statuses (not retained)."""
    return f"{PREFIX}/nodes/{node}/changes"


def node_heartbeat(node: str) -> str:
    return f"{PREFIX}/nodes/{node}/heartbeat"


def node_commands(node: str) -> str:
    return f"{PREFIX}/nodes/{node}/commands"


def node_cordon(node: str) -> str:
    """Retained by the scheduler: whether new placements are kept off the node."""
    return f"{PREFIX}/nodes/{node}/cordon"


def component_status(component: str) -> str:
    return f"{PREFIX}/components/{component}/status"


def replies(login: str, client_id: str) -> str:
    """Keyed by broker login first: the ACL (``%u``) lets only that login read them."""
    return f"{PREFIX}/replies/{login}/{client_id}"


def app_input(service: str) -> str:
    return f"{PREFIX}/apps/{service}/in"


def app_input_from(service: str, producer: str) -> str:
    """One producer's own input topic: the device ACL lets a login write only the one named
    after it (``%u``), and the executor applies what arrives there as that producer's only."""
    return f"{PREFIX}/apps/{service}/in/{producer}"


def producer_of_topic(topic: str) -> str | None:
    """The producer an input topic names (``.../in/<producer>``), None for the shared ``.../in``."""
    head, _, producer = topic.rpartition("/")
    return producer if head.endswith("/in") and head.startswith(f"{PREFIX}/apps/") else None


def app_output(service: str) -> str:
    return f"{PREFIX}/apps/{service}/out"


def app_dead_letters(service: str) -> str:
    return f"{PREFIX}/apps/{service}/dead"


def mobility(device: str) -> str:
    return f"{PREFIX}/mobility/{device}"


def migration_events(migration_id: str) -> str:
    return f"{PREFIX}/migrations/{migration_id}/events"


def service_state(service: str) -> str:
    return f"{PREFIX}/services/{service}/state"


# Templates as written in asyncapi.yaml; tests check each is declared there.
TEMPLATES = (
    ERRORS,
    SCHEDULER_COMMANDS,
    STATESTORE_REQUESTS,
    STATESTORE_QUERIES,
    node_status("{node}"),
    node_changes("{node}"),
    node_heartbeat("{node}"),
    node_commands("{node}"),
    node_cordon("{node}"),
    component_status("{component}"),
    replies("{login}", "{client}"),
    app_input("{service}"),
    app_input_from("{service}", "{producer}"),
    app_output("{service}"),
    app_dead_letters("{service}"),
    mobility("{device}"),
    migration_events("{migration}"),
    service_state("{service}"),
)
