"""IPv6 through the real plumbing (slirp4netns), the whole SDK path, as root and as an
unprivileged user. The sandbox has fd00::100 from the start; fd00::2 is the host's loopback
(``[::1]``) and follows ``ingress.hostLoopback`` exactly as 10.0.2.2 does. Servers run on
the host's ``[::1]`` only."""

from __future__ import annotations

import errno
import shlex
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from tests.conftest import Runner

HOST_LOOPBACK_V6 = "fd00::2"
PY = "/usr/bin/python3"
# nftables' `reject with icmpx admin-prohibited` (EACCES): the table refused, not slirp4netns
# (which answers ENETUNREACH when its own host-loopback switch is off) nor a missing route.
NFT_REJECT = f"DENIED {errno.EACCES}"
# Connects at once: a sandbox must not need to wait for router advertisements.
CONNECT = (
    "import socket,sys\n"
    "try:\n"
    " s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)\n"
    " print('OK', s.getsockname()[0], s.recv(64).decode().strip())\n"
    "except OSError as e:\n print('DENIED', e.errno)\n"
)


@pytest.fixture
def server_v6() -> Iterator[int]:
    """A TCP server on the host's IPv6 loopback that greets whoever connects."""
    sock = socket.create_server(("::1", 0), family=socket.AF_INET6)
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
                conn.sendall(b"hello6\n")
                conn.close()
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    stop.set()
    thread.join()
    sock.close()


def connect(runner: Runner, host: str, port: int, network: dict[str, Any]) -> str:
    code = shlex.quote(CONNECT)
    request = {"process": {"commandLine": f"{PY} -c {code} {host} {port}"}, "network": network}
    result = runner.run(request)
    assert result.exit_code == 0, result.stderr
    return str(result.stdout.strip())


@pytest.mark.timeout(120)
def test_host_loopback_v6_follows_ingress_host_loopback(runner: Runner, server_v6: int) -> None:
    with socket.create_connection(("::1", server_v6)) as s:  # the server works on the host
        assert s.recv(7) == b"hello6\n"
    allowed = {"egress": {"default": "deny"}, "ingress": {"hostLoopback": "allow"}}
    assert connect(runner, HOST_LOOPBACK_V6, server_v6, allowed) == "OK fd00::100 hello6"
    denied = {"egress": {"default": "allow"}, "ingress": {"hostLoopback": "deny"}}
    assert connect(runner, HOST_LOOPBACK_V6, server_v6, denied) == NFT_REJECT
    default = {"egress": {"default": "deny"}}
    assert connect(runner, HOST_LOOPBACK_V6, server_v6, default).startswith("DENIED")


@pytest.mark.timeout(120)
def test_v6_allow_rules_do_not_open_the_host_loopback(runner: Runner, server_v6: int) -> None:
    # Both CIDRs contain fd00::2 without naming it: the hostLoopback rule comes first.
    wide = [{"to": [{"cidr": "::/0"}, {"cidr": "fd00::/64"}]}]
    policy = {"egress": {"default": "deny", "allow": wide}, "ingress": {"hostLoopback": "deny"}}
    assert connect(runner, HOST_LOOPBACK_V6, server_v6, policy) == NFT_REJECT
    # The same rules with the host loopback allowed: the path itself works.
    policy["ingress"] = {"hostLoopback": "allow"}
    assert connect(runner, HOST_LOOPBACK_V6, server_v6, policy) == "OK fd00::100 hello6"


@pytest.mark.timeout(120)
def test_v6_dns_forwarder_follows_default_deny(runner: Runner, server_v6: int) -> None:
    policy = {"egress": {"default": "deny"}, "ingress": {"hostLoopback": "allow"}}
    assert connect(runner, "fd00::3", 53, policy) == NFT_REJECT
