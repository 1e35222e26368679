"""The in-sandbox half of ``bench/network.py``: stdlib only, fed to the sandbox's
``/usr/bin/python3`` on stdin. The same code drives both paths to one server, so the only
difference between them is the route: ``direct`` connects to ADDRESS:PORT (allowed by a
CIDR rule); ``proxied`` opens a CONNECT tunnel to NAME:PORT through the policy proxy named
in ``$HTTPS_PROXY`` (a hostname rule; the proxy resolves NAME to the same ADDRESS).

    python3 - ADDRESS NAME PORT MEGABYTES ROUNDS CONNECTIONS < network_client.py

Throughput: one warm-up round per path, then ROUNDS downloads of MEGABYTES MiB each, paths
in a shuffled order each round. Latency: connect (+ CONNECT and its 200), one byte each way,
close; CONNECTIONS per path, paths shuffled per connection. Prints one JSON object: MB/s
per round and milliseconds per connection, by path."""

import json
import os
import random
import socket
import sys
import time
from collections.abc import Callable

ADDRESS, NAME = sys.argv[1], sys.argv[2]
PORT, MEGABYTES, ROUNDS, CONNECTIONS = (int(a) for a in sys.argv[3:7])
PROXY = os.environ["HTTPS_PROXY"].rsplit("/", 1)[-1].rsplit(":", 1)
BUFFER = memoryview(bytearray(1 << 20))


def direct() -> socket.socket:
    return socket.create_connection((ADDRESS, PORT))


def proxied() -> socket.socket:
    conn = socket.create_connection((PROXY[0], int(PROXY[1])))
    conn.sendall(f"CONNECT {NAME}:{PORT} HTTP/1.1\r\nHost: {NAME}:{PORT}\r\n\r\n".encode())
    reply = conn.recv(4096)
    if not reply.startswith(b"HTTP/1.1 200"):
        sys.exit(f"proxy refused: {reply[:200]!r}")
    return conn


def download(connect: Callable[[], socket.socket], megabytes: int) -> float:
    """MB/s of one download of ``megabytes`` MiB; the server closes after the last byte."""
    start = time.perf_counter()
    received = 0
    with connect() as conn:
        conn.sendall(b"GET %d\n" % megabytes)
        while count := conn.recv_into(BUFFER):
            received += count
    assert received == megabytes << 20, received
    return received / 1e6 / (time.perf_counter() - start)


def probe(connect: Callable[[], socket.socket]) -> float:
    start = time.perf_counter()
    with connect() as conn:
        conn.sendall(b"!")
        conn.recv(1)
    return (time.perf_counter() - start) * 1000


paths = {"direct": direct, "proxied": proxied}
rates: dict[str, list[float]] = {name: [] for name in paths}
latencies: dict[str, list[float]] = {name: [] for name in paths}
for connect in paths.values():
    download(connect, MEGABYTES // 4)  # warm-up
for _ in range(ROUNDS):
    for name in random.sample(list(paths), len(paths)):
        rates[name].append(download(paths[name], MEGABYTES))
for _ in range(20):  # warm-up
    for connect in paths.values():
        probe(connect)
for _ in range(CONNECTIONS):
    for name in random.sample(list(paths), len(paths)):
        latencies[name].append(probe(paths[name]))
print(json.dumps({"rates": rates, "latencies": latencies}))
