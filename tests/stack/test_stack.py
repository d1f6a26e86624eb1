"""The local stack against real components: memcached, Swift, Mosquitto and a stand-in service.

No mocks: every test starts real processes in its own directory on free ports, and talks S3 and
MQTT to them the way the Ferry services do.
"""

from __future__ import annotations

import asyncio
import io
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest
from minio import Minio

from services.common import topics
from services.common.config import FerryConfig, load_config
from tools.stack import ServiceSpec, Stack, StackError, StackInfo
from tools.stack.process import is_alive

STANDIN = Path(__file__).with_name("standin_service.py")
STANDIN_TOPIC = topics.component_status("standin")


def make_config(directory: Path, extra: str = "") -> FerryConfig:
    """A config file of our own, so a developer's ``.ferry/ferry.toml`` cannot leak in."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "test.toml"
    path.write_text(f'[stack]\ndir = "{directory / "ferry"}"\n{extra}')
    return load_config(path, env={})


def standin(config: FerryConfig, *extra: str, name: str = "standin") -> ServiceSpec:
    config_path = config.stack.dir.resolve() / "ferry.toml"
    argv = (sys.executable, str(STANDIN), "--config", str(config_path), "--topic", STANDIN_TOPIC)
    return ServiceSpec(name=name, argv=(*argv, *extra), status_topic=STANDIN_TOPIC)


def minio_client(config: FerryConfig) -> Minio:
    s3 = config.s3
    return Minio(s3.endpoint, s3.access_key, s3.secret_key, region=s3.region, secure=False)


@pytest.fixture(scope="module")
async def running(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[StackInfo]:
    config = make_config(tmp_path_factory.mktemp("running"))
    stack = Stack(config, services=[standin(config)])
    started = time.monotonic()
    info = await stack.up(progress=print)
    print(f"up took {time.monotonic() - started:.2f} s")
    yield info
    await stack.down()


async def test_s3_put_get(running: StackInfo) -> None:
    client = minio_client(running.config)
    data = b"ferry checkpoint bytes " * 1000

    def round_trip() -> bytes:
        client.put_object(running.config.s3.bucket, "t/blob", io.BytesIO(data), len(data))
        response = client.get_object(running.config.s3.bucket, "t/blob")
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    assert await asyncio.to_thread(round_trip) == data


async def test_mqtt_round_trip(running: StackInfo) -> None:
    broker = running.config.broker
    async with aiomqtt.Client(
        broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5
    ) as client:
        await client.subscribe("ferry/v1/test/echo", qos=1)
        await client.publish("ferry/v1/test/echo", b"hello", qos=1)
        async with asyncio.timeout(5):
            message = await anext(aiter(client.messages))
    assert message.payload == b"hello"


async def test_status_shows_every_part_ready(running: StackInfo) -> None:
    statuses = await Stack(running.config).status()
    assert [s.name for s in statuses] == [
        "memcached",
        "mosquitto",
        "swift-account",
        "swift-container",
        "swift-object",
        "swift-proxy",
        "standin",
    ]
    not_ready = [s for s in statuses if not (s.alive and s.ready)]
    assert not not_ready
    assert "online" in statuses[-1].detail


async def test_resolved_config_reaches_services(running: StackInfo) -> None:
    written = load_config(running.config_path, env={})
    assert written.broker.port == running.config.broker.port != 1883
    assert written.s3.endpoint == running.config.s3.endpoint != "127.0.0.1:9000"
    assert "online on" in (running.dir / "logs" / "standin.log").read_text()


async def test_second_up_is_refused(running: StackInfo) -> None:
    with pytest.raises(StackError, match="already up") as caught:
        await Stack(running.config).up()
    assert caught.value.part == "stack"
    assert all(s.ready for s in await Stack(running.config).status())


async def test_down_stops_everything_and_keeps_logs(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    await Stack(config, services=[standin(config)]).up()
    stack = Stack(config)  # a different instance, as `ferry down` in another process would be
    pids = [(s.pid, s.name) for s in await stack.status()]
    started = time.monotonic()
    await stack.down()
    print(f"down took {time.monotonic() - started:.2f} s")
    assert [name for pid, name in pids if pid is not None and is_alive(pid, 0)] == []
    assert await stack.status() == []
    assert (stack.log_dir / "swift-proxy.log").stat().st_size > 0
    await stack.down()  # nothing runs: a no-op


async def test_bogus_memcached_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "memcached"
    fake.write_text("#!/bin/sh\necho 'memcached: bogus build, refusing to start' >&2\nexit 71\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/bin")
    config = make_config(tmp_path)
    stack = Stack(config, services=[])
    with pytest.raises(StackError) as caught:
        await stack.up()
    assert caught.value.part == "memcached"
    assert "status 71" in str(caught.value)
    assert "bogus build" in str(caught.value)
    assert await stack.status() == []  # what had started was stopped again


async def test_occupied_s3_port_is_named(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        config = make_config(tmp_path, f'[s3]\nendpoint = "127.0.0.1:{port}"\n')
        with pytest.raises(StackError, match="already in use") as caught:
            await Stack(config).up()
    assert caught.value.part == "swift-proxy"


async def test_service_that_dies_is_named_with_its_log(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    stack = Stack(config, services=[standin(config, "--fail", "no schema for topic X")])
    with pytest.raises(StackError) as caught:
        await stack.up()
    assert caught.value.part == "standin"
    assert caught.value.log == stack.log_dir / "standin.log"
    assert any("no schema for topic X" in line for line in caught.value.log_tail)
    assert await stack.status() == []


async def test_restart_from_written_config_reuses_free_ports(tmp_path: Path) -> None:
    first = await Stack(make_config(tmp_path), services=[]).up()
    await Stack(first.config).down()
    again = load_config(first.config_path, env={})  # what `ferry up` reads the second time
    with socket.socket() as squatter:  # someone took the old S3 port meanwhile
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # it is in TIME_WAIT
        squatter.bind(("127.0.0.1", int(first.config.s3.endpoint.rpartition(":")[2])))
        squatter.listen()
        stack = Stack(again, services=[])
        second = await stack.up()
    try:
        assert second.config.broker.port == first.config.broker.port
        assert second.config.s3.endpoint != first.config.s3.endpoint
        assert all(s.ready for s in await stack.status())
    finally:
        await stack.down()
