"""deploy/: what an operator uses outside this machine. The compose file, the Dockerfile and the
systemd units parse and reference only things that exist; the example Mosquitto config with its
ACL runs on the real broker, carries a whole migration with one login per component, and refuses
what a component has no business doing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from services.cli.operator import Operator
from services.cli.simulate import Simulator, connect_paho
from services.common import images, topics
from services.common.blobstore import BlobStore
from services.common.bus import Bus, BusError, RemoteError
from services.common.config import FerryConfig, load_config
from services.stack.ports import free_ports
from tests.conftest import REPO, ServiceProcesses, stack_config, wait_online

on_session_loop = pytest.mark.asyncio(loop_scope="session")

DEPLOY = REPO / "deploy"
ACL = DEPLOY / "mosquitto" / "acl"
ROLES = ("scheduler", "statestore", "operator", "devices")


def acl_users() -> list[str]:
    return [line.split()[1] for line in ACL.read_text().splitlines() if line.startswith("user ")]


def edge_nodes() -> list[str]:
    return [user for user in acl_users() if user not in ROLES]


def read_env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def password_entries(secrets: Path) -> dict[str, str]:
    """User → hash, from the Mosquitto password file."""
    lines = (secrets / "passwords").read_text().splitlines()
    return dict(line.split(":", 1) for line in lines)


def console_scripts() -> set[str]:
    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])


def accepted_flags(program: str) -> str:
    """The ``--help`` text of one of Ferry's console scripts, run from this checkout's venv."""
    executable = Path(sys.executable).parent / program
    done = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What ``deploy/mosquitto/credentials.sh`` writes, with the real ``mosquitto_passwd``."""
    out = tmp_path_factory.mktemp("secrets") / "secrets"
    subprocess.run([DEPLOY / "mosquitto" / "credentials.sh", out], check=True, timeout=60)
    return out


def test_credentials_give_every_acl_user_a_hashed_password_and_an_env_file(secrets: Path) -> None:
    users = acl_users()
    assert {"scheduler", "statestore", "operator", "devices", "edge-a", "edge-b"} <= set(users)
    hashed = password_entries(secrets)
    assert sorted(hashed) == sorted(users)
    for user in users:
        env = read_env_file(secrets / f"{user}.env")
        assert env["FERRY_BROKER__USERNAME"] == user
        assert env["FERRY_BROKER__PASSWORD"] and env["FERRY_BROKER__PASSWORD"] not in hashed[user]
        load_config(env=env)  # every key it sets is a real config key
    minio = read_env_file(secrets / "minio.env")
    assert (
        read_env_file(secrets / "edge-a.env")["FERRY_S3__SECRET_KEY"]
        == minio["MINIO_ROOT_PASSWORD"]
    )
    again = subprocess.run(
        [DEPLOY / "mosquitto" / "credentials.sh", secrets], capture_output=True, text=True
    )
    assert again.returncode == 0 and "keeping it" in again.stdout
    assert (
        dict(line.split(":", 1) for line in (secrets / "passwords").read_text().splitlines())
        == hashed
    )


def test_compose_file_references_only_what_exists(secrets: Path) -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services: dict[str, dict[str, Any]] = compose["services"]
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:")
    assert services["minio"]["image"].startswith("minio/minio:")

    def host_path(source: str) -> Path:
        relative = Path(source)
        if relative.parts[0] == "secrets":  # ./secrets/...: made by credentials.sh
            return secrets.joinpath(*relative.parts[1:])
        return DEPLOY / relative

    scripts = console_scripts()
    ferry_services = 0
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert host_path(source).exists(), f"{name}: volume {source} does not exist"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
        env: dict[str, str] = {}
        for env_file in service.get("env_file", []):
            assert host_path(env_file).is_file(), f"{name}: env_file {env_file} does not exist"
            env.update(read_env_file(host_path(env_file)))
        if "build" in service:
            ferry_services += 1
            context = (DEPLOY / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).is_file()
            argv = [*service.get("entrypoint", []), *service["command"]]
            assert argv[0] in scripts, f"{name}: {argv[0]} is not a Ferry console script"
            help_text = accepted_flags(argv[0])
            for flag in (arg for arg in argv[1:] if arg.startswith("--")):
                assert flag in help_text, f"{name}: {argv[0]} has no option {flag}"
            env.update(service.get("environment", {}))
            config = load_config(env=env)
            assert config.broker.host == "mosquitto" and config.s3.endpoint == "minio:9000"
            assert config.broker.username, f"{name}: no broker login"
    assert ferry_services == 5  # statestore, scheduler, two executors, the CLI


def test_dockerfile_copies_only_what_exists() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    copied = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY ")]
    assert copied
    for sources in copied:
        for source in sources:
            assert (REPO / source).exists(), f"Dockerfile copies missing {source}"


def test_systemd_units_run_ferry_scripts_with_credentials_that_credentials_sh_writes(
    secrets: Path,
) -> None:
    scripts = console_scripts()
    units = sorted((DEPLOY / "systemd").glob("*.service"))
    assert {u.name for u in units} >= {
        "ferry-executor@.service",
        "ferry-scheduler.service",
        "ferry-statestore.service",
    }
    for unit in units:
        lines = dict(
            line.split("=", 1) for line in unit.read_text().splitlines() if re.match(r"^\w+=", line)
        )
        argv = lines["ExecStart"].split()
        program = Path(argv[0]).name
        assert program in scripts, f"{unit.name}: {program} is not a Ferry console script"
        help_text = accepted_flags(program)
        for flag in (arg for arg in argv[1:] if arg.startswith("--")):
            assert flag in help_text, f"{unit.name}: {program} has no option {flag}"
        env_file = Path(lines["EnvironmentFile"]).name
        for instance in edge_nodes() if "%i" in env_file else [""]:
            assert (secrets / env_file.replace("%i", instance)).is_file(), (unit.name, instance)


# -- the example broker config, for real ----------------------------------------------------


@pytest.fixture(scope="module")
def acl_broker(secrets: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Mosquitto running ``deploy/mosquitto/mosquitto.conf`` as shipped, but for its paths and
    port (those of the official image); returns the port."""
    directory = tmp_path_factory.mktemp("acl-broker")
    (port,) = free_ports("127.0.0.1", 1)
    replacements = {
        "listener": f"listener {port} 127.0.0.1",
        "password_file": f"password_file {secrets / 'passwords'}",
        "acl_file": f"acl_file {ACL}",
        "persistence_location": f"persistence_location {directory}/",
        "log_dest": f"log_dest file {directory / 'mosquitto.log'}",
    }
    lines = []
    for line in (DEPLOY / "mosquitto" / "mosquitto.conf").read_text().splitlines():
        key = line.split(" ", 1)[0]
        lines.append(replacements.pop(key, line))
    assert not replacements, f"the example config lacks {sorted(replacements)}"
    lines.append(f"user {pwd.getpwuid(os.geteuid()).pw_name}")
    conf = directory / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    broker = subprocess.Popen([mosquitto, "-c", str(conf)], stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert broker.poll() is None, broker.stderr.read() if broker.stderr else ""
            time.sleep(0.1)
        yield port
    finally:
        broker.terminate()
        broker.wait(10)


def as_user(config: FerryConfig, secrets: Path, user: str) -> FerryConfig:
    env = read_env_file(secrets / f"{user}.env")
    login = {k: v for k, v in env.items() if k.startswith("FERRY_BROKER__")}
    return load_config(config.source, env=login)


@pytest.fixture(scope="module")
async def acl_system(
    infra: FerryConfig,
    acl_broker: int,
    secrets: Path,
    tmp_path_factory: pytest.TempPathFactory,
    unikernel_builds: Path,
) -> AsyncIterator[FerryConfig]:
    """Statestore, scheduler and both executors on the ACL broker, each with its own login;
    the config returned is anonymous (S3 as in the session infra)."""
    directory = tmp_path_factory.mktemp("acl-system")
    config, _ = stack_config(infra, directory, FERRY_BROKER__PORT=str(acl_broker))
    for app in ("counter",):
        await images.push(BlobStore(config.s3), app, unikernel_builds)
    procs = ServiceProcesses(directory / "ferry.toml", directory)
    logins = {
        user: {k: v for k, v in read_env_file(secrets / f"{user}.env").items() if "BROKER" in k}
        for user in acl_users()
    }
    procs.start("statestore", env=logins["statestore"])
    procs.start("scheduler", env=logins["scheduler"])
    for node in ("edge-a", "edge-b"):
        procs.start(f"executor@{node}", "--node", node, env=logins[node])
    try:
        await wait_online(
            as_user(config, secrets, "operator"),
            [topics.component_status("statestore"), topics.component_status("scheduler")]
            + [topics.node_status(n) for n in ("edge-a", "edge-b")],
        )
        yield config
    finally:
        procs.stop_all()


@on_session_loop
async def test_a_migration_runs_with_one_login_per_component(
    acl_system: FerryConfig, secrets: Path
) -> None:
    service = f"acl-{uuid.uuid4().hex[:5]}"
    devices = Simulator(as_user(acl_system, secrets, "devices").broker, service, rate=50)
    async with Operator(as_user(acl_system, secrets, "operator")) as ops:
        await ops.command("deploy", service=service, app="counter", node="edge-a", runtime="unix")
        await ops.wait_serving(service)
        devices.start()
        await asyncio.sleep(1)
        moved = await ops.move("migrate", service, "edge-b")
        assert moved["phase"] == "committed", moved
        await asyncio.sleep(0.5)
        report = await asyncio.to_thread(devices.finish)
        assert report.sent > 50 and report.lost == [] and report.duplicated == []
        assert set(report.nodes) == {"edge-a", "edge-b"}
        await ops.command("stop", service=service)


@on_session_loop
async def test_acl_refuses_what_a_component_must_not_do(
    acl_system: FerryConfig, secrets: Path
) -> None:
    edge_a, operator = (as_user(acl_system, secrets, user) for user in ("edge-a", "operator"))
    intruder, legit = f"acl-x-{uuid.uuid4().hex[:5]}", f"acl-ok-{uuid.uuid4().hex[:5]}"
    async with (
        Bus(edge_a.broker, f"test-edge-a-{uuid.uuid4().hex[:5]}") as spy,
        Bus(operator.broker, f"test-observer-{uuid.uuid4().hex[:5]}") as observer,
        Operator(operator) as ops,
    ):
        # Mosquitto grants any subscription and checks each delivery against the ACL.
        await spy.subscribe(topics.node_commands("edge-b"))
        await observer.subscribe(topics.node_commands("edge-b"))

        # A device cannot command the scheduler: its deploy never happens, the operator's does.
        device = connect_paho(as_user(acl_system, secrets, "devices").broker, "test-device")
        try:
            command = {
                "command": "deploy",
                "request_id": uuid.uuid4().hex,
                "service": intruder,
                "app": "counter",
                "node": "edge-b",
                "runtime": "unix",
            }
            info = device.publish(topics.SCHEDULER_COMMANDS, orjson.dumps(command), qos=1)
            info.wait_for_publish(10)
        finally:
            device.disconnect()
            device.loop_stop()
        await ops.command("deploy", service=legit, app="counter", node="edge-b", runtime="unix")
        await ops.wait_serving(legit)
        with pytest.raises(RemoteError) as refused:
            await ops.query("get_service", service=intruder)
        assert refused.value.code == "unknown_service"

        # edge-b's commands reached the operator, never edge-a's login.
        assert observer.pending() >= 1
        await asyncio.sleep(0.5)
        assert spy.pending() == 0
        await ops.command("stop", service=legit)


@on_session_loop
async def test_a_wrong_password_is_a_clear_error_not_an_endless_retry(
    acl_system: FerryConfig,
) -> None:
    wrong = load_config(
        acl_system.source,
        env={"FERRY_BROKER__USERNAME": "edge-a", "FERRY_BROKER__PASSWORD": "not-the-password"},
    )
    bus = Bus(wrong.broker, f"test-wrong-{uuid.uuid4().hex[:5]}", connect_timeout=120)
    async with asyncio.timeout(20):
        with pytest.raises(BusError, match=r"refused .* as 'edge-a'"):
            await bus.__aenter__()
