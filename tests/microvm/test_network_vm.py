"""Network rules for micro-VMs, attacked from inside a real guest: the guest's NIC is QEMU's
user-mode network, so its connections are sockets of QEMU in QEMU's network namespace, where
corral.net's nftables rules judge them exactly as for a process sandbox.

Address chain: guest 10.0.3.15 -> QEMU (its gateway 10.0.3.2) -> QEMU's namespace, 10.0.2.100
behind slirp4netns -> 10.0.2.2 is the host's loopback. Probes are busybox commands (the guest
sees the host's /bin/busybox through its share)."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from microvm_support import greeting, run

from corral import api
from corral.backends.microvm import MicroVM, MicrovmBackend
from corral.errors import PolicyError

pytestmark = [
    pytest.mark.vm,
    pytest.mark.timeout(300),
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and QEMU staging as root"),
]

HOST_LOOPBACK = "10.0.2.2"
WORLD = "10.200.0.2"  # a test host in a network namespace the test creates
ALLOWED_PORT, NEIGHBOUR_PORT = 8080, 8081
SERVE = (
    "import socket,sys,threading\n"
    "def loop(s):\n"
    "    while True:\n"
    "        c,_=s.accept(); c.sendall(b'world-%d\\n' % s.getsockname()[1]); c.close()\n"
    "for p in sys.argv[1:]:\n"
    "    s=socket.create_server(('0.0.0.0',int(p))); threading.Thread(target=loop,args=(s,),daemon=True).start()\n"
    "print('ready',flush=True); sys.stdin.read()\n"
)


@pytest.fixture
def host_server() -> Iterator[int]:
    """A TCP server on the host's loopback that greets whoever connects."""
    server = socket.create_server(("127.0.0.1", 0))
    with greeting(server):
        yield server.getsockname()[1]


def boot(backend: MicrovmBackend, network: dict[str, Any]) -> MicroVM:
    request = {
        "version": "1.1.0-alpha",
        "containment": "microvm",
        "process": {"commandLine": "true"},
        "network": network,
    }
    return backend.boot(api.plan(request, experimental=True))


def connect(vm: MicroVM, host: str, port: int) -> str:
    """Connect from the guest, busybox only: prints what the server said, or `blocked`."""
    result = run(vm, f"busybox nc -w 3 {host} {port} </dev/null || echo blocked")
    return result.out.strip()


def test_host_loopback_reachable_only_when_allowed(
    backend: MicrovmBackend, host_server: int
) -> None:
    with socket.create_connection(("127.0.0.1", host_server), timeout=2) as control:
        assert control.recv(64) == b"hello-from-host\n"  # the server works on the host
    allowed = boot(backend, {"ingress": {"hostLoopback": "allow"}})
    try:
        assert connect(allowed, HOST_LOOPBACK, host_server) == "hello-from-host"
    finally:
        allowed.shutdown()
    # The guest has a NIC and egress is wide open, but the host's loopback stays closed.
    denied = boot(backend, {"egress": {"default": "allow"}, "ingress": {"hostLoopback": "deny"}})
    try:
        devices = run(denied, "cat /proc/net/dev").out
        assert "eth0:" in devices  # the rules apply to a real NIC, not to a missing one
        assert connect(denied, HOST_LOOPBACK, host_server) == "blocked"
    finally:
        denied.shutdown()


def test_shutdown_leaves_no_network_helper(backend: MicrovmBackend) -> None:
    vm = boot(backend, {"ingress": {"hostLoopback": "allow"}})
    helpers = [p for p in psutil.Process().children() if p.name() == "slirp4netns"]
    assert helpers  # the VM's namespace is linked to the host while it runs
    vm.shutdown()
    assert not [p for p in helpers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not os.path.exists(f"/proc/{vm.pid}")


def test_no_rules_means_no_nic(vm: MicroVM, host_server: int) -> None:
    devices = run(vm, "cat /proc/net/dev").out
    assert "eth0" not in devices
    result = run(vm, f"busybox nc -w 3 {HOST_LOOPBACK} {host_server} </dev/null")
    assert result.code != 0 and "unreachable" in result.err


def test_guest_reaches_its_netns_only_as_qemu(backend: MicrovmBackend, host_server: int) -> None:
    """QEMU's own gateway alias (10.0.3.2) maps to the loopback of QEMU's namespace, where
    nothing listens: it is not a second way to the host's loopback."""
    vm = boot(backend, {"egress": {"default": "allow"}})
    try:
        assert connect(vm, "10.0.3.2", host_server) == "blocked"
    finally:
        vm.shutdown()


@pytest.fixture
def world() -> Iterator[subprocess.Popen[bytes]]:
    """A test host in its own network namespace, serving ALLOWED_PORT and NEIGHBOUR_PORT."""
    holder = subprocess.Popen(
        ["unshare", "--net", "sh", "-c", "ip link set lo up && echo up && exec sleep 600"],
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None and holder.stdout.readline() == b"up\n"
    server = subprocess.Popen(
        ["nsenter", "-t", str(holder.pid), "-n", sys.executable, "-c", SERVE,
         str(ALLOWED_PORT), str(NEIGHBOUR_PORT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert server.stdout is not None and server.stdout.readline() == b"ready\n"
    yield holder
    server.kill()
    server.wait()
    holder.kill()
    holder.wait()


def link_to_world(vm: MicroVM, world: subprocess.Popen[bytes]) -> None:
    """A veth pair between QEMU's namespace and the world's (as tests/net does for sandboxes)."""
    inside, outside = f"vq{secrets.token_hex(3)}", f"vw{secrets.token_hex(3)}"
    steps = [
        ["ip", "link", "add", inside, "type", "veth", "peer", "name", outside],
        ["ip", "link", "set", inside, "netns", str(vm.pid)],
        ["ip", "link", "set", outside, "netns", str(world.pid)],
        ["nsenter", "-t", str(vm.pid), "-n", "ip", "addr", "add", "10.200.0.1/24", "dev", inside],
        ["nsenter", "-t", str(vm.pid), "-n", "ip", "link", "set", inside, "up"],
        ["nsenter", "-t", str(world.pid), "-n", "ip", "addr", "add", f"{WORLD}/24", "dev", outside],
        ["nsenter", "-t", str(world.pid), "-n", "ip", "link", "set", outside, "up"],
    ]
    for step in steps:
        subprocess.run(step, check=True, capture_output=True, timeout=10)


def test_egress_allow_rule_opens_one_port_only(
    backend: MicrovmBackend, world: subprocess.Popen[bytes]
) -> None:
    rule = {"to": [{"cidr": f"{WORLD}/32"}], "ports": [{"protocol": "tcp", "port": ALLOWED_PORT}]}
    vm = boot(backend, {"egress": {"default": "deny", "allow": [rule]}})
    try:
        link_to_world(vm, world)
        assert connect(vm, WORLD, ALLOWED_PORT) == f"world-{ALLOWED_PORT}"
        assert connect(vm, WORLD, NEIGHBOUR_PORT) == "blocked"  # the same host, another port
    finally:
        vm.shutdown()
    opened = boot(backend, {"egress": {"default": "allow"}})
    try:
        link_to_world(opened, world)
        # Control: with egress open the neighbour port answers, so the rule did the blocking.
        assert connect(opened, WORLD, NEIGHBOUR_PORT) == f"world-{NEIGHBOUR_PORT}"
    finally:
        opened.shutdown()


def publish_request(host_port: int, sandbox_port: int) -> dict[str, Any]:
    return {
        "version": "1.1.0-alpha",
        "containment": "microvm",
        "process": {"commandLine": "true"},
        "corral": {"network": {"publish": [{"hostPort": host_port, "sandboxPort": sandbox_port}]}},
    }


def test_published_port_reaches_the_guest(backend: MicrovmBackend) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        host_port = probe.getsockname()[1]
    vm = backend.boot(api.plan(publish_request(host_port, 8080), experimental=True))
    try:
        with vm.exec(
            ["/bin/busybox", "sh", "-c", "busybox nc -l -p 8080 -e busybox echo from-guest"],
            cwd="/",
            env={},
            timeout_ms=30_000,
        ) as listener:
            deadline = time.monotonic() + 20
            answer = b""
            while not answer and time.monotonic() < deadline:
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", host_port), timeout=2) as conn,
                ):
                    answer = conn.recv(64)
                if not answer:
                    time.sleep(0.2)  # the guest's nc may not listen yet
            assert answer == b"from-guest\n"
            assert listener.wait(10) == 0
    finally:
        vm.shutdown()


def test_published_port_below_1024_is_refused(backend: MicrovmBackend) -> None:
    with pytest.raises(PolicyError, match="unprivileged"):
        backend.boot(api.plan(publish_request(18080, 80), experimental=True))
