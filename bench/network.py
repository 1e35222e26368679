"""Throughput and connection latency through Corral's policy proxy vs direct, in one run.

Everything stays on 127.0.0.1: a sink server, the proxy in front of it (CONNECT tunnels,
spliced), bounded loops. Prints figures and ratios; targets (issue 4): >= 0.8x direct
throughput, <= 1 ms added per new connection without TLS interception.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time

from corral.contract.extensions import build_corral_section
from corral.net.policy_proxy import PolicyProxy

MEGABYTES = 512
CONNECTIONS = 300
CHUNK = 1 << 20


def sink_server() -> socket.socket:
    server = socket.create_server(("127.0.0.1", 0), backlog=512)

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(CHUNK):
                if data.endswith(b"!"):  # latency probe: answer and close
                    conn.sendall(b"k")

    def loop() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return server


def open_direct(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port))


def open_proxied(proxy: int, port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", proxy))
    conn.sendall(f"CONNECT bench.test:{port} HTTP/1.1\r\nHost: bench.test:{port}\r\n\r\n".encode())
    reply = conn.recv(4096)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    return conn


def throughput(conn: socket.socket) -> float:
    block = b"x" * CHUNK
    start = time.perf_counter()
    with conn:
        for _ in range(MEGABYTES):
            conn.sendall(block)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)
    return MEGABYTES / (time.perf_counter() - start)


def latency(opener: object) -> float:
    times = []
    for _ in range(CONNECTIONS):
        start = time.perf_counter()
        conn = opener()  # type: ignore[operator]
        with conn:
            conn.sendall(b"!")
            conn.recv(1)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    server = sink_server()
    port = server.getsockname()[1]
    hosts = {"allow": [{"host": "bench.test", "ports": [port]}]}
    proxy = PolicyProxy(
        build_corral_section({"network": {"hosts": hosts}}).network,
        resolver=lambda host, p: ["127.0.0.1"],
        address_ok=lambda addr: True,  # the bench's upstream is on loopback by design
    )
    proxy.start()
    try:
        direct_tp = throughput(open_direct(port))
        proxied_tp = throughput(open_proxied(proxy.port, port))
        direct_ms = latency(lambda: open_direct(port))
        proxied_ms = latency(lambda: open_proxied(proxy.port, port))
    finally:
        proxy.stop()
        server.close()
    print(f"throughput direct   {direct_tp:8.0f} MB/s")
    print(f"throughput proxied  {proxied_tp:8.0f} MB/s   ratio {proxied_tp / direct_tp:.2f}x")
    print(f"connect+1 byte direct  {direct_ms:6.3f} ms (median of {CONNECTIONS})")
    print(f"connect+1 byte proxied {proxied_ms:6.3f} ms   added {proxied_ms - direct_ms:.3f} ms")


if __name__ == "__main__":
    main()
