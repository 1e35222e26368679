"""The policy proxy's reused threads: calls run on waiting threads, busy ones never make a
connection wait, idle ones go away, and running out of file descriptors does not stop the
proxy from accepting connections once they are freed."""

from __future__ import annotations

import contextlib
import functools
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from corral.net.workers import Workers

pytestmark = pytest.mark.timeout(30)


def _names(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == prefix and t.is_alive()]


def _run_and_wait(workers: Workers) -> int:
    ran: list[int] = []
    done = threading.Event()

    def record() -> None:
        ran.append(threading.get_ident())
        done.set()

    workers.submit(record)
    assert done.wait(5)
    time.sleep(0.05)  # let the thread go back to waiting
    return ran[0]


def test_a_waiting_thread_runs_the_next_call() -> None:
    workers = Workers("test-reuse")
    first = _run_and_wait(workers)
    assert {_run_and_wait(workers) for _ in range(5)} == {first}
    assert len(_names("test-reuse")) == 1


def test_busy_threads_do_not_delay_a_call() -> None:
    workers = Workers("test-busy")
    release = threading.Event()
    started = [threading.Event() for _ in range(6)]

    def hold(event: threading.Event) -> None:
        event.set()
        release.wait(10)

    try:
        for event in started:
            workers.submit(functools.partial(hold, event))
        assert all(event.wait(5) for event in started)  # all six at once, none queued
    finally:
        release.set()


def test_idle_threads_exit() -> None:
    workers = Workers("test-idle", idle_s=0.1)
    _run_and_wait(workers)
    deadline = time.monotonic() + 5
    while _names("test-idle") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _names("test-idle")
    assert _run_and_wait(workers)  # and a new one is started when needed


def test_a_failing_call_keeps_its_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    reported: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: reported.append(args.exc_value))
    workers = Workers("test-fail")

    def fail() -> None:
        raise RuntimeError("boom")

    workers.submit(fail)
    time.sleep(0.1)
    assert [str(exc) for exc in reported] == ["boom"]
    _run_and_wait(workers)
    assert len(_names("test-fail")) == 1


@pytest.fixture
def echo() -> Iterator[int]:
    server = socket.create_server(("127.0.0.1", 0), backlog=64)

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def _tunnel(proxy_port: int, port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", proxy_port), timeout=5)
    conn.sendall(f"CONNECT echo.test:{port} HTTP/1.1\r\nHost: echo.test:{port}\r\n\r\n".encode())
    assert conn.recv(4096).startswith(b"HTTP/1.1 200")
    return conn


def test_concurrent_tunnels_all_flow(echo: int) -> None:
    from test_net_policy_proxy import make_proxy

    proxy = make_proxy({"allow": [{"host": "echo.test", "ports": [echo]}]})
    try:
        tunnels = [_tunnel(proxy.port, echo) for _ in range(16)]  # all open at once
        for index, conn in enumerate(reversed(tunnels)):
            conn.sendall(b"hello %d" % index)
            assert conn.recv(100) == b"hello %d" % index
        for conn in tunnels:
            conn.close()
    finally:
        proxy.stop()


_FD_PROXY = """
import resource, sys, threading
sys.path.insert(0, "tests/net")
from test_net_policy_proxy import make_proxy
proxy = make_proxy({"allow": [{"host": "echo.test", "ports": [int(sys.argv[1])]}]})
import os
in_use = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 8, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
print(proxy.port, flush=True)
threading.Event().wait()
"""


def _echoes_within(seconds: float, proxy_port: int, port: int) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, AssertionError), _tunnel(proxy_port, port) as conn:
            conn.sendall(b"again")
            if conn.recv(100) == b"again":
                return True
        time.sleep(0.1)
    return False


def test_running_out_of_fds_does_not_stop_accepting(echo: int) -> None:
    proxy = subprocess.Popen(
        [sys.executable, "-c", _FD_PROXY, str(echo)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proxy.stdout is not None
        port = int(proxy.stdout.readline())
        held = []
        for _ in range(12):  # each tunnel needs 6 fds in the proxy: some accepts fail
            conn = socket.create_connection(("127.0.0.1", port), timeout=5)
            conn.sendall(b"CONNECT echo.test:%d HTTP/1.1\r\nHost: echo.test\r\n\r\n" % echo)
            held.append(conn)
        time.sleep(0.5)
        for conn in held:
            conn.close()
        assert _echoes_within(5.0, port, echo)  # accepted again once fds are free
    finally:
        proxy.kill()
        proxy.wait()


def test_close_ends_waiting_threads_and_busy_ones_after_their_call() -> None:
    workers = Workers("test-close")
    release = threading.Event()
    workers.submit(lambda: release.wait(10) and None)  # busy
    _run_and_wait(workers)  # on a second thread, which then waits
    assert len(_names("test-close")) == 2
    workers.close()
    time.sleep(0.1)
    assert len(_names("test-close")) == 1  # the busy one runs on
    release.set()
    deadline = time.monotonic() + 5
    while _names("test-close") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _names("test-close")
