"""Network attacks from inside a process sandbox, through the whole SDK path (plan, backend,
corral.net), as root and as an unprivileged user. Servers run on the host's loopback only;
the sandbox reaches the host's loopback through slirp4netns's mapped address 10.0.2.2."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from tests.conftest import Runner

HOST_LOOPBACK = "10.0.2.2"
PY = "/usr/bin/python3"
CONNECT = (
    "import socket,sys\n"
    "try:\n s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)\n"
    " print('OK', s.recv(64).decode().strip())\n"
    "except OSError as e:\n print('DENIED', e.errno)\n"
)


@pytest.fixture
def servers() -> Iterator[list[int]]:
    """Two TCP servers on the host's loopback that greet whoever connects."""
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    stop = threading.Event()

    def serve(s: socket.socket) -> None:
        s.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = s.accept()
                conn.sendall(b"hello\n")
                conn.close()
            except OSError:
                pass

    threads = [threading.Thread(target=serve, args=(s,), daemon=True) for s in socks]
    for t in threads:
        t.start()
    yield [s.getsockname()[1] for s in socks]
    stop.set()
    for t in threads:
        t.join()
    for s in socks:
        s.close()


def connect(runner: Runner, host: str, port: int, **policy: Any) -> str:
    request = {"process": {"commandLine": f"{PY} -c {_quote(CONNECT)} {host} {port}"}, **policy}
    result = runner.run(request)
    assert result.exit_code == 0, result.stderr
    return result.stdout.strip()


def _quote(code: str) -> str:
    import shlex

    return shlex.quote(code)


@pytest.mark.timeout(120)
def test_default_deny_reaches_nothing(runner: Runner, servers: list[int]) -> None:
    with socket.create_connection(("127.0.0.1", servers[0])) as s:  # works on the host
        assert s.recv(6) == b"hello\n"
    assert connect(runner, HOST_LOOPBACK, servers[0]).startswith("DENIED")
    assert connect(runner, "127.0.0.1", servers[0]).startswith("DENIED")


@pytest.mark.timeout(120)
def test_host_loopback_only_when_allowed(runner: Runner, servers: list[int]) -> None:
    allowed = {"network": {"egress": {"default": "deny"}, "ingress": {"hostLoopback": "allow"}}}
    assert connect(runner, HOST_LOOPBACK, servers[0], **allowed) == "OK hello"
    denied = {"network": {"egress": {"default": "allow"}, "ingress": {"hostLoopback": "deny"}}}
    assert connect(runner, HOST_LOOPBACK, servers[0], **denied).startswith("DENIED")


@pytest.mark.timeout(120)
def test_dns_to_other_resolvers_blocked_by_default_deny(runner: Runner, servers: list[int]) -> None:
    # An allow rule for one host-loopback port must not open the user-mode DNS forwarder.
    policy = {"network": {"egress": {"default": "deny"}, "ingress": {"hostLoopback": "allow"}}}
    assert connect(runner, HOST_LOOPBACK, servers[0], **policy) == "OK hello"
    assert connect(runner, "10.0.2.3", 53, **policy).startswith("DENIED")


@pytest.mark.timeout(120)
def test_proxy_only_mode_cannot_bypass_the_proxy(runner: Runner, servers: list[int]) -> None:
    proxy_port, other_port = servers
    policy = {"runtimeConfig": {"networkProxy": f"http://127.0.0.1:{proxy_port}"}}
    env = runner.run({"process": {"commandLine": "/usr/bin/env"}, **policy}).stdout
    proxy_inside = next(
        line.split("=", 1)[1] for line in env.splitlines() if line.startswith("HTTP_PROXY=")
    )
    host, port = (
        proxy_inside.rsplit("/", 1)[-1].rsplit(":", 1) if "//" in proxy_inside else ("", "")
    )
    assert connect(runner, host, int(port), **policy) == "OK hello"
    assert connect(runner, host, other_port, **policy).startswith("DENIED")


@pytest.mark.timeout(120)
def test_workload_cannot_flush_the_rules(runner: Runner, servers: list[int]) -> None:
    policy = {"network": {"egress": {"default": "deny"}, "ingress": {"hostLoopback": "allow"}}}
    result = runner.run({"process": {"commandLine": "/usr/sbin/nft flush ruleset"}, **policy})
    assert result.exit_code != 0
    assert "Operation not permitted" in result.stderr or "permission" in result.stderr.lower()
    denied = {"network": {"egress": {"default": "deny"}}}
    assert connect(runner, HOST_LOOPBACK, servers[1], **denied).startswith("DENIED")


def test_plan_lists_network_mechanisms() -> None:
    from corral.api import plan

    p = plan({"version": "1.0.0", "process": {"commandLine": "true"},
              "network": {"egress": {"default": "deny", "allow": [{"to": [{"cidr": "10.9.0.0/16"}]}]}}})  # fmt: skip
    mechanisms = {m for c in p.clauses if c.area == "network" for m in c.mechanisms}
    assert {"network-namespace", "nftables"} <= mechanisms


def test_ingress_allow_needs_published_ports() -> None:
    import corral
    from corral.api import plan

    base = {"version": "1.0.0", "process": {"commandLine": "true"}}
    with pytest.raises(corral.CorralError) as err:
        plan({**base, "network": {"ingress": {"default": "allow"}}})
    assert err.value.code == "policy_validation" and "publish" in err.value.message
    p = plan(
        {
            **base,
            "network": {"ingress": {"default": "allow"}},
            "corral": {"network": {"publish": [{"hostPort": 18080, "sandboxPort": 8080}]}},
        }
    )
    assert any("publish host 127.0.0.1:18080" in c.subject for c in p.clauses)


@pytest.mark.timeout(60)
def test_published_port_reachable_from_host() -> None:
    import time

    import corral

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        host_port = probe.getsockname()[1]
    server = (
        "import socket\ns=socket.create_server(('0.0.0.0',8080))\nprint('ready',flush=True)\n"
        "c,_=s.accept()\nc.sendall(b'from sandbox\\n')\nc.close()\n"
    )
    request = {
        "version": "1.0.0",
        "process": {"commandLine": f"{PY} -c {_quote(server)}", "timeout": 30000},
        "network": {"ingress": {"default": "allow"}},
        "corral": {"network": {"publish": [{"hostPort": host_port, "sandboxPort": 8080}]}},
    }
    with corral.spawn(request) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", host_port), timeout=3) as c:
                    assert c.recv(64) == b"from sandbox\n"
                    break
            except (ConnectionError, TimeoutError, AssertionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert proc.wait(timeout=10) == 0


@pytest.mark.timeout(60)
def test_hostname_rules_through_the_sdk(runner: Runner) -> None:
    """With corral.network.hosts the workload gets the policy proxy in its environment (on its
    own loopback); a
    denied name is refused with a JSON 403 the agent can read, whatever the address; with
    tlsInterception the sandbox trusts Corral's per-sandbox CA through the system bundle."""
    script = (
        "import os,socket\n"
        "p=os.environ['HTTPS_PROXY'].rsplit('/',1)[-1].rsplit(':',1)\n"
        "s=socket.create_connection((p[0],int(p[1])),timeout=5)\n"
        "s.sendall(b'CONNECT denied.example:443 HTTP/1.1\\r\\nHost: denied.example:443\\r\\n\\r\\n')\n"
        "print(s.recv(4096).decode().splitlines()[0])\n"
        "print(sum(1 for l in open('/etc/ssl/certs/ca-certificates.crt') if 'BEGIN' in l))\n"
        "print(os.environ.get('SSL_CERT_FILE'))\n"
        "print(p[0])\n"
    )
    hosts = {"allow": [{"host": "allowed.example", "methods": ["GET"], "paths": ["/v1/"]}]}
    request = {
        "process": {"commandLine": f"{PY} -c {_quote(script)}"},
        "network": {"egress": {"default": "deny"}},
        "corral": {"network": {"hosts": hosts, "tlsInterception": True}},
    }
    result = runner.run(request)
    assert result.exit_code == 0, result.stderr
    status, bundle_certs, cert_file, proxy_host = result.stdout.splitlines()
    # The proxy listens on the sandbox's own loopback (the native launcher made its socket
    # there): proxied traffic does not cross the user-mode network.
    assert proxy_host == "127.0.0.1"
    assert status.startswith("HTTP/1.1 403")
    with open("/etc/ssl/certs/ca-certificates.crt") as f:
        system_certs = sum(1 for line in f if "BEGIN" in line)
    assert int(bundle_certs) == system_certs + 1
    assert cert_file == "/etc/ssl/certs/ca-certificates.crt"
