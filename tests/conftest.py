"""Shared fixtures: the real local infrastructure (Mosquitto + Swift s3api + memcached) and real
Ferry service processes on top of it. Nothing here is a mock."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import services.common.config as config_module
import tools.stack.mqtt as stack_mqtt
import tools.stack.stack as stack_module
from services.common import images, topics
from services.common.blobstore import BlobStore
from services.common.bus import Bus
from services.common.config import FerryConfig, load_config
from tools.cli.operator import Operator
from tools.cli.simulate import connect_paho
from tools.stack.process import die_with_parent

REPO = Path(__file__).resolve().parents[1]
TEST_NODES = ("edge-a", "edge-b", "edge-c", "edge-x", "edge-y")

# Hygiene: a user's `ferry up` state in the checkout (.ferry/ferry.toml: its ports, its dir) must
# never reach a test, and nothing a test starts may outlive a test run killed from outside.
config_module.DEFAULT_CONFIG_FILE = None
stack_module.DIE_WITH_PARENT = True
# Test stacks are plaintext unless a test asks for TLS (FERRY_STACK__TLS=true, as tests/stack/
# test_tls.py does): many tests talk to the broker and S3 with raw clients, and the suite's
# throughput tests measure the plaintext bus. `ferry up` itself defaults to TLS.
config_module.DEFAULTS["stack"]["tls"] = False


@pytest.fixture(scope="session")
def unikernel_builds() -> Path:
    """``make -C unikernel`` once per session; the build directory."""
    subprocess.run(["make", "-s", "-C", str(REPO / "unikernel")], check=True)
    return REPO / "unikernel" / "build"


@pytest.fixture(scope="session")
async def infra(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FerryConfig]:
    """Broker and S3 store started by the project's own stack code, for the whole session."""
    from tools.stack import Stack

    directory = tmp_path_factory.mktemp("stack")
    config = load_config(env={"FERRY_STACK__DIR": str(directory), "FERRY_EXECUTOR__ACCEL": "tcg"})
    stack = Stack(config, services=[])
    info = await stack.up()
    try:
        yield info.config
    finally:
        await stack.down()


class ServiceProcesses:
    """Real Ferry service processes (``python -m services.<name>``) for one test module."""

    def __init__(self, config_path: Path, log_dir: Path) -> None:
        self.config_path = config_path
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *extra: str, env: dict[str, str] | None = None) -> None:
        """Start ``python -m services.<package>`` (``tools.cli`` for ``cli``); ``env`` adds to
        this process's environment."""
        package = name.split("@")[0]
        module = "tools.cli" if package == "cli" else f"services.{package}"
        log = (self.log_dir / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                module,
                "--config",
                str(self.config_path),
                *extra,
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
            # SIGTERM, not SIGKILL: an executor stops its guests on the way out.
            preexec_fn=die_with_parent(signal.SIGTERM),
            env={**os.environ, **(env or {})},
        )

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal the process group; one that outlives a SIGTERM by 10 s is killed, so no test
        leaves a component behind to answer the next module's requests."""
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")


async def wait_online(
    config: FerryConfig, status_topics: list[str], timeout: float = 30.0, since: int = 0
) -> None:
    """Wait for each status topic to say online, in a message stamped at or after ``since``."""
    async with Bus(
        config.broker, f"test-wait-{uuid.uuid4().hex[:6]}", validate_inbound=False
    ) as bus:
        waiting = set(status_topics)
        for topic in status_topics:
            await bus.subscribe(topic)
        async with asyncio.timeout(timeout):
            async for message in bus.messages():
                payload = message.payload
                if payload.get("status") == "online" and payload.get("time", 0) >= since:
                    waiting.discard(message.topic)
                if not waiting:
                    return


def stack_config(infra: FerryConfig, directory: Path, **overrides: str) -> tuple[FerryConfig, Path]:
    """A config for service processes on the session infra, written to ``directory``."""
    env = {
        "FERRY_BROKER__PORT": str(infra.broker.port),
        "FERRY_S3__ENDPOINT": infra.s3.endpoint,
        "FERRY_STACK__DIR": str(directory),
        "FERRY_EXECUTOR__ACCEL": "tcg",
        "FERRY_EXECUTOR__HEARTBEAT_INTERVAL": "1.0",
        "FERRY_STATESTORE__DATABASE": str(directory / "statestore.db"),
        # Checkpoints sealed as on the local stack (its key, made under the infra's dir).
        "FERRY_EXECUTOR__CHECKPOINT_KEY_FILE": infra.executor.checkpoint_key_file,
        **overrides,
    }
    config = load_config(env=env)
    path = directory / "ferry.toml"
    path.write_text(config.to_toml())
    # Test stacks share the session broker: a cordon another module left retained must not
    # keep this stack's nodes empty.
    stack_mqtt.clear_retained(
        infra.broker.host, infra.broker.port, [topics.node_cordon(n) for n in TEST_NODES]
    )
    return load_config(path, env={}), path


async def start_system(
    config: FerryConfig,
    procs: ServiceProcesses,
    builds: Path,
    apps: tuple[str, ...] = ("counter",),
    nodes: tuple[str, ...] = ("edge-a", "edge-b"),
    node_args: dict[str, list[str]] | None = None,
) -> None:
    """Push ``apps``, start the statestore, the scheduler and an executor per node (with its
    ``node_args``) as real processes, and return once every one of them says online: the
    system of the end-to-end modules."""
    store = BlobStore(config.s3)
    for app in apps:
        await images.push(store, app, builds)
    end_sessions(
        config, ["ferry-statestore", "ferry-scheduler", *(f"ferry-executor-{n}" for n in nodes)]
    )
    procs.start("statestore")
    procs.start("scheduler")
    for node in nodes:
        procs.start(f"executor@{node}", "--node", node, *(node_args or {}).get(node, []))
    await wait_online(
        config,
        [topics.component_status("statestore"), topics.component_status("scheduler")]
        + [topics.node_status(n) for n in nodes],
    )


def end_sessions(config: FerryConfig, client_ids: list[str]) -> None:
    """End the broker's persistent sessions of ``client_ids`` (a clean start, then a disconnect
    with no expiry): the modules share one broker, and what was queued for an earlier module's
    statestore (the raw requests other modules publish on its topics) must not be replayed into
    this module's fresh database."""
    for client_id in client_ids:
        client = connect_paho(config.broker, client_id)
        client.disconnect()
        client.loop_stop()


# -- the end-to-end modules' system: each module defines ``system`` (its config, then
# ``start_system``); these give it a directory, its processes and an operator session. --------


@pytest.fixture(scope="module")
def system_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module's own directory for its system's config, logs and database."""
    module = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    return tmp_path_factory.mktemp(module)


@pytest.fixture(scope="module")
def procs(system_dir: Path) -> Iterator[ServiceProcesses]:
    procs = ServiceProcesses(system_dir / "ferry.toml", system_dir)
    yield procs
    procs.stop_all()


@pytest.fixture
async def ops(system: FerryConfig) -> AsyncIterator[Operator]:
    async with Operator(system) as operator:
        yield operator


def ferry(
    config: FerryConfig, *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the ``ferry`` CLI against ``config``; it never prints a traceback, whatever happens."""
    done = subprocess.run(
        [sys.executable, "-m", "tools.cli", "--config", str(config.source), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


def name(prefix: str) -> str:
    """A service (or device) name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:5]}"


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[ServiceProcesses]:
    procs = ServiceProcesses(tmp_path / "ferry.toml", tmp_path)
    yield procs
    procs.stop_all()


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 16 KiB filesystem (tmpfs) that any image or blob download fills up."""
    mount = tmp_path / "tiny-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
