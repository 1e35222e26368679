"""Throughput and connection latency through Corral's policy proxy vs direct, in one run.

Everything stays on 127.0.0.1: a sink server, the proxy in front of it (CONNECT tunnels,
spliced), bounded loops. The sink, the proxy and the client run in three processes, as in
real use (the proxy lives in Corral's process, not the workload's), so no Python lock is
shared between them. Direct and proxied rounds alternate and the medians are reported (a
2-core machine is noisy). Targets (issue 4): >= 0.8x direct throughput, <= 1 ms added per
new connection without TLS interception.
"""

from __future__ import annotations

import multiprocessing
import socket
import statistics
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from corral.contract.extensions import build_corral_section
from corral.net.policy_proxy import PolicyProxy

MEGABYTES = 256
ROUNDS = 5
CONNECTIONS = 300
CHUNK = 1 << 20
_FORK = multiprocessing.get_context("fork")


def run_sink(report: Connection) -> None:
    server = socket.create_server(("127.0.0.1", 0), backlog=512)
    report.send(server.getsockname()[1])

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(CHUNK):
                if data.endswith(b"!"):  # latency probe: answer and close
                    conn.sendall(b"k")

    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def run_proxy(report: Connection, sink_port: int) -> None:
    hosts = {"allow": [{"host": "bench.test", "ports": [sink_port]}]}
    proxy = PolicyProxy(
        build_corral_section({"network": {"hosts": hosts}}).network,
        resolver=lambda host, port: ["127.0.0.1"],
        address_ok=lambda addr: True,  # the bench's upstream is on loopback by design
    )
    proxy.start()
    report.send(proxy.port)
    threading.Event().wait()


def in_child(target: Callable[..., None], *args: object) -> tuple[int, BaseProcess]:
    """Start ``target(report, *args)`` in a forked process; return the port it reports."""
    receive, report = _FORK.Pipe(duplex=False)
    child = _FORK.Process(target=target, args=(report, *args), daemon=True)
    child.start()
    port: int = receive.recv()
    return port, child


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


def latency(opener: Callable[[], socket.socket]) -> float:
    times = []
    for _ in range(CONNECTIONS):
        start = time.perf_counter()
        with opener() as conn:
            conn.sendall(b"!")
            conn.recv(1)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    port, sink = in_child(run_sink)
    proxy_port, proxy = in_child(run_proxy, port)
    direct: list[float] = []
    proxied: list[float] = []
    try:
        for _ in range(ROUNDS):
            direct.append(throughput(open_direct(port)))
            proxied.append(throughput(open_proxied(proxy_port, port)))
        direct_ms = latency(lambda: open_direct(port))
        proxied_ms = latency(lambda: open_proxied(proxy_port, port))
    finally:
        proxy.kill()
        sink.kill()
    direct_tp, proxied_tp = statistics.median(direct), statistics.median(proxied)
    print(f"throughput direct   {direct_tp:8.0f} MB/s (median of {ROUNDS} x {MEGABYTES} MiB)")
    print(f"throughput proxied  {proxied_tp:8.0f} MB/s   ratio {proxied_tp / direct_tp:.2f}x")
    print(f"connect+1 byte direct  {direct_ms:6.3f} ms (median of {CONNECTIONS})")
    print(f"connect+1 byte proxied {proxied_ms:6.3f} ms   added {proxied_ms - direct_ms:.3f} ms")


if __name__ == "__main__":
    main()
