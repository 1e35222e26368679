"""Throughput and connection latency through Corral's policy proxy vs direct, in one run.

Everything stays on 127.0.0.1 with bounded loops. Three routes to the same sink, driven by
the same client code with the same payload:
- direct: client -> sink;
- proxied: client -> CONNECT tunnel through Corral's policy proxy -> sink (hostname rule,
  pinned address, audit events written to a real hash-chained audit log, as in use);
- bare relay: client -> ``splice_relay.c`` -> sink, a C relay with the proxy's splice loop
  and no policy nor CONNECT exchange: the upper bound for any relay on this machine
  (skipped when no C compiler is found).
The sink, the proxy, the relay and the client are separate processes, as in real use (the
proxy lives in Corral's process, not the workload's). The sink serves every connection
from one epoll loop into one reused buffer, so neither its thread starts nor its
allocations weigh on one path more than another.

Throughput: a warm-up round per path, then ROUNDS rounds of MEGABYTES MiB, paths in a
shuffled order each round; median MB/s (and the range) plus the CPU time every process of
the path spent per MiB (client + sink + proxy or relay): with all of them on 2 cores,
CPU per MiB bounds throughput. Latency: connect (+ CONNECT and its 200 when proxied), send
one byte, read the sink's one-byte answer, close; CONNECTIONS times per path, paths
shuffled per connection so load changes hit them alike; median and 90th percentile.
Targets (issue 4): >= 0.8x direct throughput, <= 1 ms added per new connection.

From inside a sandbox (the route an agent's traffic takes): a process sandbox made by
``corral.run`` downloads from the same sink, listening on the host's own non-loopback
address, (a) directly, through the sandbox's user-mode network (slirp4netns) with a CIDR
rule for that address and port, and (b) through a CONNECT tunnel to the policy proxy at
10.0.2.2 with a hostname rule for ``bench.test``, which the proxy pins to the same address
(through the resolver hook tests use: no real name is resolved). ``network_client.py``, run
by the sandbox's own ``/usr/bin/python3``, drives both paths with the same code, rounds and
shuffling as above (downloads instead of uploads) and reports its own timings.
"""

from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing
import os
import random
import selectors
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import corral
from corral import net
from corral.audit.events import Actor
from corral.audit.log import AuditLog
from corral.audit.recorder import Recorder
from corral.contract.extensions import build_corral_section
from corral.net.policy_proxy import PolicyProxy

MEGABYTES = 512
ROUNDS = 7
CONNECTIONS = 1000
CHUNK = 1 << 20
PROBE = b"!"  # a connection whose only byte is this gets one byte back
DOWNLOAD = b"GET "  # "GET N\n": the sink sends N MiB and closes
BENCH_HOST = "bench.test"  # the hostname rule of the in-sandbox proxied path
_FORK = multiprocessing.get_context("fork")
_RELAY_SOURCE = Path(__file__).with_name("splice_relay.c")
_CLIENT_SOURCE = Path(__file__).with_name("network_client.py")


def run_sink(report: Connection) -> None:
    # On every address: the loopback for the host section, the host's own for the sandbox's.
    server = socket.create_server(("0.0.0.0", 0), backlog=512)
    server.setblocking(False)
    report.send(server.getsockname()[1])
    buffer = bytearray(CHUNK)
    payload = memoryview(bytes(CHUNK))
    events = selectors.DefaultSelector()
    events.register(server, selectors.EVENT_READ)
    while True:
        for key, _ in events.select():
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            if sock is server:
                with contextlib.suppress(BlockingIOError):  # the client gave up already
                    conn, _ = server.accept()
                    events.register(conn, selectors.EVENT_READ)
                continue
            received = 0
            with contextlib.suppress(ConnectionError):  # a client that gave up
                received = sock.recv_into(buffer)
                if received == 1 and buffer[0] == PROBE[0]:
                    sock.sendall(b"k")
                elif buffer.startswith(DOWNLOAD):  # uploads are zeros: never a request
                    for _ in range(int(buffer[len(DOWNLOAD) : received])):
                        sock.sendall(payload)
                    received = 0
            if received == 0:
                events.unregister(sock)
                sock.close()


def run_proxy(report: Connection, sink_port: int, audit_path: str) -> None:
    hosts = {"allow": [{"host": "bench.test", "ports": [sink_port]}]}
    recorder = Recorder(AuditLog(audit_path), Actor.from_process(), "bench")
    proxy = PolicyProxy(
        build_corral_section({"network": {"hosts": hosts}}).network,
        audit=recorder.network_decision,
        resolver=lambda host, port: ["127.0.0.1"],
        address_ok=lambda addr: True,  # the bench's upstream is on loopback by design
    )
    proxy.start()
    report.send(proxy.port)
    threading.Event().wait()


def in_child(target: Callable[..., None], *args: object) -> tuple[int, int]:
    """Start ``target(report, *args)`` in a forked process; return (its port, its pid)."""
    receive, report = _FORK.Pipe(duplex=False)
    child = _FORK.Process(target=target, args=(report, *args), daemon=True)
    child.start()
    port: int = receive.recv()
    assert child.pid is not None
    return port, child.pid


def start_relay(workdir: str, sink_port: int) -> subprocess.Popen[str] | None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    binary = os.path.join(workdir, "splice_relay")
    subprocess.run([compiler, "-O2", "-pthread", "-o", binary, str(_RELAY_SOURCE)], check=True)
    return subprocess.Popen([binary, str(sink_port)], stdout=subprocess.PIPE, text=True)


@dataclass
class Figures:
    name: str
    rates: list[float] = field(default_factory=list)  # MB/s per round
    latencies: list[float] = field(default_factory=list)  # ms per new connection
    cpu_seconds: float | None = None  # None: not measured (the in-sandbox paths)


@dataclass(kw_only=True)
class Route(Figures):
    connect: Callable[[], socket.socket]
    pids: list[int]  # the processes besides the client that this path runs through


def open_direct(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port))


def open_proxied(proxy: int, port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", proxy))
    conn.sendall(f"CONNECT bench.test:{port} HTTP/1.1\r\nHost: bench.test:{port}\r\n\r\n".encode())
    reply = conn.recv(4096)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    return conn


def cpu_seconds(pids: list[int]) -> float:
    """User + system time of these processes (all their threads, dead ones too)."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def send_round(route: Route, block: memoryview, megabytes: int) -> None:
    pids = [os.getpid(), *route.pids]
    cpu_before, start = cpu_seconds(pids), time.perf_counter()
    with route.connect() as conn:
        for _ in range(megabytes):
            conn.sendall(block)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)  # the sink closes once it has read everything
    route.rates.append(megabytes * CHUNK / 1e6 / (time.perf_counter() - start))
    route.cpu_seconds = (route.cpu_seconds or 0.0) + cpu_seconds(pids) - cpu_before


def probe(route: Route) -> float:
    start = time.perf_counter()
    with route.connect() as conn:
        conn.sendall(PROBE)
        conn.recv(1)
    return (time.perf_counter() - start) * 1000


def measure(routes: list[Route]) -> None:
    block = memoryview(bytes(CHUNK))
    for route in routes:
        send_round(route, block, MEGABYTES // 4)  # warm-up: buffers, threads, caches
        route.rates.clear()
        route.cpu_seconds = None
    for _ in range(ROUNDS):
        for route in random.sample(routes, len(routes)):
            send_round(route, block, MEGABYTES)
    for _ in range(20):  # warm-up
        for route in routes:
            probe(route)
    for _ in range(CONNECTIONS):
        for route in random.sample(routes, len(routes)):
            route.latencies.append(probe(route))


def host_address() -> str:
    """The host's own address on its default route: not loopback, so the sandbox's direct
    path leaves through slirp4netns like any egress, and the proxy's pin passes its checks."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe_socket:
        try:
            probe_socket.connect(("198.51.100.1", 9))  # a UDP connect only picks a source
        except OSError as exc:
            raise SystemExit(f"no IPv4 default route to find the host's address: {exc}") from exc
        address: str = probe_socket.getsockname()[0]
    return address


def measure_in_sandbox(sink_port: int, workdir: str) -> list[Figures]:
    address = host_address()
    command = (
        f"/usr/bin/python3 - {address} {BENCH_HOST} {sink_port} {MEGABYTES} {ROUNDS} {CONNECTIONS}"
    )
    rule = {"to": [{"cidr": f"{address}/32"}], "ports": [{"protocol": "tcp", "port": sink_port}]}
    request = {
        "version": "1.0.0",
        "process": {"commandLine": command},
        "network": {"egress": {"default": "deny", "allow": [rule]}},
        "corral": {"network": {"hosts": {"allow": [{"host": BENCH_HOST, "ports": [sink_port]}]}}},
    }
    # The proxy's resolver hook (tests use it too): bench.test is pinned to the sink's address.
    resolver = {"resolver": lambda host, port: [address] if host == BENCH_HOST else []}
    real_attach = net.attach
    net.attach = functools.partial(real_attach, proxy_options=resolver)
    os.environ["CORRAL_AUDIT_LOG"] = os.path.join(workdir, "sandbox-audit.jsonl")
    try:
        result = corral.run(request, input=_CLIENT_SOURCE.read_bytes())
    finally:
        net.attach = real_attach
    if result.exit_code != 0:
        raise SystemExit(f"the in-sandbox client failed ({result.exit_code}): {result.stderr}")
    timings = json.loads(result.stdout)
    return [
        Figures(name, timings["rates"][name], timings["latencies"][name])
        for name in ("direct", "proxied")
    ]


def report(routes: Sequence[Figures]) -> None:
    direct = routes[0]
    base_rate = statistics.median(direct.rates)
    base_ms = statistics.median(direct.latencies)
    print(f"throughput: {ROUNDS} rounds x {MEGABYTES} MiB per path, median (min-max)")
    for route in routes:
        rate = statistics.median(route.rates)
        cpu = ""
        if route.cpu_seconds is not None:
            cpu = f"   CPU {route.cpu_seconds * 1000 / (ROUNDS * MEGABYTES):.3f} ms/MiB"
        print(
            f"  {route.name:12s} {rate:6.0f} MB/s ({min(route.rates):.0f}-{max(route.rates):.0f})"
            f"  {rate / base_rate:.2f}x direct{cpu}"
        )
    print(f"new connection + 1-byte exchange: {CONNECTIONS} per path, median (p90)")
    for route in routes:
        median = statistics.median(route.latencies)
        p90 = statistics.quantiles(route.latencies, n=10)[-1]
        print(f"  {route.name:12s} {median:6.3f} ms ({p90:.3f})   added {median - base_ms:+.3f} ms")


def main() -> None:
    with tempfile.TemporaryDirectory() as workdir:
        sink_port, sink_pid = in_child(run_sink)
        proxy_port, proxy_pid = in_child(run_proxy, sink_port, os.path.join(workdir, "audit"))
        routes = [
            Route("direct", connect=lambda: open_direct(sink_port), pids=[sink_pid]),
            Route(
                "proxied",
                connect=lambda: open_proxied(proxy_port, sink_port),
                pids=[sink_pid, proxy_pid],
            ),
        ]
        relay = start_relay(workdir, sink_port)
        if relay is not None and relay.stdout is not None:
            relay_port = int(relay.stdout.readline())
            routes.append(
                Route(
                    "bare relay",
                    connect=lambda: open_direct(relay_port),
                    pids=[sink_pid, relay.pid],
                )
            )
        try:
            measure(routes)
            os.kill(proxy_pid, 9)
            if relay is not None:
                relay.kill()
                relay.wait()
            print("on the host's loopback (uploads; the machine's bound)")
            report(routes)
            if relay is None:
                print("  (no C compiler: the bare splice relay baseline was skipped)")
            print(f"from inside a process sandbox (downloads from {host_address()})")
            report(measure_in_sandbox(sink_port, workdir))
        finally:
            for pid in (sink_pid, proxy_pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            if relay is not None:
                relay.kill()
                relay.wait()


if __name__ == "__main__":
    main()
