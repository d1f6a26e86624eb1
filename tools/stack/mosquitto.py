"""Mosquitto: the MQTT v5 broker every Ferry service talks through."""

from __future__ import annotations

import os
import pwd
import re
from dataclasses import dataclass
from pathlib import Path

# Why these limits (README "Broker durability" has the measurements):
# - A service's persistent session must hold every input that arrives while it is migrated or
#   recovered: 1 000 000 queued messages is 200 s at 5000 inputs/s (bounded in bytes instead of
#   count would drop inputs already PUBACKed to their producer, so no byte limit).
# - In-flight: for an MQTT v5 client Mosquitto 2.0 takes the outgoing window from the client's
#   Receive Maximum (a service's input session asks for 65 535), and advertises
#   ``max_inflight_messages`` as its own Receive Maximum to producers; 0 means no limit (65 535
#   for v5 clients, unbounded for v3.1.1). An executor holding a second of input unacknowledged
#   at 5000/s needs >= 5000.
MAX_QUEUED_MESSAGES = 1_000_000
MAX_INFLIGHT_MESSAGES = 0
# Persistence: Mosquitto 2.0 saves a snapshot of its whole database (rewrite + fsync). With
# ``autosave_on_changes`` the interval counts changes (a message queued for an offline session,
# a PUBACK from a subscriber, a subscription, a retained message). A kill -9 loses what changed
# since the last snapshot (a time-based 30 s here before: every input PUBACKed in those 30 s).
# 1 (a snapshot after every main-loop pass that changed anything) leaves only the pass being
# saved (at most one input per producer connection), but costs: 160-580 QoS 1 publishes/s per
# producer connection (bench/broker_persistence.py, 5000 queued), and a service fed 2000/s
# could no longer migrate (tests/scheduler/test_crashes.py rolled back). 100, the default
# (``stack.broker_autosave``), keeps 4900-7800/s and loses at most 100 changes. Input a
# connected service holds unacknowledged is not a "change" with either.
AUTOSAVE_ON_CHANGES = True
AUTOSAVE_INTERVAL = 100


@dataclass(frozen=True)
class ListenerTLS:
    """The listener's certificate and key, and the CA its clients' certificates must chain to
    (``require_certificate``: mutual TLS, a client without one is refused in the handshake)."""

    cafile: Path
    certfile: Path
    keyfile: Path
    require_certificate: bool = True
    #: The topic ACL (``acl``) the identities are held to; None: every client may do anything.
    acl_file: Path | None = None

    def lines(self) -> str:
        # With client certificates, the certificate's CN is the client's username: an identity
        # the client cannot choose (an ACL's %u can rely on it), and the log names who connected.
        mutual = "true" if self.require_certificate else "false"
        return (
            f"cafile {self.cafile}\n"
            f"certfile {self.certfile}\n"
            f"keyfile {self.keyfile}\n"
            f"require_certificate {mutual}\n"
            f"use_identity_as_username {mutual}\n"
            + (f"acl_file {self.acl_file}\n" if self.acl_file is not None else "")
        )


#: The login of the stack's own checks (readiness round trip, clearing and watching statuses).
STACK_LOGIN = "stack"


DEPLOY_ACL = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "acl"
TEMPLATE_NODE = "edge-a"  # the deploy file's example node, whose block every node copies


def acl(nodes: list[str]) -> str:
    """deploy/mosquitto/acl (the production ACL) for ``nodes``, plus the stack's own login.

    Derived from the deploy file, so there is one ACL to keep: its ``edge-a`` block is copied
    for every node (its other example nodes dropped), and the statestore's write of edge-a's
    replies becomes one per node. Logins are certificate CNs here
    (``use_identity_as_username``): statestore, scheduler, operator, one per node (its name),
    and ``stack``. tests/stack/test_tls.py checks it is the deploy file's ACL for edge-a, edge-b.
    """
    preamble, blocks = _acl_blocks(DEPLOY_ACL.read_text())
    out = ["# Written by `ferry up` from deploy/mosquitto/acl for its nodes; rewritten on start.\n"]
    out += preamble
    template = blocks.pop(TEMPLATE_NODE)
    for user, rules in blocks.items():
        if re.fullmatch(r"edge-[a-z0-9]+", user):
            continue  # the deploy file's other example nodes
        lines = []
        for rule in rules:
            if f"/replies/{TEMPLATE_NODE}/" in rule:
                lines += [rule.replace(f"/{TEMPLATE_NODE}/", f"/{node}/") for node in nodes]
            elif not re.search(r"/replies/edge-[a-z0-9]+/", rule):
                lines.append(rule)
        out.append(_acl_block(user, lines))
    for node in nodes:
        out.append(_acl_block(node, [r.replace(TEMPLATE_NODE, node) for r in template]))
    out.append(
        _acl_block(
            STACK_LOGIN,
            [
                "topic readwrite ferry-stack/#",
                "topic readwrite ferry/v1/components/+/status",
                "topic readwrite ferry/v1/nodes/+/status",
            ],
        )
    )
    return "\n".join(out)


def _acl_blocks(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """The rules before the first ``user`` line, and each user's rules (comments dropped)."""
    preamble: list[str] = []
    blocks: dict[str, list[str]] = {}
    current: list[str] = preamble
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("user "):
            current = blocks.setdefault(line.split(None, 1)[1], [])
        else:
            current.append(line)
    return preamble, blocks


def _acl_block(user: str, rules: list[str]) -> str:
    return "".join([f"user {user}\n", *(f"{rule}\n" for rule in rules)])


def write_config(
    conf_dir: Path,
    host: str,
    port: int,
    log: Path,
    *,
    autosave_on_changes: bool = AUTOSAVE_ON_CHANGES,
    autosave_interval: int = AUTOSAVE_INTERVAL,
    tls: ListenerTLS | None = None,
) -> Path:
    """Write ``mosquitto.conf`` with persistence under ``conf_dir``; returns its path.

    The running log goes to ``log`` directly (Mosquitto flushes each line there, but
    block-buffers stdout); give it the file its stdout goes to, so start-up errors printed
    before the log is opened land in the same place. ``autosave_interval`` comes from
    ``stack.broker_autosave``; ``bench/broker_persistence.py`` measures the alternatives.
    With ``tls`` the one listener serves MQTT over TLS only (no plaintext port at all).
    """
    data = conf_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    conf = conf_dir / "mosquitto.conf"
    conf.write_text(
        "# Written by `ferry up`; rewritten on every start.\n"
        f"listener {port} {host}\n"
        + (tls.lines() if tls is not None else "")
        + "allow_anonymous true\n"
        "persistence true\n"
        f"persistence_location {data}\n"
        f"autosave_on_changes {'true' if autosave_on_changes else 'false'}\n"
        f"autosave_interval {autosave_interval}\n"
        f"max_queued_messages {MAX_QUEUED_MESSAGES}\n"
        "max_queued_bytes 0\n"
        f"max_inflight_messages {MAX_INFLIGHT_MESSAGES}\n"
        "set_tcp_nodelay true\n"
        f"log_dest file {log}\n"
        "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
        "log_timestamp_format %Y-%m-%dT%H:%M:%S\n"
        # Run as ourselves: as root, Mosquitto would otherwise switch to user `mosquitto`,
        # which cannot write the persistence directory we just created.
        f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
    )
    return conf


def argv(binary: str, conf: Path) -> list[str]:
    return [binary, "-c", str(conf)]
