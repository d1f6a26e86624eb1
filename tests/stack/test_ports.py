"""The stack's port choice: ports no outgoing connection can be handed meanwhile."""

from __future__ import annotations

import socket

from tools.stack.ports import PORT_FLOOR, _ephemeral_low, free_ports


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    """A port of the ephemeral range can become some connection's source port between the
    choice and the child's bind (a statestore once failed `make demo` with "address in use"
    on its metrics port that way); chosen ports stay below it."""
    ports = free_ports("127.0.0.1", 16)
    assert len(set(ports)) == 16
    assert all(PORT_FLOOR <= port < _ephemeral_low() for port in ports), ports
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
