"""Corral's policy proxy: hostnames, methods and paths, SNI/Host matching, pinned DNS."""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from http_echo import EchoHandler
from nettestbed import PYTHON, Sandbox
from test_net_rules import plan

from corral import net
from corral.contract.extensions import build_corral_section
from corral.net.policy_proxy import PolicyProxy, not_local

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def make_proxy(
    hosts: dict[str, Any],
    events: list[dict[str, Any]] | None = None,
    answers: dict[str, list[str]] | None = None,
    local_ok: bool = True,
) -> PolicyProxy:
    corral = build_corral_section({"network": {"hosts": hosts}}).network
    table = answers or {}
    proxy = PolicyProxy(
        corral,
        audit=None if events is None else events.append,
        resolver=lambda host, port: table.get(host, ["127.0.0.1"]),
        address_ok=(lambda a: True) if local_ok else not_local,
    )
    proxy.start()
    return proxy


def get(
    proxy_port: int, url: str, method: str = "GET", host: str | None = None
) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=5) as conn:
        authority = host or url.split("/")[2]
        conn.sendall(
            f"{method} {url} HTTP/1.1\r\nHost: {authority}\r\ncontent-length: 0\r\n\r\n".encode()
        )
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_hostname_allow_and_deny(upstream: int) -> None:
    events: list[dict[str, Any]] = []
    proxy = make_proxy(
        {
            "allow": [{"host": "*.good.test", "ports": [upstream]}],
            "deny": [{"host": "bad.good.test", "ports": [upstream]}],
        },
        events,
    )
    try:
        assert get(proxy.port, f"http://api.good.test:{upstream}/x") == (200, b"GET /x")
        status, body = get(proxy.port, f"http://bad.good.test:{upstream}/x")
        assert status == 403 and "hosts.deny[0]" in json.loads(body)["rule"]
        status, body = get(proxy.port, f"http://other.test:{upstream}/x")
        assert status == 403 and "no hosts.allow rule" in json.loads(body)["rule"]
        assert get(proxy.port, f"http://good.test:{upstream}/x")[0] == 403  # *. means subdomains
    finally:
        proxy.stop()
    assert [e["decision"] for e in events] == ["allow", "deny", "deny", "deny"]


def test_method_and_path_rules(upstream: int) -> None:
    proxy = make_proxy(
        {
            "allow": [
                {"host": "api.test", "ports": [upstream], "methods": ["GET"], "paths": ["/v1/"]}
            ]
        }
    )
    try:
        assert get(proxy.port, f"http://api.test:{upstream}/v1/items") == (200, b"GET /v1/items")
        assert get(proxy.port, f"http://api.test:{upstream}/v1/items", "POST")[0] == 403
        assert get(proxy.port, f"http://api.test:{upstream}/admin")[0] == 403
    finally:
        proxy.stop()


def test_host_header_must_match(upstream: int) -> None:
    proxy = make_proxy({"allow": [{"host": "api.test", "ports": [upstream]}]})
    try:
        assert get(proxy.port, f"http://api.test:{upstream}/")[0] == 200
        assert get(proxy.port, f"http://api.test:{upstream}/", host="evil.test")[0] == 403
    finally:
        proxy.stop()


def _client_hello(name: str) -> bytes:
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    with contextlib.suppress(ssl.SSLWantReadError):
        ctx.wrap_bio(incoming, outgoing, server_hostname=name).do_handshake()
    return outgoing.read()


@pytest.mark.parametrize(("sni", "forwarded"), [("api.test", True), ("evil.test", False)])
def test_connect_sni_must_match(sni: str, forwarded: bool) -> None:
    sink = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def accept() -> None:
        conn, _ = sink.accept()
        with conn:
            received.append(conn.recv(65536))

    threading.Thread(target=accept, daemon=True).start()
    port = sink.getsockname()[1]
    proxy = make_proxy({"allow": [{"host": "api.test", "ports": [port]}]})
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as conn:
            conn.sendall(
                f"CONNECT api.test:{port} HTTP/1.1\r\nHost: api.test:{port}\r\n\r\n".encode()
            )
            assert conn.recv(4096).startswith(b"HTTP/1.1 200")
            conn.sendall(_client_hello(sni))
            conn.settimeout(3)
            with contextlib.suppress(OSError):
                conn.recv(10)
        threading.Event().wait(0.3)
        assert bool(received and received[0].startswith(b"\x16")) is forwarded
    finally:
        proxy.stop()
        sink.close()


def test_dns_rebinding_to_loopback_refused(upstream: int) -> None:
    proxy = make_proxy({"allow": [{"host": "rebind.test", "ports": [upstream]}]}, local_ok=False)
    try:
        status, body = get(proxy.port, f"http://rebind.test:{upstream}/")
        assert status == 403 and json.loads(body)["rule"] == "dns rebinding"
    finally:
        proxy.stop()


def test_resolution_is_pinned(upstream: int) -> None:
    answers = {"api.test": ["127.0.0.1"]}
    proxy = make_proxy({"allow": [{"host": "api.test", "ports": [upstream]}]}, answers=answers)
    try:
        assert get(proxy.port, f"http://api.test:{upstream}/")[0] == 200
        answers["api.test"] = ["127.0.0.9"]  # a second answer would fail to connect
        assert get(proxy.port, f"http://api.test:{upstream}/")[0] == 200
    finally:
        proxy.stop()


def test_hot_reload(upstream: int) -> None:
    proxy = make_proxy({"allow": [{"host": "api.test", "ports": [upstream]}]})
    try:
        assert get(proxy.port, f"http://api.test:{upstream}/")[0] == 200
        proxy.replace_rules(build_corral_section({"network": {"hosts": {}}}).network)
        assert get(proxy.port, f"http://api.test:{upstream}/")[0] == 403
    finally:
        proxy.stop()


def test_sandbox_reaches_only_the_policy_proxy(sandbox: Sandbox) -> None:
    corral = {"hosts": {"allow": [{"host": "api.test"}]}}
    with net.attach(plan(corral=corral), pid=sandbox.pid) as attachment:
        assert attachment.proxy_url_inside is not None
        port = int(attachment.proxy_url_inside.rsplit(":", 1)[1])
        code = (
            f"import socket; s = socket.create_connection(('10.0.2.2', {port}), timeout=3);"
            "s.sendall(b'GET http://denied.test/ HTTP/1.1\\r\\nHost: denied.test\\r\\n\\r\\n');"
            "print(s.recv(200).split()[1].decode())"
        )
        out = subprocess.run(sandbox.enter(PYTHON, "-c", code), capture_output=True, text=True)
        assert out.stdout.strip() == "403"
        assert any("policy-proxy: allow api.test" in line for line in attachment.describe())
