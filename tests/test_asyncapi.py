"""schemas/asyncapi.yaml says who sends and who receives, in AsyncAPI 3's own terms: checked by the
official parser, against the AsyncAPI 3.0 JSON Schema, and against what the running components do.

The live test runs statestore, scheduler and two executors as processes on a broker of its own that
logs every SUBSCRIBE and PUBLISH with its client id, drives a deploy, a migration, a suspend and a
resume (plus the CLI, `ferry watch`, the simulator, the stack's status checks and a few malformed
messages), and compares the (component, action, channel) triples it saw with the operations the
document declares, in both directions.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
import yaml
from jsonschema import Draft7Validator

from services.common import contract, images, topics
from services.common.blobstore import BlobStore
from services.common.config import FerryConfig
from tests.conftest import ServiceProcesses, stack_config, wait_online
from tools.cli.main import publish_one
from tools.cli.operator import Operator
from tools.cli.simulate import Simulator, connect_paho, publish_mobility
from tools.stack import mosquitto
from tools.stack import mqtt as stack_mqtt
from tools.stack.ports import free_ports

NODE_TOOLS = Path(__file__).resolve().parent / "asyncapi"  # package.json + check.mjs
NODE_MODULES = NODE_TOOLS / "node_modules"
ASYNCAPI_3_0_SCHEMA = NODE_MODULES / "@asyncapi" / "specs" / "schemas" / "3.0.0.json"
REQUEST_CHANNELS = ("nodeCommands", "schedulerCommands", "statestoreRequests", "statestoreQueries")
NODES = ("edge-a", "edge-b")

# Operations the live test does not exercise, each with the reason.
NOT_EXERCISED = {
    "deviceSendAppInput": "no real IoT device runs here; the simulator plays one",
    "deviceReceiveAppOutput": "no real IoT device runs here; the simulator plays one",
    "deviceSendMobility": "no real IoT device runs here; the simulator plays one",
}

# Client id → component (asyncapi.yaml's components.tags say the same in words).
CLIENT_COMPONENTS = (
    (re.compile(r"ferry-executor-.+"), "executor"),
    (re.compile(r"ferry-svc-.+"), "executor"),  # a service's own input session
    (re.compile(r"ferry-scheduler"), "scheduler"),
    (re.compile(r"ferry-statestore"), "statestore"),
    (re.compile(r"ferry-cli-.+"), "cli"),
    (re.compile(r"ferry-watch-.+"), "watch"),
    (re.compile(r"ferry-(sim|mobility)-.+"), "simulator"),
    (re.compile(r"ferry-stack-.+"), "stack"),
)
TEST_CLIENT = re.compile(r"test-.+")  # this test's own clients, not a component


@dataclass(frozen=True)
class Operation:
    id: str
    component: str
    action: str
    channel: str
    reply: str | None


@cache
def document() -> dict[str, Any]:
    return yaml.safe_load(contract.ASYNCAPI_FILE.read_text())


def _local(ref: dict[str, str], section: str) -> str:
    prefix = f"#/{section}/"
    assert ref["$ref"].startswith(prefix), ref
    return ref["$ref"].removeprefix(prefix)


def operations() -> list[Operation]:
    """The document's operations, each with the one component its tag names."""
    tags = document()["components"]["tags"]
    found = []
    for op_id, op in document()["operations"].items():
        names = [tags[_local(tag, "components/tags")]["name"] for tag in op.get("tags", [])]
        assert len(names) == 1, f"{op_id} must name exactly one component, names {names}"
        reply = _local(op["reply"]["channel"], "channels") if "reply" in op else None
        channel = _local(op["channel"], "channels")
        found.append(Operation(op_id, names[0], op["action"], channel, reply))
    return found


def declared() -> dict[tuple[str, str, str], str]:
    """(component, action, channel) → the operation that declares it, replies included: a
    request's sender receives on the reply channel, its receiver sends there."""
    triples: dict[tuple[str, str, str], str] = {}
    for op in operations():
        triples[(op.component, op.action, op.channel)] = op.id
        if op.reply is not None:
            back = "receive" if op.action == "send" else "send"
            triples.setdefault((op.component, back, op.reply), f"{op.id}.reply")
    return triples


# -- the document on its own ------------------------------------------------------------------


def _keys(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield key
            yield from _keys(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _keys(inner)


def test_no_extension_says_who_sends_or_receives() -> None:
    assert not [k for k in _keys(document()) if k.startswith("x-")]


def test_every_operation_names_a_component_and_a_declared_channel() -> None:
    ops = operations()
    channels = document()["channels"]
    assert {op.channel for op in ops} <= set(channels)
    assert {op.action for op in ops} <= {"send", "receive"}
    for name in channels:
        if name == "replies":
            continue  # only ever the channel of a reply
        lacking = {"send", "receive"} - {op.action for op in ops if op.channel == name}
        assert not lacking, f"nobody does {lacking} on {name}"


def test_every_request_and_only_requests_have_a_reply() -> None:
    """Of those taking part: `ferry watch` reads every channel and answers nothing."""
    for op in operations():
        if op.component == "watch":
            assert op.action == "receive" and op.reply is None, op.id
        elif op.channel in REQUEST_CHANNELS:
            assert op.reply == "replies", f"{op.id} is a request/response without its reply"
        else:
            assert op.reply is None, f"{op.id}: {op.channel} carries no requests"
    direct = [op.id for op in operations() if op.channel == "replies" and op.component != "watch"]
    assert not direct, "replies are sent and received only as the reply of a request"


def test_the_scheduler_subscribes_to_neither_heartbeats_nor_service_state() -> None:
    """The spec once listed both; the scheduler reads node status and changes, its own retained
    cordons, mobility and its commands."""
    ops = {(op.action, op.channel) for op in operations() if op.component == "scheduler"}
    receives = {channel for action, channel in ops if action == "receive"}
    assert receives == {
        "schedulerCommands",
        "nodeStatus",
        "nodeCordon",
        "nodeChanges",
        "mobility",
    }


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the official AsyncAPI parser (JavaScript) cannot run")
    if not (NODE_MODULES / "@asyncapi" / "parser").is_dir():
        pytest.skip(f"@asyncapi/parser is not installed in {NODE_MODULES}: run deploy/setup.sh")
    return node


def run_parser(path: Path) -> dict[str, Any]:
    done = subprocess.run(
        [_node(), str(NODE_TOOLS / "check.mjs"), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_the_official_parser_accepts_the_document_and_reads_it_as_we_do() -> None:
    result = run_parser(contract.ASYNCAPI_FILE)
    # severity: 0 error, 1 warning, 2 information, 3 hint
    serious = [d for d in result["diagnostics"] if d["severity"] <= 1]
    assert not serious, serious
    assert result["operations"] is not None
    seen = {
        (o["id"], *(o["tags"] or [None])[:1], o["action"], tuple(o["channels"]), o["reply"])
        for o in result["operations"]
    }
    ours = {(op.id, op.component, op.action, (op.channel,), op.reply) for op in operations()}
    assert seen == ours


def test_the_official_parser_refuses_a_broken_document(tmp_path: Path) -> None:
    """So the test above can fail: an operation on a channel that does not exist."""
    broken = yaml.safe_load(contract.ASYNCAPI_FILE.read_text())
    broken["operations"]["executorSendStatus"]["channel"] = {"$ref": "#/channels/noSuchChannel"}
    path = tmp_path / "asyncapi.yaml"
    path.write_text(yaml.safe_dump(broken))
    for schema in contract.SCHEMA_DIR.glob("*.schema.json"):
        shutil.copy(schema, tmp_path / schema.name)
    result = run_parser(path)
    assert result["operations"] is None
    assert [d for d in result["diagnostics"] if d["severity"] == 0]


def asyncapi_3_0() -> Draft7Validator:
    if not ASYNCAPI_3_0_SCHEMA.is_file():
        pytest.skip(f"@asyncapi/specs is not installed in {NODE_MODULES}: run deploy/setup.sh")
    schema = orjson.loads(ASYNCAPI_3_0_SCHEMA.read_bytes())
    Draft7Validator.check_schema(schema)
    return Draft7Validator(schema)


def test_the_document_is_valid_against_the_asyncapi_3_0_json_schema() -> None:
    validator = asyncapi_3_0()
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document())]
    assert not errors
    old_style = yaml.safe_load(contract.ASYNCAPI_FILE.read_text())
    old_style["operations"]["executorSendStatus"]["action"] = "publish"  # AsyncAPI 2's word
    assert not validator.is_valid(old_style)


# -- the document against the running code ----------------------------------------------------


class BrokerLog:
    """Reads a Mosquitto debug log: who subscribed to what, who published where, whose will."""

    SUBSCRIBE = re.compile(r"^[^ \t]+: Received SUBSCRIBE from (\S+)$")
    FILTER = re.compile(r"^[^ \t]+: \t(\S+) \(QoS \d\)$")
    PUBLISH = re.compile(r"^[^ \t]+: Received PUBLISH from (\S+) \(d\d, q\d, r\d, m\d+, '([^']*)'")
    CONNECTED = re.compile(r"^[^ \t]+: New client connected from \S+ as (\S+) ")
    WILL = re.compile(r"^[^ \t]+: Will message specified")
    WILL_TOPIC = re.compile(r"^[^ \t]+: \t(\S+)$")

    def __init__(self, path: Path) -> None:
        self.path = path

    def actions(self) -> set[tuple[str, str, str]]:
        """(client id, "send" | "receive", topic or filter), wills counted as sends."""
        found: set[tuple[str, str, str]] = set()
        subscriber = connected = None
        will = False
        for line in self.path.read_text(errors="replace").splitlines():
            if match := self.SUBSCRIBE.match(line):
                subscriber, will = match[1], False
            elif subscriber and (match := self.FILTER.match(line)):
                found.add((subscriber, "receive", match[1]))
            elif will and connected and (match := self.WILL_TOPIC.match(line)):
                found.add((connected, "send", match[1]))
                will = False
            else:
                subscriber = None
                if match := self.PUBLISH.match(line):
                    found.add((match[1], "send", match[2]))
                elif match := self.CONNECTED.match(line):
                    connected, will = match[1], False
                elif self.WILL.match(line):
                    will = True
        return found


def component_of(client_id: str) -> str | None:
    if TEST_CLIENT.fullmatch(client_id):
        return None
    for pattern, component in CLIENT_COMPONENTS:
        if pattern.fullmatch(client_id):
            return component
    raise AssertionError(f"client {client_id!r} belongs to no known component")


def channels_of(topic_filter: str) -> set[str]:
    """The channels a publish topic or a subscription filter covers."""
    if "#" in topic_filter:
        samples = {c.name: re.sub(r"\{[a-z_]+\}", "x", c.address) for c in contract.channels()}
        return {
            name for name, sample in samples.items() if paho.topic_matches_sub(topic_filter, sample)
        }
    return {contract.channel_for(topic_filter.replace("+", "x")).name}


def observed(log: BrokerLog) -> dict[tuple[str, str, str], str]:
    """(component, action, channel) → one client id and topic that showed it."""
    requesters = {op.component for op in operations() if op.action == "send" and op.reply}
    seen: dict[tuple[str, str, str], str] = {}
    for client, action, topic in log.actions():
        component = component_of(client)
        if component is None:
            continue
        for channel in channels_of(topic):
            inbox = channel == "replies" and action == "receive" and topic.endswith(f"/{client}")
            if inbox and component not in requesters:
                continue  # every Bus subscribes to its own inbox; one that never asks gets nothing
            seen.setdefault((component, action, channel), f"{client} {action} {topic}")
    return seen


@pytest.fixture(scope="module")
def logged_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, BrokerLog]]:
    """A Mosquitto of this module's own, configured as the stack configures it plus a debug log."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    directory = tmp_path_factory.mktemp("logged-broker")
    log = directory / "mosquitto.log"
    (port,) = free_ports("127.0.0.1", 1)
    conf = mosquitto.write_config(directory, "127.0.0.1", port, log)
    conf.write_text(conf.read_text() + "log_type debug\n")
    proc = subprocess.Popen(
        mosquitto.argv(binary, conf),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, f"mosquitto exited: {log.read_text(errors='replace')}"
                assert time.monotonic() < deadline, "mosquitto did not listen"
                time.sleep(0.05)
        yield port, BrokerLog(log)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


@pytest.fixture(scope="module")
def live_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("asyncapi-live")


@pytest.fixture(scope="module")
async def live(
    infra: FerryConfig,
    logged_broker: tuple[int, BrokerLog],
    live_dir: Path,
    unikernel_builds: Path,
) -> AsyncIterator[FerryConfig]:
    port, _ = logged_broker
    config, _ = stack_config(
        infra,
        live_dir,
        FERRY_BROKER__PORT=str(port),
        FERRY_SCHEDULER__PHASE_TIMEOUT="8",
    )
    await images.push(BlobStore(config.s3), "counter", unikernel_builds)
    status_topics = [topics.component_status(c) for c in ("statestore", "scheduler")] + [
        topics.node_status(n) for n in NODES
    ]
    # The stack's own checks, as `ferry up` runs them before it starts the components.
    host = config.broker.host
    await asyncio.to_thread(stack_mqtt.clear_retained, host, port, status_topics)
    watcher = stack_mqtt.StatusWatcher(host, port, status_topics)
    await watcher.start()
    procs = ServiceProcesses(live_dir / "ferry.toml", live_dir)
    try:
        procs.start("statestore")
        procs.start("scheduler")
        for node in NODES:
            procs.start(f"executor@{node}", "--node", node)
        await wait_online(config, status_topics)
        procs.start("cli@watch", "watch")  # `ferry watch`, until the end of the module
        yield config
    finally:
        procs.stop_all()
        await watcher.close()


def publish_raw(config: FerryConfig, messages: list[tuple[str, bytes]]) -> None:
    """Send payloads the bus would refuse to send, as a careless client would."""
    client = connect_paho(config.broker, f"test-raw-{uuid.uuid4().hex[:6]}")
    try:
        requests = {topics.SCHEDULER_COMMANDS, topics.STATESTORE_REQUESTS}
        for topic, body in messages:
            props = paho.Properties(paho.PacketTypes.PUBLISH)
            if topic in requests or topic.endswith("/commands"):  # asks, so expects an answer
                props.ResponseTopic = topics.replies("anonymous", "test-raw")
                props.CorrelationData = b"1"
            client.publish(topic, body, qos=1, properties=props).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


async def test_each_component_does_what_its_operations_declare(
    live: FerryConfig, logged_broker: tuple[int, BrokerLog]
) -> None:
    _, log = logged_broker
    service, device = f"aapi-{uuid.uuid4().hex[:5]}", f"dev-{uuid.uuid4().hex[:5]}"
    async with Operator(live) as ops:
        await ops.command("deploy", service=service, app="counter", node="edge-a", runtime="unix")
        await ops.wait_serving(service)
        simulator = Simulator(live.broker, service, devices=1, rate=20)
        simulator.start()
        await asyncio.sleep(1)
        assert (await ops.move("migrate", service, "edge-b"))["phase"] == "committed"
        assert (await ops.move("suspend", service))["phase"] == "committed"
        assert (await ops.move("resume", service, "edge-a"))["phase"] == "committed"
        one = orjson.dumps({"producer": "by-hand", "seq": 1, "data": {}})
        await asyncio.to_thread(publish_one, live.broker, topics.app_input(service), one)
        await ops.command("cordon", node="edge-b", reason="asyncapi check")
        await ops.command("uncordon", node="edge-b")
        await asyncio.to_thread(publish_mobility, live.broker, device, "edge-b")
        await asyncio.sleep(1)
        # Malformed messages: each receiver reports them on ferry/v1/errors, and the executor
        # sets a bad input aside as a dead letter.
        bad = b'{"bogus": 1}'
        await asyncio.to_thread(
            publish_raw,
            live,
            [
                (topics.node_commands("edge-a"), bad),
                (topics.SCHEDULER_COMMANDS, bad),
                (topics.STATESTORE_REQUESTS, bad),
                (topics.migration_events("m-bogus"), bad),
                (topics.app_input(service), bad),
            ],
        )
        expected = {t: op for t, op in declared().items() if op.split(".")[0] not in NOT_EXERCISED}
        deadline = time.monotonic() + 30
        # Polls the broker's log file: nothing to wait on but time.
        while (missing := set(expected) - set(observed(log))) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
        assert not missing, f"declared but never seen: {sorted(expected[t] for t in missing)}"
        report = await asyncio.to_thread(simulator.finish)
        assert report.ok, report.verdict()
        await ops.command("stop", service=service)
    seen = observed(log)
    undeclared = {t: how for t, how in seen.items() if t not in declared()}
    assert not undeclared, f"the code does what no operation declares: {undeclared}"
    unexercised = [op for t, op in declared().items() if t in seen and op in NOT_EXERCISED]
    assert not unexercised, f"marked not exercised but seen: {unexercised}"
