"""Opt-in TLS interception: method/path rules inside CONNECT tunnels, a per-sandbox CA,
upstreams verified (here against a test CA made by trustme, passed to the proxy only)."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import trustme
from http_echo import EchoHandler
from nettestbed import PYTHON, Sandbox
from test_net_rules import plan

from corral import net
from corral.contract.extensions import build_corral_section
from corral.net.policy_proxy import PolicyProxy

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def test_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def https_upstream(test_ca: trustme.CA) -> Iterator[int]:
    """An HTTPS echo server for api.test on 127.0.0.1, its certificate from the test CA."""
    import http.server

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    test_ca.issue_cert("api.test").configure_cert(context)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def make_proxy(
    hosts: dict[str, Any], *, intercept: bool = True, trust: trustme.CA | None = None
) -> PolicyProxy:
    corral = build_corral_section({"network": {"hosts": hosts, "tlsInterception": intercept}})
    upstream_trust = None
    if trust is not None:
        upstream_trust = ssl.create_default_context()
        trust.configure_trust(upstream_trust)
    proxy = PolicyProxy(
        corral.network,
        resolver=lambda host, port: ["127.0.0.1"],
        address_ok=lambda addr: True,  # the test upstream is on loopback by design
        upstream_trust=upstream_trust,
    )
    proxy.start()
    return proxy


def connect(proxy_port: int, host: str, port: int) -> tuple[socket.socket, bytes]:
    conn = socket.create_connection(("127.0.0.1", proxy_port), timeout=5)
    conn.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    return conn, conn.recv(4096)


def https(
    proxy: PolicyProxy, port: int, method: str, path: str, host_header: str = "api.test"
) -> tuple[int, bytes]:
    """One request through the proxy's tunnel, trusting only the bundle given to sandboxes."""
    assert proxy.ca_bundle_path is not None
    conn, reply = connect(proxy.port, "api.test", port)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    context = ssl.create_default_context(cafile=proxy.ca_bundle_path)
    with context.wrap_socket(conn, server_hostname="api.test") as tls:
        tls.sendall(
            f"{method} {path} HTTP/1.1\r\nHost: {host_header}\r\ncontent-length: 0\r\n\r\n".encode()
        )
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


RULES = {"allow": [{"host": "api.test", "methods": ["GET"], "paths": ["/v1/"]}]}


def rules_for(port: int) -> dict[str, Any]:
    return {"allow": [{**RULES["allow"][0], "ports": [port]}]}


def test_without_interception_method_rules_refuse_the_tunnel(https_upstream: int) -> None:
    proxy = make_proxy(rules_for(https_upstream), intercept=False)
    try:
        assert proxy.ca_bundle_path is None
        conn, reply = connect(proxy.port, "api.test", https_upstream)
        while chunk := conn.recv(4096):
            reply += chunk
        conn.close()
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 403")
        assert "tlsInterception" in json.loads(body)["rule"]
    finally:
        proxy.stop()


def test_method_and_path_rules_inside_tls(https_upstream: int, test_ca: trustme.CA) -> None:
    proxy = make_proxy(rules_for(https_upstream), trust=test_ca)
    try:
        assert https(proxy, https_upstream, "GET", "/v1/items") == (200, b"GET /v1/items")
        status, body = https(proxy, https_upstream, "POST", "/v1/items")
        assert status == 403 and "no hosts.allow rule" in json.loads(body)["rule"]
        assert https(proxy, https_upstream, "GET", "/admin")[0] == 403
        assert https(proxy, https_upstream, "GET", "/v1/../admin")[0] == 403
        assert https(proxy, https_upstream, "GET", "/v1/%2e%2e/admin")[0] == 403
        status, body = https(proxy, https_upstream, "GET", "/v1/x", host_header="evil.test")
        assert status == 403 and json.loads(body)["rule"] == "host match"
    finally:
        proxy.stop()


def test_deny_rule_with_method_inside_tls(https_upstream: int, test_ca: trustme.CA) -> None:
    hosts = {
        "allow": [{"host": "api.test", "ports": [https_upstream]}],
        "deny": [{"host": "api.test", "ports": [https_upstream], "methods": ["POST"]}],
    }
    proxy = make_proxy(hosts, trust=test_ca)
    try:
        assert https(proxy, https_upstream, "GET", "/anything")[0] == 200
        status, body = https(proxy, https_upstream, "POST", "/anything")
        assert status == 403 and "hosts.deny[0]" in json.loads(body)["rule"]
    finally:
        proxy.stop()


def test_hosts_without_http_rules_stay_end_to_end(https_upstream: int, test_ca: trustme.CA) -> None:
    """Interception is only for hosts that method/path rules name: others keep the
    upstream's own certificate (the client trusts the test CA, not the sandbox CA)."""
    proxy = make_proxy({"allow": [{"host": "api.test", "ports": [https_upstream]}]})
    try:
        conn, reply = connect(proxy.port, "api.test", https_upstream)
        assert reply.startswith(b"HTTP/1.1 200")
        context = ssl.create_default_context()
        test_ca.configure_trust(context)
        with context.wrap_socket(conn, server_hostname="api.test") as tls:
            tls.sendall(b"GET /plain HTTP/1.1\r\nHost: api.test\r\nconnection: close\r\n\r\n")
            assert tls.recv(65536).startswith(b"HTTP/1.")
    finally:
        proxy.stop()


def test_upstream_is_verified_against_the_system_store(https_upstream: int) -> None:
    proxy = make_proxy(rules_for(https_upstream))  # no test trust: the test CA is unknown
    try:
        status, body = https(proxy, https_upstream, "GET", "/v1/items")
        assert status == 502 and json.loads(body)["rule"] == "upstream tls"
    finally:
        proxy.stop()


def test_sni_must_name_the_tunnel_host(https_upstream: int, test_ca: trustme.CA) -> None:
    proxy = make_proxy(rules_for(https_upstream), trust=test_ca)
    try:
        assert proxy.ca_bundle_path is not None
        conn, reply = connect(proxy.port, "api.test", https_upstream)
        assert reply.startswith(b"HTTP/1.1 200")
        context = ssl.create_default_context(cafile=proxy.ca_bundle_path)
        with pytest.raises((ssl.SSLError, OSError)):
            context.wrap_socket(conn, server_hostname="evil.test")
        conn.close()
    finally:
        proxy.stop()


def test_ca_bundle_is_private_and_removed(https_upstream: int) -> None:
    proxy = make_proxy(rules_for(https_upstream))
    path = proxy.ca_bundle_path
    assert path is not None
    assert os.stat(path).st_mode & 0o777 == 0o600
    with open(path, "rb") as f:
        bundle = f.read()
    assert b"PRIVATE KEY" not in bundle and bundle.count(b"BEGIN CERTIFICATE") > 1
    proxy.stop()
    assert not os.path.exists(path)


_SANDBOX_CLIENT = """
import socket, ssl, sys
proxy_port, port, bundle = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
conn = socket.create_connection(("10.0.2.2", proxy_port), timeout=5)
conn.sendall(f"CONNECT api.test:{port} HTTP/1.1\\r\\nHost: api.test\\r\\n\\r\\n".encode())
assert conn.recv(4096).startswith(b"HTTP/1.1 200")
tls = ssl.create_default_context(cafile=bundle).wrap_socket(conn, server_hostname="api.test")
tls.sendall(b"GET /v1/in HTTP/1.1\\r\\nHost: api.test\\r\\n\\r\\n")
data = b""
while chunk := tls.recv(65536):
    data += chunk
print(data.split(b"\\r\\n\\r\\n", 1)[1].decode())
"""


def test_sandbox_trusts_its_ca_through_the_bundle(
    sandbox: Sandbox, https_upstream: int, test_ca: trustme.CA
) -> None:
    trust = ssl.create_default_context()
    test_ca.configure_trust(trust)
    corral = {"hosts": rules_for(https_upstream), "tlsInterception": True}
    options = {
        "resolver": lambda host, port: ["127.0.0.1"],
        "address_ok": lambda addr: True,
        "upstream_trust": trust,
    }
    with net.attach(plan(corral=corral), pid=sandbox.pid, proxy_options=options) as attachment:
        assert attachment.proxy_url_inside is not None and attachment.ca_bundle_path is not None
        proxy_port = attachment.proxy_url_inside.rsplit(":", 1)[1]
        cmd = [PYTHON, "-c", _SANDBOX_CLIENT, proxy_port, str(https_upstream)]
        out = subprocess.run(
            sandbox.enter(*cmd, attachment.ca_bundle_path), capture_output=True, text=True
        )
        assert out.stdout.strip() == "GET /v1/in", out.stderr
        bundle = attachment.ca_bundle_path
    assert not os.path.exists(bundle)
