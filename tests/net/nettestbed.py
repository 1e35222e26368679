"""Real namespaces for network tests: a sandbox (own user + network namespace, like the
process backend's) wired by a veth pair to a test "world" namespace that holds servers on
10.200.0.2 / 10.200.0.200 / fd00:200::2 / fd00:200::3. Nothing leaves these namespaces
except through slirp4netns to the host's loopback."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PEER = str(Path(__file__).with_name("net_peer.py"))
PYTHON = sys.executable
WORLD_PORTS = ("53", "80", "81", "443", "8080")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates network namespaces as root")


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=10)


@dataclass
class Sandbox:
    pid: int

    def enter(self, *argv: str) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-U", "-n", "--preserve-credentials", *argv]

    def reach(self, proto: str, host: str, port: int) -> bool:
        cmd = self.enter(PYTHON, PEER, proto, host, str(port))
        return subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0

    def ping(self, host: str) -> bool:
        cmd = self.enter("busybox", "ping", "-c", "1", "-W", "1", host)
        return subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0


def _holder(*unshare: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["unshare", *unshare, "sh", "-c", "ip link set lo up && echo up && exec sleep 300"],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    return proc


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    """A process in its own user and network namespace (loopback up), as the backend makes."""
    proc = _holder("--net", "--user", "--map-root-user")
    yield Sandbox(proc.pid)
    proc.kill()
    proc.wait()


@dataclass
class World:
    pid: int


@pytest.fixture
def world(sandbox: Sandbox) -> Iterator[World]:
    """Test hosts on a veth link to the sandbox, with TCP and UDP servers on WORLD_PORTS."""
    holder = _holder("--net")
    inside, outside = f"cs{secrets.token_hex(3)}", f"cw{secrets.token_hex(3)}"
    _run("ip", "link", "add", inside, "type", "veth", "peer", "name", outside)
    _run("ip", "link", "set", inside, "netns", str(sandbox.pid))
    _run("ip", "link", "set", outside, "netns", str(holder.pid))
    in_s = ["nsenter", "-t", str(sandbox.pid), "-n"]
    in_w = ["nsenter", "-t", str(holder.pid), "-n"]
    _run(*in_s, "ip", "addr", "add", "10.200.0.1/24", "dev", inside)
    _run(*in_s, "ip", "addr", "add", "fd00:200::1/64", "dev", inside, "nodad")
    _run(*in_s, "ip", "link", "set", inside, "up")
    for addr in ("10.200.0.2/24", "10.200.0.200/24"):
        _run(*in_w, "ip", "addr", "add", addr, "dev", outside)
    for addr in ("fd00:200::2/64", "fd00:200::3/64"):
        _run(*in_w, "ip", "addr", "add", addr, "dev", outside, "nodad")
    _run(*in_w, "ip", "link", "set", outside, "up")
    server = subprocess.Popen(
        [*in_w, PYTHON, PEER, "serve", *WORLD_PORTS],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert server.stdout is not None and server.stdout.readline() == b"ready\n"
    time.sleep(0.05)
    yield World(holder.pid)
    assert server.stdin is not None
    server.stdin.close()
    server.kill()
    server.wait()
    holder.kill()
    holder.wait()
