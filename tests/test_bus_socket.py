"""The bus's sockets: the wrapper (``_FastSocket``) over real TLS (every record readable is taken
in one read, and an end of stream or error met after data reaches paho only after that data),
and a connection opened early for a later bus (``open_connection``), against the real broker."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common import bus as bus_module
from services.common import topics
from services.common.bus import Bus, _FastSocket
from services.common.config import FerryConfig
from tools.stack import pki

RECORDS = [b"a" * 100, b"b" * 300, b"c" * 5000]


@pytest.fixture(scope="module")
def local_pki(tmp_path_factory: pytest.TempPathFactory) -> pki.LocalPKI:
    return pki.ensure(tmp_path_factory.mktemp("pki"), ["127.0.0.1"], [])


@pytest.fixture
def tls_pair(local_pki: pki.LocalPKI) -> Iterator[tuple[ssl.SSLSocket, ssl.SSLSocket]]:
    """A connected (client, server) pair of TLS sockets, the client non-blocking as paho's."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(local_pki.server.cert, local_pki.server.key)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(Path(local_pki.ca))
    raw_client, raw_server = socket.socketpair()
    accepted: list[ssl.SSLSocket] = []
    accepting = threading.Thread(
        target=lambda: accepted.append(server_ctx.wrap_socket(raw_server, server_side=True))
    )
    accepting.start()
    client = client_ctx.wrap_socket(raw_client, server_hostname="127.0.0.1")
    accepting.join(10)
    client.setblocking(False)
    yield client, accepted[0]
    client.close()
    accepted[0].close()


async def test_every_readable_tls_record_is_taken_in_one_read(
    tls_pair: tuple[ssl.SSLSocket, ssl.SSLSocket],
) -> None:
    client, server = tls_pair
    for record in RECORDS:
        server.sendall(record)  # one TLS record each, as Mosquitto writes one per packet
    await asyncio.sleep(0.2)
    wrapped = _FastSocket(client, asyncio.get_running_loop())
    assert wrapped.recv(1) == b"a"
    # A plain TLS read would have returned the first record only (pending 99).
    assert wrapped.pending() == sum(map(len, RECORDS)) - 1
    rest = b"".join(iter(lambda: wrapped.recv(4096) if wrapped.pending() else b"", b""))
    assert b"a" + rest == b"".join(RECORDS)
    with pytest.raises(ssl.SSLWantReadError):
        wrapped.recv(1)  # nothing more: paho's "try again later", as without the wrapper


async def test_end_of_stream_after_data_comes_after_the_data(
    tls_pair: tuple[ssl.SSLSocket, ssl.SSLSocket],
) -> None:
    client, server = tls_pair
    for record in RECORDS:
        server.sendall(record)
    server.close()  # the end of the TCP stream (no close_notify: a ragged end, read as one)
    await asyncio.sleep(0.2)
    wrapped = _FastSocket(client, asyncio.get_running_loop())
    taken = wrapped.recv(64 * 1024)
    while wrapped.pending() and len(taken) < sum(map(len, RECORDS)):
        taken += wrapped.recv(64 * 1024)
    assert taken == b"".join(RECORDS)
    assert wrapped.pending() > 0  # the end is still to be told: aiomqtt's reader reads on
    assert wrapped.recv(1) == b""


async def test_a_bus_connects_on_the_connection_opened_early(infra: FerryConfig) -> None:
    """A move's target opens its input session's connection while it pre-boots: the session's
    connect (inside the downtime) then only sends CONNECT, on that very socket."""
    client_id = f"t-early-{uuid.uuid4().hex[:6]}"
    early = bus_module.open_connection(infra.broker, client_id)
    await asyncio.sleep(0.5)  # opened (and over TLS, handshaken) meanwhile
    opened = early._task.result()
    address = opened.getsockname()
    async with Bus(infra.broker, client_id, connection=early) as bus:
        assert bus._client is not None
        assert bus._client._client._sock.getsockname() == address
        await bus.publish(topics.app_input("early"), {"producer": "p", "seq": 1, "data": {}})


async def test_a_stale_early_connection_is_closed_not_used(
    infra: FerryConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    client_id = f"t-stale-{uuid.uuid4().hex[:6]}"
    early = bus_module.open_connection(infra.broker, client_id)
    await asyncio.sleep(0.5)
    opened = early._task.result()
    address = opened.getsockname()
    monkeypatch.setattr(bus_module, "EARLY_CONNECTION_MAX_AGE", 0.0)  # older than Mosquitto keeps
    async with Bus(infra.broker, client_id, connection=early) as bus:
        assert bus._client is not None
        assert bus._client._client._sock.getsockname() != address
    assert opened.fileno() == -1  # closed


async def test_an_early_connection_the_broker_closed_is_not_used() -> None:
    """One a broker dropped (it restarted meanwhile) would cost the bus a CONNACK timeout."""
    server = socket.create_server(("127.0.0.1", 0))
    loop = asyncio.get_running_loop()
    opened = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    alive: asyncio.Future[socket.socket] = loop.create_future()
    alive.set_result(opened)
    assert bus_module.EarlyConnection(alive).take() is opened
    accepted.close()  # the broker's side ends
    await asyncio.sleep(0.1)
    dropped: asyncio.Future[socket.socket] = loop.create_future()
    dropped.set_result(opened)
    assert bus_module.EarlyConnection(dropped).take() is None
    assert opened.fileno() == -1  # closed
    server.close()


async def test_an_early_tls_connection_is_open_until_its_peer_ends_it(
    tls_pair: tuple[ssl.SSLSocket, ssl.SSLSocket],
) -> None:
    client, server = tls_pair
    await asyncio.sleep(0.1)  # the server's TLS 1.3 session tickets arrive: not "data"
    assert bus_module._still_open(client)
    server.close()
    await asyncio.sleep(0.1)
    assert not bus_module._still_open(client)
