"""Loopback port choice: the stack takes whatever ports are free at ``up`` time."""

from __future__ import annotations

import contextlib
import random
import socket
from pathlib import Path

#: Where chosen ports start: above the well-known and most registered service ports.
PORT_FLOOR = 20000
#: Linux's default ephemeral range starts here (used when /proc cannot say).
EPHEMERAL_LOW = 32768


def free_ports(host: str, count: int) -> list[int]:
    """Return ``count`` distinct ports on ``host`` that were free a moment ago.

    Chosen below the kernel's ephemeral range: a port of that range can be handed out as the
    source port of any outgoing connection (a probe, Swift's memcached client) between the
    choice and our child binding it seconds later, and the child then fails with "address in
    use" (seen in `make demo`). All sockets stay bound until every port is chosen, so the same
    port is never chosen twice; a stranger may still take one that was free (rare).
    """
    low = _ephemeral_low()
    candidates = list(range(PORT_FLOOR, low))
    random.shuffle(candidates)
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for port in candidates:
            if len(ports) == count:
                break
            sock = stack.enter_context(socket.socket(_family(host), socket.SOCK_STREAM))
            try:
                sock.bind((host, port))
            except OSError:
                continue
            ports.append(port)
        while len(ports) < count:  # nothing free below the ephemeral range: any free port
            sock = stack.enter_context(socket.socket(_family(host), socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
        return ports


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral (automatic source port) range."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return EPHEMERAL_LOW


def port_is_free(host: str, port: int) -> bool:
    """True when nothing listens on (``host``, ``port``) and we may bind it."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``"127.0.0.1:9000"`` → ``("127.0.0.1", 9000)``; IPv6 in brackets is accepted."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"endpoint {endpoint!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
