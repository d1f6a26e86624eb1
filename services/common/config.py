"""One TOML file configures the whole stack; environment variables override single keys.

Resolution order (later wins): built-in defaults → the TOML file → ``FERRY_<SECTION>__<KEY>``
environment variables. The file is, in order of preference: the explicit path, ``$FERRY_CONFIG``,
``.ferry/ferry.toml`` (written by ``ferry up`` with the ports it chose). Every value is type-checked
against its default so a typo fails at start-up naming the key and where it came from.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "FERRY_"
DEFAULT_STACK_DIR = Path(".ferry")
CONFIG_FILE_NAME = "ferry.toml"
#: The file read when neither a path nor $FERRY_CONFIG names one: a user's ``ferry up`` state.
#: A caller that must not see that state (the test suite) sets this to None.
DEFAULT_CONFIG_FILE: Path | None = DEFAULT_STACK_DIR / CONFIG_FILE_NAME

DEFAULTS: dict[str, dict[str, Any]] = {
    "stack": {
        "dir": str(DEFAULT_STACK_DIR),
        "host": "127.0.0.1",
        "nodes": ["edge-a", "edge-b"],
        # Changes per snapshot of `ferry up`'s Mosquitto (1 = after every change; README
        # "Broker durability": what each costs and what a kill -9 of the broker can lose).
        "broker_autosave": 100,
        # `ferry up` serves MQTT over TLS and S3 over https from a local CA under `dir`,
        # requires a client certificate (its login) of every component and applies the
        # production ACL (`ferry up --insecure`: plaintext and anonymous).
        "tls": True,
    },
    "broker": {
        "host": "127.0.0.1",
        "port": 1883,
        "keepalive": 30,
        "request_timeout": 10.0,
        "username": "",
        "password": "",
        # MQTT over TLS: verify the broker against tls_ca ("" = the system's CA store) and, for a
        # broker that requires client certificates (mutual TLS), present tls_cert + tls_key.
        "tls": False,
        "tls_ca": "",
        "tls_cert": "",
        "tls_key": "",
    },
    "s3": {
        "endpoint": "127.0.0.1:9000",
        "access_key": "test:tester",
        "secret_key": "testing",
        "region": "us-east-1",
        "bucket": "ferry",
        "secure": False,
        "ca": "",
        "timeout": 300.0,
    },
    "executor": {
        "runtimes": [],  # every registered runtime (services/executor/runtimes/__init__.py)
        "accel": "auto",
        "capacity": 32,
        "heartbeat_interval": 5.0,
        "status_interval": 30.0,
        "cache_dir": "",
        "microvm_memory_mb": 64,
        "checkpoint_interval": 1.0,
        "checkpoint_inputs": 4000,
        "max_input_bytes": 1048576,
        "pause_timeout": 60.0,
        "checkpoint_key_file": "",
        "allow_unsealed_checkpoints": False,
    },
    "scheduler": {
        "max_parallel_per_node": 4,
        "phase_timeout": 30.0,
        "mobility_hysteresis": 2.0,
        "recovery_grace": 3.0,
    },
    "statestore": {
        "database": "",
        "keep_checkpoints": 3,
        "checkpoint_grace": 60.0,
        "stopped_grace": 3600.0,
        "migration_retention": 7 * 86400.0,
        "collect_interval": 60.0,
    },
    "metrics": {
        "host": "127.0.0.1",
        "statestore_port": 0,
        "scheduler_port": 0,
        "executor_port": 0,
    },
}


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the key and its source."""


@dataclass(frozen=True)
class BrokerConfig:
    host: str
    port: int
    keepalive: int
    request_timeout: float
    #: The broker login of this process (empty: anonymous, as on the local stack).
    username: str
    password: str
    tls: bool = False
    tls_ca: str = ""  # CA bundle (PEM) the broker's certificate must chain to; "" = system's
    tls_cert: str = ""  # this process's client certificate (PEM), for mutual TLS
    tls_key: str = ""  # its private key (PEM)


@dataclass(frozen=True)
class S3Config:
    endpoint: str
    access_key: str
    secret_key: str
    region: str
    bucket: str
    secure: bool
    timeout: float
    ca: str = ""  # CA bundle (PEM) verifying the https endpoint; "" = the system's


@dataclass(frozen=True)
class StackConfig:
    dir: Path
    host: str
    nodes: list[str]
    broker_autosave: int = 100
    tls: bool = True


@dataclass(frozen=True)
class ExecutorConfig:
    runtimes: list[str]
    accel: str
    capacity: int
    heartbeat_interval: float
    #: s between full node statuses; in between only each instance's changes are published.
    status_interval: float
    cache_dir: str
    microvm_memory_mb: int
    #: s between durable checkpoints of a serving app-level instance (0: none; inputs are then
    #: acknowledged as soon as their outputs are out, and a crash loses the state).
    checkpoint_interval: float
    #: Also checkpoint once this many inputs wait for one (bounds the unacknowledged window).
    checkpoint_inputs: int
    #: Largest input (bytes on the wire) forwarded to a guest; larger ones are dead-lettered.
    max_input_bytes: int
    #: s a source paused for a migration waits for the hand-over before it serves again.
    pause_timeout: float
    checkpoint_key_file: str  # checkpoint_blob.Keyring file; "" = checkpoints are not sealed
    allow_unsealed_checkpoints: bool  # with a key file: still restore blobs written without one


@dataclass(frozen=True)
class SchedulerConfig:
    max_parallel_per_node: int
    phase_timeout: float
    mobility_hysteresis: float
    #: s a node may stay offline (or an instance lost) before its services are recovered.
    recovery_grace: float


@dataclass(frozen=True)
class StatestoreConfig:
    database: str
    #: Checkpoints kept per service (at least 1: the latest is never collected), plus any that an
    #: open migration names.
    keep_checkpoints: int = 3
    #: s a collected checkpoint's blob stays in S3, so a reader that just looked it up can fetch it.
    checkpoint_grace: float = 60.0
    #: s after a service is stopped or deleted before its checkpoints go (and a stopped one's
    #: record and retained state).
    stopped_grace: float = 3600.0
    #: s finished migrations (and their events) are kept.
    migration_retention: float = 7 * 86400.0
    #: s between retention sweeps (blob deletions also run right after a checkpoint is recorded).
    collect_interval: float = 60.0


@dataclass(frozen=True)
class MetricsConfig:
    """Where each component serves Prometheus ``/metrics`` (port 0: not served). Several
    executors on one host take ``--metrics-port`` each (``ferry up`` picks free ones)."""

    host: str = "127.0.0.1"
    statestore_port: int = 0
    scheduler_port: int = 0
    executor_port: int = 0


@dataclass(frozen=True)
class FerryConfig:
    """The whole stack's configuration; ``source`` is the file it came from, if any."""

    stack: StackConfig
    broker: BrokerConfig
    s3: S3Config
    executor: ExecutorConfig
    scheduler: SchedulerConfig
    statestore: StatestoreConfig
    source: Path | None = None
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def to_toml(self) -> str:
        """Render as TOML so ``ferry up`` can hand its resolved config to every child process."""
        sections = {
            "stack": {**self.stack.__dict__, "dir": str(self.stack.dir)},
            "broker": self.broker.__dict__,
            "s3": self.s3.__dict__,
            "executor": self.executor.__dict__,
            "scheduler": self.scheduler.__dict__,
            "statestore": self.statestore.__dict__,
            "metrics": self.metrics.__dict__,
        }
        lines: list[str] = []
        for name, values in sections.items():
            lines.append(f"[{name}]")
            lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
            lines.append("")
        return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def find_config_file(explicit: Path | None, env: Mapping[str, str]) -> Path | None:
    """The config file to read, or None to run on defaults and environment only."""
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(f"config file {explicit} does not exist")
        return explicit
    if env.get("FERRY_CONFIG"):
        path = Path(env["FERRY_CONFIG"])
        if not path.is_file():
            raise ConfigError(f"FERRY_CONFIG points to {path}, which does not exist")
        return path
    default = DEFAULT_CONFIG_FILE
    return default if default is not None and default.is_file() else None


def load_config(path: Path | None = None, env: Mapping[str, str] | None = None) -> FerryConfig:
    """Load and validate the configuration (see the module docstring for the order)."""
    env = os.environ if env is None else env
    source = find_config_file(path, env)
    merged = {section: dict(values) for section, values in DEFAULTS.items()}
    origins: dict[tuple[str, str], str] = {}
    if source is not None:
        try:
            from_file = tomllib.loads(source.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
        for section, values in from_file.items():
            if section not in DEFAULTS or not isinstance(values, dict):
                raise ConfigError(f"{source}: unknown section [{section}]")
            for key, value in values.items():
                if key not in DEFAULTS[section]:
                    raise ConfigError(f"{source}: unknown key {section}.{key}")
                merged[section][key] = value
                origins[(section, key)] = str(source)
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        if section not in DEFAULTS or key not in DEFAULTS[section]:
            raise ConfigError(f"environment variable {name} names no config key")
        merged[section][key] = _parse_env(raw, DEFAULTS[section][key], name)
        origins[(section, key)] = f"environment variable {name}"
    for section, values in merged.items():
        for key, value in values.items():
            _check_type(section, key, value, origins.get((section, key), "defaults"))
    return FerryConfig(
        stack=StackConfig(
            dir=Path(merged["stack"]["dir"]),
            host=merged["stack"]["host"],
            nodes=list(merged["stack"]["nodes"]),
            broker_autosave=merged["stack"]["broker_autosave"],
            tls=merged["stack"]["tls"],
        ),
        broker=BrokerConfig(**merged["broker"]),
        s3=S3Config(**merged["s3"]),
        executor=ExecutorConfig(**merged["executor"]),
        scheduler=SchedulerConfig(**merged["scheduler"]),
        statestore=StatestoreConfig(**merged["statestore"]),
        source=source,
        metrics=MetricsConfig(**merged["metrics"]),
    )


def _parse_env(raw: str, default: Any, name: str) -> Any:
    if isinstance(default, bool):
        if raw.lower() in {"1", "true", "yes", "on"}:
            return True
        if raw.lower() in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{name}={raw!r}: expected true or false")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: expected an integer") from None
    if isinstance(default, float):
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: expected a number") from None
    if isinstance(default, list):
        return [item.strip() for item in raw.split(",") if item.strip()]
    return raw


def _check_type(section: str, key: str, value: Any, origin: str) -> None:
    default = DEFAULTS[section][key]
    expected: type | tuple[type, ...] = type(default)
    if isinstance(default, float):
        expected = (int, float)
    ok = isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool)
    if isinstance(default, list) and ok:
        ok = all(isinstance(item, str) for item in value)
    if not ok:
        raise ConfigError(
            f"{section}.{key} (from {origin}): expected {type(default).__name__}, got {value!r}"
        )
    if isinstance(default, int) and not isinstance(default, bool) and value < 0:
        raise ConfigError(f"{section}.{key} (from {origin}): must not be negative, got {value}")
