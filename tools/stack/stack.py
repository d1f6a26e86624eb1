"""The local stack: memcached, Swift (S3), Mosquitto (MQTT) and the Ferry services.

``up`` starts every part as a detached process, waits until each answers a real request, and
records what it started in ``<dir>/stack.json``; ``down`` and ``status`` read that record, so
they work from any process. Infrastructure starts concurrently (the Swift proxy's ~2 s warm-up is
the critical path); the Ferry services start once S3 and MQTT answer, reading ``<dir>/ferry.toml``
which holds the ports actually chosen.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.common import checkpoint_blob, tls
from services.common import config as config_module
from services.common.config import FerryConfig
from tools.stack import memcached, mosquitto, mqtt, pki, state, swift
from tools.stack.errors import StackError
from tools.stack.ferry_services import ServiceSpec, default_services
from tools.stack.ports import free_ports, port_is_free, split_endpoint
from tools.stack.probes import Probe, Prober
from tools.stack.process import ProcessHandle, spawn_detached, stop_group, tail
from tools.stack.state import StackState

Progress = Callable[[str], None]

# Infrastructure parts in start order; everything else in stack.json is a Ferry service.
SWIFT_PARTS = ("swift-account", "swift-container", "swift-object", "swift-proxy")
INFRA_PARTS = ("memcached", *SWIFT_PARTS, "mosquitto")
# Port names in stack.json: one per listening infrastructure part.
PORT_NAMES = ("memcached", "swift-account", "swift-container", "swift-object", "s3", "broker")

POLL_INTERVAL = 0.1
#: Prometheus file_sd targets (``file_sd_configs``) of the Ferry services, written by ``up``.
METRICS_TARGETS = "prometheus-targets.json"
#: Under the stack's dir: the local CA, the server pair and a client pair per component.
TLS_DIR = "tls"
#: The client certificate of ``ferry.toml`` itself: the CLI, the simulator, the stack's checks.
OPERATOR = "operator"
#: Logins (certificate CNs) that are not nodes; a node is its own login (the ACL's user).
RESERVED_LOGINS = frozenset({"statestore", "scheduler", OPERATOR, "stack", "server", "ca"})

#: ``Stack(die_with_parent=None)`` means this; the test suite sets it so no test stack outlives
#: a killed test run.
DIE_WITH_PARENT = False


@dataclass(frozen=True)
class ComponentStatus:
    """One part of the stack as last seen: its process, and whether it answers."""

    name: str
    pid: int | None
    alive: bool
    ready: bool
    detail: str
    log: Path | None = None


@dataclass(frozen=True)
class StackInfo:
    """What ``up`` started: ``config`` is the resolved configuration (ports actually used),
    also written to ``config_path`` for the services and for later ``ferry`` commands."""

    dir: Path
    config: FerryConfig
    config_path: Path
    components: list[ComponentStatus]
    elapsed: float


@dataclass(frozen=True)
class _Part:
    """A process to start and the check that says it is ready."""

    name: str
    argv: list[str]
    probe: Prober
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)


class Stack:
    """The local stack rooted at ``config.stack.dir`` (state, configs and logs live there).

    ``services`` replaces the default Ferry services (every ``services/<svc>/__main__.py`` that
    exists); pass ``[]`` for infrastructure only. ``timeout`` bounds each part's start-up,
    ``grace`` is how long ``down`` waits after SIGTERM before SIGKILL. ``die_with_parent``
    ties every part to this process (SIGKILL when it dies however it dies): for a stack that
    must not outlive its owner, such as the test suite's, unlike ``ferry up``'s (default:
    ``DIE_WITH_PARENT``).
    """

    def __init__(
        self,
        config: FerryConfig,
        *,
        services: Sequence[ServiceSpec] | None = None,
        timeout: float = 30.0,
        grace: float = 5.0,
        die_with_parent: bool | None = None,
    ) -> None:
        self._config = config
        self._die_with_parent = DIE_WITH_PARENT if die_with_parent is None else die_with_parent
        self._dir = config.stack.dir.resolve()
        self._services = None if services is None else list(services)
        self._timeout = timeout
        self._grace = grace
        self._spawned: dict[int, ProcessHandle] = {}  # by pid: handles that can reap their child

    @property
    def dir(self) -> Path:
        return self._dir

    @property
    def config_path(self) -> Path:
        """Where ``up`` writes the resolved configuration the services are started with."""
        return self._dir / config_module.CONFIG_FILE_NAME

    @property
    def log_dir(self) -> Path:
        return self._dir / "logs"

    # ---------------------------------------------------------------- up

    async def up(self, progress: Progress | None = None) -> StackInfo:
        """Start every part and wait until each answers; returns what runs where.

        Raises StackError if the stack already runs in this directory, or naming the part that
        failed to start (with its log's last lines) after stopping everything already started.
        """
        say = progress or (lambda _message: None)
        started = time.monotonic()
        with state.locked(self._dir):
            self._refuse_if_running()
            ports = self._choose_ports()
            resolved = self._resolve(ports)
            if resolved.stack.tls:
                taken = sorted(set(resolved.stack.nodes) & RESERVED_LOGINS)
                if taken:
                    raise StackError(
                        "stack",
                        f"node name {taken[0]!r} is also a component's broker login; rename it",
                    )
                started_pki = time.monotonic()
                # Every node's login too, for executors started by others (bench.run).
                logins = [OPERATOR, mosquitto.STACK_LOGIN, *resolved.stack.nodes]
                self._pki(resolved, logins)
                say(f"tls: certificates ready in {time.monotonic() - started_pki:.2f} s")
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.config_path.write_text(resolved.to_toml())
            record = StackState(started_at=_now(), ports=ports)
            try:
                infra = await self._start_infra(resolved, ports, record, say)
                services = await self._start_services(resolved, record, say)
            except BaseException:
                say("start-up failed; stopping what was started")
                await self._stop(record.components)
                state.remove(self._dir)
                raise
        elapsed = time.monotonic() - started
        say(f"stack up in {elapsed:.1f} s")
        return StackInfo(
            dir=self._dir,
            config=resolved,
            config_path=self.config_path,
            components=[*infra, *services],
            elapsed=elapsed,
        )

    def _refuse_if_running(self) -> None:
        previous = state.load(self._dir)
        if previous is None:
            return
        running = [c for c in previous.components if self._alive(c)]
        if running:
            listed = ", ".join(f"{c.name} (pid {c.pid})" for c in running)
            raise StackError(
                "stack",
                f"already up in {self._dir}: {listed}; run `ferry down` first",
            )

    def _choose_ports(self) -> dict[str, int]:
        """Free ports for everything, except S3/broker ports the config fixes explicitly.

        A config read back from our own ``ferry.toml`` (the default file once a stack has run)
        names the ports chosen last time: those are reused when still free, so clients keep
        working across restarts, and replaced silently when not.
        """
        host = self._config.stack.host
        defaults = config_module.DEFAULTS
        ours = self._config.source is not None and (
            self._config.source.resolve() == self.config_path
        )
        requested = {
            "s3": ("swift-proxy", split_endpoint(self._config.s3.endpoint)[1], "s3.endpoint"),
            "broker": ("mosquitto", self._config.broker.port, "broker.port"),
        }
        default_ports = {
            "s3": split_endpoint(defaults["s3"]["endpoint"])[1],
            "broker": defaults["broker"]["port"],
        }
        fixed: dict[str, int] = {}
        for name, (part, port, key) in requested.items():
            if port == default_ports[name] and not ours:
                continue
            if port_is_free(host, port):
                fixed[name] = port
            elif not ours:
                raise StackError(part, f"port {host}:{port} (from {key}) is already in use")
        wanted = [name for name in PORT_NAMES if name not in fixed]
        chosen = dict(zip(wanted, free_ports(host, len(wanted)), strict=True))
        return {name: fixed.get(name) or chosen[name] for name in PORT_NAMES}

    def _pki(self, cfg: FerryConfig, clients: Sequence[str]) -> pki.LocalPKI:
        """The stack's CA, server pair and the named client pairs, made where missing."""
        return pki.ensure(self._dir / TLS_DIR, [cfg.stack.host], clients)

    def _tls_paths(self, client: str) -> tuple[str, str, str]:
        """CA, certificate and key file of ``client`` (``pki.ensure`` makes them there)."""
        pair = pki.pair(self._dir / TLS_DIR, client)
        return str(pki.ca_path(self._dir / TLS_DIR)), str(pair.cert), str(pair.key)

    def _resolve(self, ports: Mapping[str, int]) -> FerryConfig:
        """The configuration as the running stack sees it: absolute dir, chosen ports, and
        the TLS files (``stack.tls``) or plaintext everywhere."""
        cfg = self._config
        host = cfg.stack.host
        s3_host = f"[{host}]" if ":" in host else host
        executor = cfg.executor
        if not executor.checkpoint_key_file:
            # Sealed by default: a key of the stack's own, made once under its state dir.
            keys = self._dir / "checkpoint.keys"
            if not keys.exists():
                self._dir.mkdir(parents=True, exist_ok=True)
                checkpoint_blob.Keyring.create(keys)
            executor = dataclasses.replace(executor, checkpoint_key_file=str(keys))
        if cfg.stack.tls:
            ca, cert, key = self._tls_paths(OPERATOR)
            broker_tls: dict[str, Any] = {
                "tls": True,
                "tls_ca": ca,
                "tls_cert": cert,
                "tls_key": key,
                # The broker takes the username from the certificate; the bus keys its reply
                # topic by it, so it must know it too.
                "username": OPERATOR,
                "password": "",
            }
            s3_tls: dict[str, Any] = {"secure": True, "ca": ca}
        else:
            broker_tls = {"tls": False, "tls_ca": "", "tls_cert": "", "tls_key": ""}
            s3_tls = {"secure": False, "ca": ""}
        return dataclasses.replace(
            cfg,
            executor=executor,
            stack=dataclasses.replace(cfg.stack, dir=self._dir),
            broker=dataclasses.replace(cfg.broker, host=host, port=ports["broker"], **broker_tls),
            s3=dataclasses.replace(cfg.s3, endpoint=f"{s3_host}:{ports['s3']}", **s3_tls),
            source=self.config_path,
        )

    async def _start_infra(
        self, cfg: FerryConfig, ports: Mapping[str, int], record: StackState, say: Progress
    ) -> list[ComponentStatus]:
        """memcached and Mosquitto at once; the Swift servers as soon as their rings exist."""
        host = cfg.stack.host
        parts = {p.name: p for p in self._infra_parts(cfg, ports)}
        swift_dir = self._dir / "swift"
        swift.ensure_swift_conf()
        swift_ports = _swift_ports(ports)
        rings = asyncio.create_task(
            swift.build_rings(swift_dir, host, swift_ports, _which("swift-ring-builder", "swift"))
        )
        waits: list[asyncio.Task[ComponentStatus]] = []
        try:
            waits.append(self._start_part(parts["memcached"], record, say))
            waits.append(self._start_part(parts["mosquitto"], record, say))
            ring_started = time.monotonic()
            await rings
            say(f"swift: rings built in {time.monotonic() - ring_started:.1f} s")
            waits += [self._start_part(parts[name], record, say) for name in SWIFT_PARTS]
        except BaseException:
            await _cancel([rings, *waits])
            raise
        return await _all_or_first_error(waits)

    def _infra_parts(self, cfg: FerryConfig, ports: Mapping[str, int]) -> list[_Part]:
        """Command lines (writing their configs) and readiness checks of the infrastructure."""
        host = cfg.stack.host
        swift_dir = self._dir / "swift"
        swift_dir.mkdir(parents=True, exist_ok=True)
        server: pki.Pair | None = None
        listener: mosquitto.ListenerTLS | None = None
        if cfg.stack.tls:
            made = self._pki(cfg, [])
            server = made.server
            # Mutual TLS: the broker refuses, in the handshake, any client without a
            # certificate from this CA (S3 keeps its logins: Swift's proxy cannot ask for one).
            # Each login is held to the production ACL (deploy/mosquitto/acl) for our nodes.
            acl_file = self._dir / "mosquitto" / "acl"
            acl_file.parent.mkdir(parents=True, exist_ok=True)
            acl_file.write_text(mosquitto.acl(list(cfg.stack.nodes)))
            listener = mosquitto.ListenerTLS(
                made.ca, made.server.cert, made.server.key, acl_file=acl_file
            )
        confs = swift.write_configs(
            swift_dir, host, _swift_ports(ports), f"{host}:{ports['memcached']}", cfg.s3, server
        )
        broker_conf = mosquitto.write_config(
            self._dir / "mosquitto",
            host,
            ports["broker"],
            self.log_dir / "mosquitto.log",
            autosave_interval=max(1, cfg.stack.broker_autosave),
            tls=listener,
        )
        probes = self._infra_probes(cfg, ports, create_bucket=True)
        parts = [
            _Part(
                "memcached",
                memcached.argv(_which("memcached", "memcached"), host, ports["memcached"]),
                probes["memcached"],
            ),
            _Part(
                "mosquitto",
                mosquitto.argv(_which("mosquitto", "mosquitto"), broker_conf),
                probes["mosquitto"],
            ),
        ]
        for name in SWIFT_PARTS:
            binary = _which(f"{name}-server", name)
            parts.append(
                _Part(name, swift.server_argv(binary, confs[name]), probes[name], swift.swift_env())
            )
        return parts

    def _infra_probes(
        self, cfg: FerryConfig, ports: Mapping[str, int], create_bucket: bool
    ) -> dict[str, Prober]:
        host = cfg.stack.host
        broker_tls = tls.broker_context(self._stack_broker(cfg).broker)

        def storage(name: str) -> Prober:
            return lambda: swift.probe_storage(host, ports[name])

        probes: dict[str, Prober] = {
            "memcached": lambda: memcached.probe(host, ports["memcached"]),
            "mosquitto": lambda: asyncio.to_thread(
                mqtt.round_trip, host, ports["broker"], tls=broker_tls
            ),
            "swift-proxy": lambda: swift.probe_proxy(host, ports["s3"], cfg.s3, create_bucket),
        }
        probes.update({name: storage(name) for name in SWIFT_PARTS if name != "swift-proxy"})
        return probes

    async def _start_services(
        self, cfg: FerryConfig, record: StackState, say: Progress
    ) -> list[ComponentStatus]:
        """Start the Ferry services and wait for each one's retained ``online`` status."""
        if self._services is None:
            specs, skipped = default_services(self.config_path, cfg.stack.nodes)
            for note in skipped:
                say(note)
            specs = self._with_metrics(cfg, specs, record, say)
        else:
            specs = self._services
        if not specs:
            return []
        topics = [spec.status_topic for spec in specs]
        record.status_topics.update({spec.name: spec.status_topic for spec in specs})
        broker = (cfg.broker.host, cfg.broker.port)
        context = tls.broker_context(self._stack_broker(cfg).broker)
        watcher = mqtt.StatusWatcher(*broker, topics, tls=context)
        try:
            await asyncio.to_thread(mqtt.clear_retained, *broker, topics, tls=context)
            await watcher.start()
        except (OSError, TimeoutError) as exc:
            await watcher.close()
            log = self.log_dir / "mosquitto.log"
            raise StackError(
                "mosquitto", f"lost the broker before services started ({exc!r})", log, tail(log)
            ) from exc
        try:
            waits: list[asyncio.Task[ComponentStatus]] = []
            try:
                for spec in specs:
                    probe = _status_probe(watcher, spec.status_topic)
                    env = {"PYTHONUNBUFFERED": "1", **self._client_cert_env(cfg, spec.name)}
                    part = _Part(spec.name, list(spec.argv), probe, env)
                    waits.append(self._start_part(part, record, say))
            except BaseException:
                await _cancel(waits)
                raise
            return await _all_or_first_error(waits)
        finally:
            await watcher.close()

    def _client_cert_env(self, cfg: FerryConfig, component: str) -> dict[str, str]:
        """A component's own login: its client certificate, whose CN the broker takes as its
        username (the component's name; an executor's is its node's, as in the ACL), given as
        environment overrides of ``broker.tls_cert``/``tls_key``/``username``."""
        if not cfg.stack.tls:
            return {}
        login = component.removeprefix("executor-")
        self._pki(cfg, [login])
        return login_env(self._dir, login)

    def _stack_broker(self, cfg: FerryConfig) -> FerryConfig:
        """``cfg`` as the stack's own checks connect: with the ``stack`` login (TLS)."""
        if not cfg.stack.tls:
            return cfg
        _, cert, key = self._tls_paths(mosquitto.STACK_LOGIN)
        broker = dataclasses.replace(
            cfg.broker, tls_cert=cert, tls_key=key, username=mosquitto.STACK_LOGIN
        )
        return dataclasses.replace(cfg, broker=broker)

    def _with_metrics(
        self, cfg: FerryConfig, specs: list[ServiceSpec], record: StackState, say: Progress
    ) -> list[ServiceSpec]:
        """Give every Ferry service a ``/metrics`` port of its own (``--metrics-port``): the
        configured one for the statestore and scheduler if set, else a free one (several
        executors share this host). Writes them as Prometheus file_sd targets."""
        host = cfg.metrics.host
        fresh = iter(free_ports(host, len(specs)))
        targets: list[dict[str, Any]] = []
        with_ports: list[ServiceSpec] = []
        for spec in specs:
            component = spec.name.split("-", 1)[0]
            configured = (
                getattr(cfg.metrics, f"{component}_port", 0) if spec.name == component else 0
            )
            port = configured or next(fresh)
            record.ports[f"metrics-{spec.name}"] = port
            with_ports.append(
                dataclasses.replace(spec, argv=(*spec.argv, "--metrics-port", str(port)))
            )
            labels = {"component": component}
            if spec.name != component:
                labels["node"] = spec.name.split("-", 1)[1]
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            targets.append({"targets": [address], "labels": labels})
            say(f"{spec.name}: metrics on http://{address}/metrics")
        (self._dir / METRICS_TARGETS).write_text(json.dumps(targets, indent=2) + "\n")
        return with_ports

    def _start_part(
        self, part: _Part, record: StackState, say: Progress
    ) -> asyncio.Task[ComponentStatus]:
        """Spawn ``part`` now (recording it) and return the running wait for its readiness."""
        log = self.log_dir / f"{part.name}.log"
        try:
            handle = spawn_detached(
                part.name,
                part.argv,
                log,
                env=self._child_env(part.env),
                die_with_parent_signal=signal.SIGKILL if self._die_with_parent else None,
            )
        except OSError as exc:
            raise StackError(part.name, f"cannot run {part.argv[0]}: {exc}") from exc
        self._spawned[handle.pid] = handle
        record.components.append(handle)
        state.save(self._dir, record)
        say(f"{part.name}: started (pid {handle.pid})")
        return asyncio.create_task(self._wait_ready(part, handle, say), name=part.name)

    async def _wait_ready(
        self, part: _Part, handle: ProcessHandle, say: Progress
    ) -> ComponentStatus:
        started = time.monotonic()
        last = Probe(False, "not checked yet")
        while True:
            if not handle.alive():
                code = handle.exit_code()
                how = f" with status {code}" if code is not None else ""
                raise StackError(
                    part.name,
                    f"exited{how} during start-up (last check: {last.detail})",
                    log=handle.log,
                    log_tail=tail(handle.log),
                )
            last = await part.probe()
            waited = time.monotonic() - started
            if last.ready:
                say(f"{part.name}: ready in {waited:.1f} s ({last.detail})")
                return ComponentStatus(part.name, handle.pid, True, True, last.detail, handle.log)
            if waited > self._timeout:
                raise StackError(
                    part.name,
                    f"not ready after {self._timeout:.0f} s: {last.detail}",
                    log=handle.log,
                    log_tail=tail(handle.log),
                )
            await asyncio.sleep(POLL_INTERVAL)

    def _child_env(self, extra: Mapping[str, str]) -> dict[str, str]:
        """Our environment minus ``FERRY_SECTION__KEY`` overrides (already folded into
        ferry.toml, and they would undo the ports chosen there), plus ``extra``."""
        env = {
            name: value
            for name, value in os.environ.items()
            if not (name.startswith(config_module.ENV_PREFIX) and "__" in name)
        }
        env["FERRY_CONFIG"] = str(self.config_path)
        env.update(extra)
        return env

    # ---------------------------------------------------------------- restart

    async def restart(
        self, name: str, sig: signal.Signals = signal.SIGKILL, progress: Progress | None = None
    ) -> ComponentStatus:
        """Stop one infrastructure part with ``sig`` and start it again as it was started (same
        command line, config, data and port), waiting until it answers again.

        Why: a crash of the broker or the S3 store is a fault Ferry must survive, and a test
        has to cause one against the real process. Raises StackError if no stack runs here or
        the part does not come back.
        """
        if name not in INFRA_PARTS:
            raise StackError(name, f"only infrastructure parts restart: {', '.join(INFRA_PARTS)}")
        say = progress or (lambda _message: None)
        with state.locked(self._dir):
            record = state.load(self._dir)
            old = next((c for c in (record.components if record else []) if c.name == name), None)
            if record is None or old is None:
                raise StackError(name, f"no stack with {name} runs in {self._dir}")
            handle = self._spawned.get(old.pid, old)
            if handle.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(handle.pid, sig)
            await stop_group(handle, self._grace)  # waits for the group; escalates if need be
            self._spawned.pop(old.pid, None)
            record.components.remove(old)
            resolved = self._resolve(record.ports)
            probe = self._infra_probes(resolved, record.ports, create_bucket=False)[name]
            env = swift.swift_env() if name in SWIFT_PARTS else {}
            task = self._start_part(_Part(name, list(old.argv), probe, env), record, say)
            return await task

    # ---------------------------------------------------------------- down

    async def down(self) -> None:
        """Stop everything ``up`` started (services first), keep the logs; no-op if nothing runs.

        Raises StackError naming a part whose processes survive SIGKILL.
        """
        with state.locked(self._dir):
            record = state.load(self._dir)
            if record is None:
                return
            await self._stop(record.components)
            state.remove(self._dir)

    async def _stop(self, components: Sequence[ProcessHandle]) -> None:
        handles = [self._spawned.get(c.pid, c) for c in components]
        services = [h for h in handles if h.name not in INFRA_PARTS]
        infra = [h for h in handles if h.name in INFRA_PARTS]
        for tier in (services, infra):
            await asyncio.gather(*(stop_group(h, self._grace) for h in tier))
        for handle in handles:
            self._spawned.pop(handle.pid, None)
        survivors = [h for h in handles if h.alive()]
        if survivors:
            h = survivors[0]
            raise StackError(h.name, f"pid {h.pid} survived SIGKILL", log=h.log)

    def _alive(self, handle: ProcessHandle) -> bool:
        return self._spawned.get(handle.pid, handle).alive()

    # ---------------------------------------------------------------- status

    async def status(self) -> list[ComponentStatus]:
        """Every recorded part: is its process alive, and does it answer its readiness check.

        Empty when no stack was started in this directory.
        """
        record = state.load(self._dir)
        if record is None:
            return []
        resolved = self._resolve(record.ports)
        probes = self._infra_probes(resolved, record.ports, create_bucket=False)
        watcher: mqtt.StatusWatcher | None = None
        topics = list(record.status_topics.values())
        if topics:
            watcher = mqtt.StatusWatcher(
                resolved.broker.host,
                resolved.broker.port,
                topics,
                tls=tls.broker_context(self._stack_broker(resolved).broker),
            )
            try:
                await watcher.start(timeout=2.0)
                await _settle(watcher, topics)
            except (OSError, TimeoutError):
                await watcher.close()
                watcher = None
        for name, topic in record.status_topics.items():
            probes[name] = (
                _status_probe(watcher, topic) if watcher else _unreachable("broker unreachable")
            )
        try:
            return list(
                await asyncio.gather(*(self._status_of(c, probes) for c in record.components))
            )
        finally:
            if watcher is not None:
                await watcher.close()

    async def _status_of(
        self, handle: ProcessHandle, probes: Mapping[str, Prober]
    ) -> ComponentStatus:
        if not self._alive(handle):
            return ComponentStatus(handle.name, handle.pid, False, False, "not running", handle.log)
        probe = probes.get(handle.name, _unreachable("no readiness check known"))
        result = await probe()
        return ComponentStatus(
            handle.name, handle.pid, True, result.ready, result.detail, handle.log
        )


def login_env(stack_dir: Path, login: str) -> dict[str, str]:
    """The environment that makes a Ferry process of a TLS stack in ``stack_dir`` log in as
    ``login`` (its certificate, made by ``up`` for every component and node, and username);
    e.g. an executor started outside the stack: ``login_env(dir, node)``."""
    pair = pki.pair(stack_dir.resolve() / TLS_DIR, login)
    return {
        f"{config_module.ENV_PREFIX}BROKER__TLS_CERT": str(pair.cert),
        f"{config_module.ENV_PREFIX}BROKER__TLS_KEY": str(pair.key),
        f"{config_module.ENV_PREFIX}BROKER__USERNAME": login,
    }


def _status_probe(watcher: mqtt.StatusWatcher, topic: str) -> Prober:
    async def probe() -> Probe:
        payload = watcher.latest(topic)
        if payload is None:
            return Probe(False, f"no status on {topic} yet")
        status = payload.get("status")
        return Probe(status == "online", f"{topic}: {status}")

    return probe


def _unreachable(reason: str) -> Prober:
    async def probe() -> Probe:
        return Probe(False, reason)

    return probe


async def _settle(watcher: mqtt.StatusWatcher, topics: Sequence[str], limit: float = 0.5) -> None:
    """Give retained messages (sent right after SUBACK) a moment to arrive."""
    deadline = time.monotonic() + limit
    while any(watcher.latest(t) is None for t in topics) and time.monotonic() < deadline:
        watcher.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watcher.changed.wait(), max(0.0, deadline - time.monotonic()))


async def _all_or_first_error(
    tasks: Sequence[asyncio.Task[ComponentStatus]],
) -> list[ComponentStatus]:
    """Await all; on the first failure cancel the rest and raise that failure."""
    try:
        for done in asyncio.as_completed(tasks):
            await done
    finally:
        await _cancel(tasks)
    return [task.result() for task in tasks]


async def _cancel(tasks: Sequence[asyncio.Future[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _swift_ports(ports: Mapping[str, int]) -> swift.SwiftPorts:
    return swift.SwiftPorts(
        account=ports["swift-account"],
        container=ports["swift-container"],
        object=ports["swift-object"],
        proxy=ports["s3"],
    )


def _which(program: str, part: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise StackError(part, f"{program} not found on PATH (is its Debian package installed?)")
    return path


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
