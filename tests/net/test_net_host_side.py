"""Host loopback, the enforced proxy of runtimeConfig.networkProxy, and published ports."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest
from nettestbed import PEER, PYTHON, Sandbox, World
from test_net_rules import plan, rule

from corral import net
from corral.contract.model import NetworkSpec
from corral.plan import NetworkPlan

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def host_port() -> Iterator[int]:
    """A TCP server on the host's 127.0.0.1 that answers "ok"."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"ok\n")

    threading.Thread(target=loop, daemon=True).start()
    yield server.getsockname()[1]
    stop.set()
    server.close()


def test_host_loopback_denied_unless_allowed(sandbox: Sandbox, host_port: int) -> None:
    with net.attach(plan(default="allow"), pid=sandbox.pid):
        assert not sandbox.reach("tcp", "10.0.2.2", host_port)
    with net.attach(plan(host_loopback="allow"), pid=sandbox.pid):
        assert sandbox.reach("tcp", "10.0.2.2", host_port)


def test_proxy_only_cannot_bypass(sandbox: Sandbox, world: World, host_port: int) -> None:
    other = socket.create_server(("127.0.0.1", 0))
    try:
        plan_ = NetworkPlan("proxy", NetworkSpec(), f"http://localhost:{host_port}", {})
        with net.attach(plan_, pid=sandbox.pid) as attachment:
            assert attachment.proxy_url_inside == f"http://10.0.2.2:{host_port}"
            assert sandbox.reach("tcp", "10.0.2.2", host_port)
            assert not sandbox.reach("tcp", "10.0.2.2", other.getsockname()[1])
            assert not sandbox.reach("tcp", "10.200.0.2", 80)  # reachable without rules
            assert not sandbox.reach("udp", "10.200.0.2", 53)
    finally:
        other.close()


def test_published_port_reachable_from_host(sandbox: Sandbox, world: World) -> None:
    free = socket.create_server(("127.0.0.1", 0))
    host_port = free.getsockname()[1]
    free.close()
    corral = {"publish": [{"hostPort": host_port, "sandboxPort": 8000}]}
    server = subprocess.Popen(
        sandbox.enter(PYTHON, PEER, "serve", "8000", "8001"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"
        with net.attach(plan(corral=corral), pid=sandbox.pid):
            with socket.create_connection(("127.0.0.1", host_port), timeout=3) as conn:
                assert conn.recv(8) == b"ok\n"
            # Ingress default deny: the unpublished port is closed to the test hosts.
            w = ["nsenter", "-t", str(world.pid), "-n", PYTHON, PEER, "tcp", "10.200.0.1"]
            assert subprocess.run([*w, "8000"], capture_output=True).returncode == 0
            assert subprocess.run([*w, "8001"], capture_output=True).returncode != 0
    finally:
        server.kill()
        server.wait()


def test_close_is_idempotent_and_stops_slirp(sandbox: Sandbox) -> None:
    attachment = net.attach(plan(allow=(rule("10.200.0.0/24"),)), pid=sandbox.pid)
    slirp = attachment._slirp
    assert slirp is not None and slirp.process.poll() is None
    attachment.close()
    attachment.close()
    assert slirp.process.poll() is not None


def test_slirp_dies_with_a_killed_parent(sandbox: Sandbox) -> None:
    code = (
        "import sys, os; from corral import net; from test_net_rules import plan;"
        f"a = net.attach(plan(), pid={sandbox.pid});"
        "print(a._slirp.process.pid, flush=True); os.kill(os.getpid(), 9)"
    )
    here = PEER.rsplit("/", 1)[0]
    out = subprocess.run(
        [PYTHON, "-c", code],
        capture_output=True,
        cwd=here,
        timeout=20,
        env={"PYTHONPATH": here},
        text=True,
    )
    pid = int(out.stdout.split()[0])
    for _ in range(50):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):
                    break
        except FileNotFoundError:
            break
        threading.Event().wait(0.05)
    else:
        pytest.fail("slirp4netns outlived its killed parent")
