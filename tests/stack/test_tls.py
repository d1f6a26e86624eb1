"""TLS on the local stack as `ferry up` runs it: Mosquitto with mutual TLS and Swift's proxy over
https, from the stack's own CA (tools/stack/pki.py), every component with its own client
certificate. The rest of the suite runs plaintext stacks (tests/conftest.py says why); these
tests start a TLS one of their own, with the real statestore, scheduler and two executors.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import os
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from cryptography import x509

from services.common import images, topics
from services.common.blobstore import BlobError, BlobStore
from services.common.bus import Bus, BusError, RemoteError
from services.common.config import FerryConfig, load_config
from services.common.tls import TLSError
from tests.conftest import REPO
from tools.cli.operator import Operator
from tools.cli.simulate import Simulator, connect_paho
from tools.stack import Stack, StackInfo, pki

NODES = ("edge-a", "edge-b")
#: The broker logins of the components (certificate CNs): an executor's is its node's name.
LOGINS = ("statestore", "scheduler", *NODES)


@pytest.fixture(scope="module")
async def tls_stack(
    tmp_path_factory: pytest.TempPathFactory, unikernel_builds: Path
) -> AsyncIterator[StackInfo]:
    """The whole local stack, as `ferry up` starts it by default (TLS on)."""
    directory = tmp_path_factory.mktemp("tls-stack")
    config = load_config(
        env={
            "FERRY_STACK__DIR": str(directory),
            "FERRY_STACK__TLS": "true",
            "FERRY_STACK__NODES": ",".join(NODES),
            "FERRY_EXECUTOR__RUNTIMES": "unix,microvm",
            "FERRY_EXECUTOR__ACCEL": "tcg",
            "FERRY_EXECUTOR__HEARTBEAT_INTERVAL": "1.0",
        }
    )
    stack = Stack(config)
    info = await stack.up()
    try:
        store = BlobStore(info.config.s3)
        await images.push(store, "counter", unikernel_builds)
        yield info
    finally:
        await stack.down()


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> pki.LocalPKI:
    """A second CA, as an attacker's or another site's, with a client certificate of its own."""
    return pki.ensure(tmp_path_factory.mktemp("other-ca"), ["127.0.0.1"], ["intruder"])


def without_tls(config: FerryConfig) -> FerryConfig:
    broker = dataclasses.replace(config.broker, tls=False, tls_ca="", tls_cert="", tls_key="")
    return dataclasses.replace(config, broker=broker)


# -- what `ferry up` wrote ---------------------------------------------------------------------


async def test_ferry_up_points_every_client_at_its_ca_and_certificate(
    tls_stack: StackInfo,
) -> None:
    config = load_config(tls_stack.config_path, env={})
    tls_dir = tls_stack.dir / "tls"
    assert config.broker.tls and config.s3.secure
    assert config.broker.tls_ca == config.s3.ca == str(tls_dir / "ca.pem")
    assert config.broker.tls_cert == str(tls_dir / "operator.pem")
    conf = (tls_stack.dir / "mosquitto" / "mosquitto.conf").read_text()
    assert "require_certificate true" in conf and f"cafile {tls_dir / 'ca.pem'}" in conf
    assert (
        f"cert_file = {tls_dir / 'server.pem'}"
        in (tls_stack.dir / "swift" / "proxy-server.conf").read_text()
    )
    for key in tls_dir.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key


async def test_each_component_logs_in_with_a_certificate_of_its_own(tls_stack: StackInfo) -> None:
    """The broker takes the username from the client certificate's CN: the log shows each
    component connected as itself, not with a certificate they share."""
    log = (tls_stack.dir / "logs" / "mosquitto.log").read_text()
    for login in (*LOGINS, "stack"):
        assert f"u'{login}'" in log, login


def acl_rules(text: str) -> dict[str, set[str]]:
    """An ACL file as {user (or "" for the patterns before any user): its rule lines}."""
    rules: dict[str, set[str]] = {"": set()}
    user = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("user "):
            user = line.split()[1]
            rules[user] = set()
        else:
            rules[user].add(line)
    return rules


async def test_ferry_up_holds_each_login_to_the_production_acl(tls_stack: StackInfo) -> None:
    """The ACL is deploy/mosquitto/acl for the stack's nodes (plus the stack's own login), and
    the identity it applies is the certificate's: edge-a's certificate claiming the operator's
    username can neither command the scheduler nor read edge-b's commands."""
    shipped = acl_rules((REPO / "deploy" / "mosquitto" / "acl").read_text())
    local = acl_rules((tls_stack.dir / "mosquitto" / "acl").read_text())
    assert set(local) - set(shipped) == {"stack"}
    assert all(local[user] == rules for user, rules in shipped.items())

    config = tls_stack.config
    tls_dir = tls_stack.dir / "tls"
    edge_a = dataclasses.replace(
        config.broker,
        tls_cert=str(tls_dir / "edge-a.pem"),
        tls_key=str(tls_dir / "edge-a.key"),
        username="operator",  # claimed; the broker takes edge-a from the certificate
    )
    intruder, legit = f"acl-x-{uuid.uuid4().hex[:5]}", f"acl-ok-{uuid.uuid4().hex[:5]}"
    async with (
        Bus(edge_a, f"test-spy-{uuid.uuid4().hex[:5]}") as spy,
        Bus(config.broker, f"test-observer-{uuid.uuid4().hex[:5]}") as observer,
        Operator(config) as ops,
    ):
        await spy.subscribe(topics.node_commands("edge-b"))
        await observer.subscribe(topics.node_commands("edge-b"))
        client = await asyncio.to_thread(connect_paho, edge_a, "test-forged", None, 5.0)
        try:
            command = {
                "command": "deploy",
                "request_id": uuid.uuid4().hex,
                "service": intruder,
                "app": "counter",
                "node": "edge-b",
                "runtime": "unix",
            }
            info = client.publish(topics.SCHEDULER_COMMANDS, orjson.dumps(command), qos=1)
            info.wait_for_publish(10)
        finally:
            client.disconnect()
            client.loop_stop()
        await ops.command("deploy", service=legit, app="counter", node="edge-b", runtime="unix")
        await ops.wait_serving(legit)
        with pytest.raises(RemoteError) as refused:
            await ops.query("get_service", service=intruder)
        assert refused.value.code == "unknown_service"
        assert observer.pending() >= 1
        await asyncio.sleep(0.5)
        assert spy.pending() == 0
        await ops.command("stop", service=legit)


async def test_a_reconnect_resumes_the_tls_session_and_keeps_its_identity(
    tls_stack: StackInfo,
) -> None:
    """An executor connects once per instance it starts (inside a migration's downtime): the
    second connection of a process resumes the first one's session (about half the cost of a
    full handshake) and the broker still knows it by its certificate."""
    broker = tls_stack.config.broker
    async with Bus(broker, "test-first"):
        pass
    second = f"test-second-{uuid.uuid4().hex[:5]}"
    async with Bus(broker, second) as bus:
        assert bus._client is not None
        assert bus._client._client._sock.session_reused
    log = (tls_stack.dir / "logs" / "mosquitto.log").read_text()
    assert f"as {second} (p5, c1, k30, u'operator')" in log


# -- the broker refuses what it must -----------------------------------------------------------


async def test_a_plaintext_client_is_refused(tls_stack: StackInfo) -> None:
    plain = without_tls(tls_stack.config)
    with pytest.raises(ConnectionError, match="connection lost before CONNACK"):
        await asyncio.to_thread(connect_paho, plain.broker, "test-plain", None, 5.0)
    with pytest.raises(BusError, match="TLS-only listener drops a plaintext client"):
        async with Bus(plain.broker, "test-plain-bus", connect_timeout=1.0):
            pass


async def test_a_client_without_a_certificate_is_refused(tls_stack: StackInfo) -> None:
    broker = dataclasses.replace(tls_stack.config.broker, tls_cert="", tls_key="")
    started = time.monotonic()
    with pytest.raises(BusError, match="refused the TLS handshake"):
        async with Bus(broker, "test-no-cert"):
            pass
    assert time.monotonic() - started < 5, "a refused certificate is final, not retried for 30 s"


async def test_a_certificate_from_another_ca_is_refused(
    tls_stack: StackInfo, other_ca: pki.LocalPKI
) -> None:
    intruder = other_ca.clients["intruder"]
    broker = dataclasses.replace(
        tls_stack.config.broker, tls_cert=str(intruder.cert), tls_key=str(intruder.key)
    )
    with pytest.raises(BusError, match="unknown ca"):
        async with Bus(broker, "test-intruder"):
            pass
    with pytest.raises(ConnectionError, match="refused the handshake"):
        await asyncio.to_thread(connect_paho, broker, "test-intruder-paho", None, 5.0)


async def test_a_broker_certificate_from_another_ca_is_not_trusted(
    tls_stack: StackInfo, other_ca: pki.LocalPKI
) -> None:
    broker = dataclasses.replace(tls_stack.config.broker, tls_ca=str(other_ca.ca))
    with pytest.raises(BusError, match=r"CERTIFICATE_VERIFY_FAILED.*broker\.tls_ca"):
        async with Bus(broker, "test-wrong-ca"):
            pass


async def test_a_missing_ca_file_is_a_clear_error_naming_the_key(tls_stack: StackInfo) -> None:
    broker = dataclasses.replace(tls_stack.config.broker, tls_ca="/nonexistent/ca.pem")
    with pytest.raises(TLSError, match=r"broker.tls_ca = '/nonexistent/ca.pem': cannot read"):
        Bus(broker, "test-missing-ca")
    s3 = dataclasses.replace(tls_stack.config.s3, ca="/nonexistent/ca.pem")
    with pytest.raises(TLSError, match=r"s3\.ca"):
        BlobStore(s3)


def ferry(config_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.cli", "--config", str(config_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


async def test_the_cli_says_what_is_wrong_without_a_traceback(
    tls_stack: StackInfo, other_ca: pki.LocalPKI
) -> None:
    ok = ferry(tls_stack.config_path, "nodes")
    assert ok.returncode == 0, ok.stderr
    assert all(node in ok.stdout for node in NODES)
    missing = ferry(tls_stack.config_path, "nodes", FERRY_BROKER__TLS_KEY="/nonexistent.key")
    assert missing.returncode != 0
    assert "broker.tls_key = '/nonexistent.key': cannot read it" in missing.stderr
    intruder = other_ca.clients["intruder"]
    refused = ferry(
        tls_stack.config_path,
        "nodes",
        FERRY_BROKER__TLS_CERT=str(intruder.cert),
        FERRY_BROKER__TLS_KEY=str(intruder.key),
    )
    assert refused.returncode != 0 and "refused the TLS handshake" in refused.stderr
    for done in (missing, refused):
        assert "Traceback" not in done.stderr


# -- S3 over https -----------------------------------------------------------------------------


async def test_s3_over_https_verifies_the_ca(tls_stack: StackInfo, other_ca: pki.LocalPKI) -> None:
    s3 = tls_stack.config.s3
    store = BlobStore(s3)
    ref = await store.put_bytes(f"tls-test/{uuid.uuid4().hex}", b"over https")
    assert await store.get_bytes(ref) == b"over https"
    wrong = BlobStore(dataclasses.replace(s3, ca=str(other_ca.ca)))
    with pytest.raises(BlobError, match=r"TLS with S3 store https://.*CERTIFICATE_VERIFY_FAILED"):
        await wrong.get_bytes(ref)
    plain = BlobStore(dataclasses.replace(s3, secure=False, ca=""))
    with pytest.raises(BlobError):
        await plain.get_bytes(ref)


# -- a whole migration -------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["unix", "microvm"])
async def test_a_service_migrates_losslessly_over_mutual_tls(
    tls_stack: StackInfo, runtime: str
) -> None:
    """Input flows from simulated devices (paho, TLS with the operator's certificate) while the
    service moves edge-a → edge-b: every component's link is mutual TLS, S3 is https."""
    config = tls_stack.config
    service = f"tls-{runtime}-{uuid.uuid4().hex[:5]}"
    async with Operator(config) as ops:
        await ops.command("deploy", service=service, app="counter", node="edge-a", runtime=runtime)
        await ops.wait_serving(service, timeout=60)
        simulator = Simulator(config.broker, service, devices=2, rate=100)
        simulator.start()
        await asyncio.sleep(1)
        moved = await ops.move("migrate", service, "edge-b")
        assert moved["phase"] == "committed", moved
        await asyncio.sleep(1)
        report = await asyncio.to_thread(simulator.finish)
        assert report.sent > 150
        assert report.lost == [] and report.duplicated == []
        assert set(report.nodes) == {"edge-a", "edge-b"}
        record = await ops.query("get_service", service=service)
        assert record["node"] == "edge-b" and record["status"] == "serving"
        await ops.command("stop", service=service)


# -- the PKI itself (no stack) -----------------------------------------------------------------


def test_pki_keeps_what_is_valid_and_reissues_what_is_missing_or_expiring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = pki.ensure(tmp_path, ["10.0.0.7"], ["scheduler"])
    ca, server = first.ca.read_bytes(), first.server.cert.read_bytes()
    san = x509.load_pem_x509_certificate(server).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert {str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)} == {
        "10.0.0.7",
        "127.0.0.1",
    }
    assert "localhost" in san.value.get_values_for_type(x509.DNSName)
    again = pki.ensure(tmp_path, ["10.0.0.7"], ["scheduler"])
    assert again.ca.read_bytes() == ca and again.server.cert.read_bytes() == server
    first.clients["scheduler"].cert.unlink()
    pki.ensure(tmp_path, ["10.0.0.7"], ["scheduler"])
    assert first.clients["scheduler"].cert.is_file() and first.ca.read_bytes() == ca
    # A host the server certificate does not name yet: re-issued, CA kept.
    pki.ensure(tmp_path, ["10.0.0.8"], [])
    assert first.server.cert.read_bytes() != server and first.ca.read_bytes() == ca
    # Everything "about to expire": a new CA, and every leaf re-issued under it.
    monkeypatch.setattr(pki, "RENEW_BEFORE", datetime.timedelta(days=100_000))
    pki.ensure(tmp_path, ["10.0.0.8"], ["scheduler"])
    assert first.ca.read_bytes() != ca
    new_ca = x509.load_pem_x509_certificate(first.ca.read_bytes())
    leaf = x509.load_pem_x509_certificate(first.clients["scheduler"].cert.read_bytes())
    leaf.verify_directly_issued_by(new_ca)


def test_one_context_per_set_of_files_until_they_change(tmp_path: Path) -> None:
    """Building a context costs tens of ms (an executor builds a Bus per instance, inside a
    migration's downtime): clients naming the same unchanged files share one."""
    from services.common import tls

    made = pki.ensure(tmp_path, [], ["scheduler"])
    pair = made.clients["scheduler"]
    broker = load_config(
        env={
            "FERRY_BROKER__TLS": "true",
            "FERRY_BROKER__TLS_CA": str(made.ca),
            "FERRY_BROKER__TLS_CERT": str(pair.cert),
            "FERRY_BROKER__TLS_KEY": str(pair.key),
        }
    ).broker
    first = tls.broker_context(broker)
    assert first is not None and tls.broker_context(broker) is first
    pair.cert.unlink()
    pki.ensure(tmp_path, [], ["scheduler"])  # re-issued: a new key and certificate
    assert tls.broker_context(broker) is not first


async def test_the_mosquitto_pub_line_of_ferry_env_works_over_mutual_tls(
    tls_stack: StackInfo,
) -> None:
    """`ferry env` prints the TLS options (CA, the operator's certificate) with its line."""
    import shlex

    config = tls_stack.config
    service = f"tls-env-{uuid.uuid4().hex[:5]}"
    async with Operator(config) as ops:
        await ops.command("deploy", service=service, app="counter", node="edge-a", runtime="unix")
        await ops.wait_serving(service)
        env = ferry(tls_stack.config_path, "env")
        assert "FERRY_BROKER=mqtts://" in env.stdout
        line = next(x for x in env.stdout.splitlines() if "mosquitto_pub" in x)
        assert "--cert" in line and "-P" not in line
        command = shlex.split(line.lstrip("# ").replace("SERVICE", service))
        async with Bus(config.broker, f"test-out-{uuid.uuid4().hex[:6]}") as reader:
            await reader.subscribe(topics.app_output(service))
            await asyncio.to_thread(subprocess.run, command, check=True, timeout=30)
            async with asyncio.timeout(15):
                async for message in reader.messages():
                    assert message.payload["data"]["count"] == 1
                    break
        await ops.command("stop", service=service)
