"""A TCP sink and source for measuring a lab link's throughput (run inside lab namespaces).

python tcp_probe.py sink HOST PORT       accept one connection, read to EOF, print JSON
                                         {"bytes": n, "seconds": first byte -> EOF}
python tcp_probe.py send HOST PORT BYTES connect (retrying for 5 s), send BYTES, close
"""

from __future__ import annotations

import json
import socket
import sys
import time

CHUNK = 64 * 1024


def sink(host: str, port: int) -> None:
    with socket.create_server((host, port)) as server:
        print("listening", flush=True)
        conn, _ = server.accept()
        with conn:
            received, first = 0, None
            while data := conn.recv(CHUNK):
                if first is None:
                    first = time.monotonic()
                received += len(data)
            end = time.monotonic()
    print(json.dumps({"bytes": received, "seconds": end - (first or end)}), flush=True)


def send(host: str, port: int, total: int) -> None:
    deadline = time.monotonic() + 5
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with conn:
        conn.settimeout(None)
        block = b"\0" * CHUNK
        left = total
        while left > 0:
            conn.sendall(block[: min(left, CHUNK)])
            left -= CHUNK
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)  # the sink closes after reading everything


if __name__ == "__main__":
    if sys.argv[1] == "sink":
        sink(sys.argv[2], int(sys.argv[3]))
    else:
        send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
