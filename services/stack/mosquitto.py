"""Mosquitto: the MQTT v5 broker every Ferry service talks through."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

# Why these limits: a service's persistent session must hold every input message that arrives
# while it is being migrated (no expiry, a large queue), while the in-flight window stays small
# enough that a slow consumer sees back-pressure instead of a flood.
MAX_QUEUED_MESSAGES = 100_000
MAX_INFLIGHT_MESSAGES = 100


def write_config(conf_dir: Path, host: str, port: int, log: Path) -> Path:
    """Write ``mosquitto.conf`` with persistence under ``conf_dir``; returns its path.

    The running log goes to ``log`` directly (Mosquitto flushes each line there, but
    block-buffers stdout); give it the file its stdout goes to, so start-up errors printed
    before the log is opened land in the same place.
    """
    data = conf_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    conf = conf_dir / "mosquitto.conf"
    conf.write_text(
        "# Written by `ferry up`; rewritten on every start.\n"
        f"listener {port} {host}\n"
        "allow_anonymous true\n"
        "persistence true\n"
        f"persistence_location {data}\n"
        "autosave_interval 30\n"
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
