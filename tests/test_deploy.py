"""deploy/: what an operator uses outside this machine. The compose file, the Dockerfile and the
systemd units parse and reference only things that exist; the example Mosquitto config with its
ACL runs on the real broker, carries a whole migration with one login per component, and refuses
what a component has no business doing."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
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
from typing import Any, NamedTuple

import orjson
import pytest
import yaml

from services.common import images, topics
from services.common.blobstore import BlobStore
from services.common.bus import Bus, BusError, RemoteError, RequestTimeout
from services.common.config import FerryConfig, load_config
from services.common.contract import ContractError
from tests.conftest import REPO, ServiceProcesses, stack_config, wait_online
from tools.cli.operator import Operator
from tools.cli.simulate import Simulator, connect_paho
from tools.stack.ports import free_ports

on_session_loop = pytest.mark.asyncio(loop_scope="session")

DEPLOY = REPO / "deploy"
ACL = DEPLOY / "mosquitto" / "acl"
DEVICE_ACL = DEPLOY / "mosquitto" / "acl-devices"
ROLES = ("scheduler", "statestore", "operator")


def acl_users(acl: Path = ACL) -> list[str]:
    return [line.split()[1] for line in acl.read_text().splitlines() if line.startswith("user ")]


def edge_nodes() -> list[str]:
    return [user for user in acl_users() if user not in ROLES]


def read_env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def password_entries(secrets: Path, name: str = "passwords") -> dict[str, str]:
    """User → hash, from a Mosquitto password file."""
    lines = (secrets / name).read_text().splitlines()
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
    subprocess.run(
        [DEPLOY / "mosquitto" / "credentials.sh", out],
        check=True,
        timeout=60,
        env={**os.environ, "PYTHON": sys.executable},  # its tls/ needs `cryptography`
    )
    return out


def test_credentials_give_every_acl_user_a_hashed_password_and_an_env_file(secrets: Path) -> None:
    users, devices = acl_users(), acl_users(DEVICE_ACL)
    assert {"scheduler", "statestore", "operator", "edge-a", "edge-b"} <= set(users)
    assert "devices" in devices and not set(users) & set(devices)
    hashed = password_entries(secrets)
    device_hashed = password_entries(secrets, "passwords-devices")
    assert sorted(hashed) == sorted(users) and sorted(device_hashed) == sorted(devices)
    s3_keys = {}
    for user in users + devices:
        env = read_env_file(secrets / f"{user}.env")
        assert env["FERRY_BROKER__USERNAME"] == user
        password = env["FERRY_BROKER__PASSWORD"]
        assert password and password not in {**hashed, **device_hashed}[user]
        load_config(env=env)  # every key it sets is a real config key
        if "FERRY_S3__SECRET_KEY" in env:
            s3_keys[user] = (env["FERRY_S3__ACCESS_KEY"], env["FERRY_S3__SECRET_KEY"])
    # No login holds the S3 root key; only executors, the scheduler and the operator hold a key
    # (each its own, given a MinIO policy by minio-users.sh); devices and the statestore none.
    minio = read_env_file(secrets / "minio.env")
    assert sorted(s3_keys) == sorted(set(users) - {"statestore"})
    assert all(
        secret != minio["MINIO_ROOT_PASSWORD"] and access != minio["MINIO_ROOT_USER"]
        for access, secret in s3_keys.values()
    )
    assert len({secret for _, secret in s3_keys.values()}) == len(s3_keys)
    script = (secrets / "minio-users.sh").read_text()
    for access, secret in s3_keys.values():
        assert f'mc admin user add "$a" {access} {secret}' in script
    for policy in (DEPLOY / "minio").glob("*.json"):
        orjson.loads(policy.read_bytes())
        assert (secrets / "minio-policies" / policy.name).is_file()
    again = subprocess.run(
        [DEPLOY / "mosquitto" / "credentials.sh", secrets], capture_output=True, text=True
    )
    assert again.returncode == 0 and "keeping it" in again.stdout
    assert (
        dict(line.split(":", 1) for line in (secrets / "passwords").read_text().splitlines())
        == hashed
    )


def test_the_operator_reads_every_channel_but_other_logins_replies() -> None:
    """`ferry watch` sees every channel asyncapi.yaml declares; replies only by the %u pattern
    (its own). A channel added to the contract without a read for the operator fails here."""
    spec = yaml.safe_load((REPO / "schemas" / "asyncapi.yaml").read_text())
    channels = {re.sub(r"\{[^}]+\}", "+", c["address"]) for c in spec["channels"].values()}
    acl = (DEPLOY / "mosquitto" / "acl").read_text()
    operator = acl.split("\nuser operator\n", 1)[1].split("\nuser ", 1)[0]
    reads = {line.split()[-1] for line in operator.splitlines() if line.startswith("topic read")}
    assert reads == channels - {"ferry/v1/replies/+/+"}
    assert "pattern read ferry/v1/replies/%u/#" in acl.split("\nuser ", 1)[0]


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
            assert config.broker.tls and config.broker.port == 8883 and config.s3.secure
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


class BrokerPorts(NamedTuple):
    components: int
    devices: int


@pytest.fixture(scope="module")
def acl_broker(secrets: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerPorts]:
    """Mosquitto running ``deploy/mosquitto/mosquitto.conf`` as shipped, but for its paths and
    ports (those of the official image); returns the ports of its two listeners."""
    directory = tmp_path_factory.mktemp("acl-broker")
    ports = BrokerPorts(*free_ports("127.0.0.1", 2))
    replacements = {  # key -> replacement of its 1st, 2nd, ... occurrence
        "listener": [
            f"listener {ports.components} 127.0.0.1",
            f"listener {ports.devices} 127.0.0.1",
        ],
        "password_file": [
            f"password_file {secrets / 'passwords'}",
            f"password_file {secrets / 'passwords-devices'}",
        ],
        "acl_file": [f"acl_file {ACL}", f"acl_file {DEVICE_ACL}"],
        # TLS only, with the certificates credentials.sh made (both listeners).
        **{
            key: [f"{key} {secrets / 'tls' / name}"] * 2
            for key, name in (
                ("cafile", "ca.pem"),
                ("certfile", "server.pem"),
                ("keyfile", "server.key"),
            )
        },
        "persistence_location": [f"persistence_location {directory}/"],
        "log_dest": [f"log_dest file {directory / 'mosquitto.log'}"],
    }
    lines = []
    for line in (DEPLOY / "mosquitto" / "mosquitto.conf").read_text().splitlines():
        key = line.split(" ", 1)[0]
        lines.append(replacements[key].pop(0) if replacements.get(key) else line)
    missing = sorted(key for key, left in replacements.items() if left)
    assert not missing, f"the example config lacks {missing}"
    lines.append(f"user {pwd.getpwuid(os.geteuid()).pw_name}")
    conf = directory / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    broker = subprocess.Popen([mosquitto, "-c", str(conf)], stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", ports.devices), 1),
            ):
                break
            assert broker.poll() is None, broker.stderr.read() if broker.stderr else ""
            time.sleep(0.1)
        yield ports
    finally:
        broker.terminate()
        broker.wait(10)


def as_user(
    config: FerryConfig, secrets: Path, user: str, ports: BrokerPorts | None = None
) -> FerryConfig:
    """The config of one login; a device login (its env file names the device listener's port)
    goes to the test broker's device port."""
    env = read_env_file(secrets / f"{user}.env")
    login = {k: v for k, v in env.items() if k.startswith("FERRY_BROKER__")}
    if "FERRY_BROKER__PORT" in login:
        assert ports is not None, f"{user} logs in on the device listener: pass the ports"
        login["FERRY_BROKER__PORT"] = str(ports.devices)
    return load_config(config.source, env=login)


@pytest.fixture(scope="module")
async def acl_system(
    infra: FerryConfig,
    acl_broker: BrokerPorts,
    secrets: Path,
    tmp_path_factory: pytest.TempPathFactory,
    unikernel_builds: Path,
) -> AsyncIterator[FerryConfig]:
    """Statestore, scheduler and both executors on the ACL broker, each with its own login;
    the config returned is anonymous (S3 as in the session infra)."""
    directory = tmp_path_factory.mktemp("acl-system")
    config, _ = stack_config(
        infra,
        directory,
        FERRY_BROKER__PORT=str(acl_broker.components),
        FERRY_BROKER__TLS="true",
        FERRY_BROKER__TLS_CA=str(secrets / "tls" / "ca.pem"),
    )
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
    acl_system: FerryConfig, acl_broker: BrokerPorts, secrets: Path
) -> None:
    service = f"acl-{uuid.uuid4().hex[:5]}"
    devices = Simulator(
        as_user(acl_system, secrets, "devices", acl_broker).broker,
        service,
        rate=50,
        producers=["devices"],  # the login: its ACL lets it write only in/devices
    )
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
    acl_system: FerryConfig, acl_broker: BrokerPorts, secrets: Path
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
        device = connect_paho(
            as_user(acl_system, secrets, "devices", acl_broker).broker, "test-device"
        )
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

        # The operator reads the registry but cannot write it: not on statestore/requests (the
        # broker drops it: no answer) and not as a "query" (no such query: refused before it
        # is sent, and by the statestore's own check of the same schema if sent anyway).
        record = await ops.query("get_service", service=legit)
        forged = {**record, "node": "edge-a", "instance": f"{legit}.9", "epoch": 9}
        with pytest.raises(RequestTimeout):
            await ops.bus.request(
                topics.STATESTORE_REQUESTS, {"op": "put_service", "record": forged}, timeout=2
            )
        with pytest.raises(ContractError, match="put_service"):
            await ops.query("put_service", record=forged)
        assert (await ops.query("get_service", service=legit))["epoch"] == record["epoch"]
        await ops.command("stop", service=legit)


@on_session_loop
async def test_the_deploy_broker_serves_tls_only(
    acl_system: FerryConfig, acl_broker: BrokerPorts, secrets: Path
) -> None:
    """Both listeners speak TLS only: a plaintext client never gets a CONNACK, even with a
    valid login; with TLS and the CA that login works (the migration test uses it)."""
    for user, port in (("operator", acl_broker.components), ("devices", acl_broker.devices)):
        login = as_user(acl_system, secrets, user, acl_broker).broker
        login = dataclasses.replace(login, port=port)
        plain = dataclasses.replace(login, tls=False, tls_ca="")
        with pytest.raises(ConnectionError, match="connection lost before CONNACK"):
            await asyncio.to_thread(connect_paho, plain, f"test-plain-{user}", None, 5.0)
        client = await asyncio.to_thread(connect_paho, login, f"test-tls-{user}", None, 5.0)
        client.disconnect()
        client.loop_stop()


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


@on_session_loop
async def test_a_device_login_cannot_hijack_a_session_read_replies_or_report_errors(
    acl_system: FerryConfig, acl_broker: BrokerPorts, secrets: Path
) -> None:
    """The holes of issue 12, tried with the `devices` login against the deploy config."""
    edge_a, operator = (as_user(acl_system, secrets, user) for user in ("edge-a", "operator"))
    device_broker = as_user(acl_system, secrets, "devices", acl_broker).broker
    service = f"victim-{uuid.uuid4().hex[:5]}"
    seen: list[tuple[str, bytes]] = []

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        seen.append((message.topic, message.payload))

    async with (
        Bus(edge_a.broker, f"ferry-svc-{service}", session_expiry=300) as owner,
        Bus(operator.broker, f"test-observer-{uuid.uuid4().hex[:5]}") as observer,
        Operator(operator) as ops,
    ):
        await owner.subscribe(topics.app_input(service))
        await owner.subscribe(topics.app_input_from(service, "+"))
        await observer.subscribe(topics.ERRORS)
        await observer.subscribe(topics.mobility("+"))
        await observer.subscribe(f"{topics.PREFIX}/replies/#")

        # (a) the component listener does not know the device login at all ...
        component_side = load_config(
            acl_system.source,
            env={
                "FERRY_BROKER__USERNAME": device_broker.username,
                "FERRY_BROKER__PASSWORD": device_broker.password,
            },
        ).broker
        with pytest.raises(ConnectionError, match="refused 'ferry-svc-"):
            await asyncio.to_thread(connect_paho, component_side, f"ferry-svc-{service}")
        # ... and the device listener replaces the client id the device asks for by its login.
        device = connect_paho(device_broker, f"ferry-svc-{service}", on_message=on_message)
        try:
            device.subscribe(f"{topics.PREFIX}/replies/#", qos=1)
            device.subscribe(f"{topics.replies('scheduler', 'ferry-scheduler')}", qos=1)
            # (d) a device writes input only on its own topic (in/<its login>): not on the
            # shared one, not on another producer's
            for topic in (topics.app_input(service), topics.app_input_from(service, "dev-1")):
                reading = {"producer": "dev-1", "seq": 99, "data": {"device": "dev-1"}}
                device.publish(topic, orjson.dumps(reading), qos=1).wait_for_publish(10)
            for seq in (1, 2, 3):
                reading = {"producer": "devices", "seq": seq, "data": {"device": "devices"}}
                own_topic = topics.app_input_from(service, "devices")
                device.publish(own_topic, orjson.dumps(reading), qos=1)
            # (c) no error report and no other device's mobility event from a device
            report = {"source": "forged", "topic": "x", "reason": "forged", "time": 1}
            device.publish(topics.ERRORS, orjson.dumps(report), qos=1).wait_for_publish(10)
            moved = {"device": "someone-else", "node": "edge-b", "time": 1}
            device.publish(topics.mobility("someone-else"), orjson.dumps(moved), qos=1)
            own = {"device": "devices", "node": "edge-b", "time": 1}
            device.publish(topics.mobility("devices"), orjson.dumps(own), qos=1).wait_for_publish(
                10
            )

            # The rightful session kept its connection and got every input.
            got = []
            async with asyncio.timeout(10):
                async for message in owner.messages():
                    got.append(message.payload["seq"])
                    if len(got) == 3:
                        break
            assert got == [1, 2, 3] and owner._generation == 1
            await owner.close()  # the session's rightful owner from here is the executor

            # (b) replies flow (scheduler -> operator, statestore -> scheduler), none to a device.
            await ops.command(
                "deploy", service=service, app="counter", node="edge-b", runtime="unix"
            )
            await ops.wait_serving(service)
            await ops.command("stop", service=service)
            await asyncio.sleep(0.5)
        finally:
            device.disconnect()
            device.loop_stop()

        observed: list[str] = []
        reports: list[dict[str, object]] = []
        while observer.pending():
            message = await anext(observer.messages())
            observed.append(message.topic)
            if message.topic == topics.ERRORS:
                reports.append(message.payload)
        # The operator reads its own replies only: the deploy's statestore round trips of the
        # scheduler happened (it is serving) without one reaching the operator's observer.
        assert any(t.startswith(topics.replies("operator", "")) for t in observed), observed
        assert not any(t.startswith(topics.replies("scheduler", "")) for t in observed), observed
        assert [topic for topic, _ in seen] == []
        assert topics.ERRORS not in observed, reports
        assert topics.mobility("someone-else") not in observed
        assert topics.mobility("devices") in observed  # its own mobility topic is open to it

        # The rightful component may still report errors.
        async with Bus(edge_a.broker, f"test-edge-a-{uuid.uuid4().hex[:5]}") as node:
            await node.publish(topics.ERRORS, {**report, "source": "edge-a"})
        async with asyncio.timeout(10):
            message = await anext(observer.messages())
            while message.topic != topics.ERRORS:
                message = await anext(observer.messages())
        assert message.payload["source"] == "edge-a"


@on_session_loop
async def test_no_login_can_speak_for_another_producer_or_poison_its_watermark(
    acl_system: FerryConfig, acl_broker: BrokerPorts, secrets: Path
) -> None:
    """Issue 12: one input with seq 2^53-1 under producer `victim`, sent by another login, made
    every later genuine input of `victim` be dropped as a repeat. Now the broker lets a device
    write only its own input topic, and the executor applies what arrives there only under the
    producer that topic names: a forged producer is dead-lettered, the victim unharmed."""
    operator = as_user(acl_system, secrets, "operator")
    device_broker = as_user(acl_system, secrets, "devices", acl_broker).broker
    service = f"poison-{uuid.uuid4().hex[:5]}"
    async with Operator(operator) as ops, Bus(operator.broker, f"test-{service}") as watcher:
        await watcher.subscribe(topics.app_output(service))
        await watcher.subscribe(topics.app_dead_letters(service))
        await ops.command("deploy", service=service, app="counter", node="edge-a", runtime="unix")
        await ops.wait_serving(service)
        device = connect_paho(device_broker, "any")
        try:
            forged = {"producer": "victim", "seq": 2**53 - 1, "data": {}}
            own = topics.app_input_from(service, "devices")
            device.publish(own, orjson.dumps(forged), qos=1).wait_for_publish(10)
            mine = {"producer": "devices", "seq": 1, "data": {}}
            device.publish(own, orjson.dumps(mine), qos=1).wait_for_publish(10)
        finally:
            device.disconnect()
            device.loop_stop()
        for seq in (1, 2, 3):  # the genuine victim, through a login allowed the shared topic
            genuine = {"producer": "victim", "seq": seq, "data": {}}
            await ops.bus.publish(topics.app_input(service), genuine)
        outputs: list[tuple[str, int]] = []
        letters: list[dict[str, Any]] = []
        async with asyncio.timeout(20):
            async for message in watcher.messages():
                if message.topic == topics.app_dead_letters(service):
                    letters.append(message.payload)
                else:
                    outputs.append((message.payload["producer"], message.payload["seq"]))
                if len(outputs) == 4 and letters:
                    break
        assert sorted(outputs) == [("devices", 1), ("victim", 1), ("victim", 2), ("victim", 3)]
        assert [(d["producer"], d["seq"]) for d in letters] == [("victim", 2**53 - 1)]
        assert "only 'devices' may use" in letters[0]["reason"]
        await ops.command("stop", service=service)
