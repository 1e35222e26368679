"""Corral's policy proxy for ``corral.network.hosts``: an explicit HTTP proxy on the host's
loopback, the sandbox's only way out besides its CIDR rules.

- ``CONNECT host:port``: decided by host and port; the TLS ClientHello's SNI must name the
  same host, then bytes flow with ``os.splice`` (zero-copy, no Python copying).
- ``GET http://host/path`` (absolute form): decided by host, port, method and path; the
  Host header must match; one request per connection, so a second request cannot ride on
  an allowed one.
- With ``tlsInterception``, a tunnel to a host that method/path rules name is decrypted
  with a leaf from the sandbox's own CA and each request decided (``intercept.py``).
- Names are resolved by Corral once and pinned for the sandbox's life; addresses on the
  host's loopback, link-local, multicast or unspecified ranges are refused (no rebinding).
  Corral's DNS stub (``dns.py``) answers the sandbox's queries from the same pins.
- A refusal is ``403`` with a JSON body naming the rule; every decision goes to ``audit``.

One thread per connection and one more per tunnel (blocking sockets make ``os.splice``
simple), taken from a pool of waiting threads (``workers.py``): starting a thread would
cost more than everything else a new connection needs.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import h11

from corral.contract.model import CorralNetworkSpec
from corral.net import hostrules, intercept
from corral.net.ca import SandboxCA
from corral.net.dns import DnsStub
from corral.net.pins import PinRefused, Pins, Resolver, not_local, system_resolver
from corral.net.refusal import Refused, send_refusal
from corral.net.tls import client_hello_sni
from corral.net.workers import Workers

CONNECT_TIMEOUT_S = 10.0
_PIPE_SIZE = 1 << 20
_SPLICE_FLAGS = os.SPLICE_F_MOVE  # not F_MORE: it corks small replies (+400 ms)
_TUNNEL_OPEN = b"HTTP/1.1 200 Connection established\r\n\r\n"  # h11 takes 25 us for it


class PolicyProxy:
    def __init__(
        self,
        corral: CorralNetworkSpec,
        *,
        audit: Callable[[dict[str, Any]], None] | None = None,
        resolver: Resolver = system_resolver,
        address_ok: Callable[[str], bool] = not_local,
        listen: str = "127.0.0.1",
        upstream_trust: ssl.SSLContext | None = None,  # tests only: a test CA's context
        server: socket.socket | None = None,
    ) -> None:
        self._rules = corral.hosts
        self._audit = audit
        self._pins = Pins(resolver, address_ok)
        self._ca = SandboxCA() if corral.tls_interception else None
        self._upstream_tls = intercept.upstream_context(upstream_trust)
        self._dns = DnsStub(self._name_allowed, self._pins, audit=audit, listen=listen)
        # ``server``: a listening socket made elsewhere, e.g. inside the sandbox's own network
        # namespace, so its traffic reaches the proxy on its loopback, not through slirp4netns.
        self._server = server if server is not None else socket.create_server((listen, 0))
        self.port: int = self._server.getsockname()[1]
        self.inside_sandbox = server is not None
        self.dns_port: int = self._dns.port  # UDP and TCP
        self._thread: threading.Thread | None = None
        self._workers = Workers("corral-proxy-conn")
        self._stopped = False

    @property
    def ca_bundle_path(self) -> str | None:
        """System roots plus this sandbox's CA (PEM, no key); None without interception."""
        return None if self._ca is None else self._ca.bundle_path

    def start(self) -> None:
        self._thread = threading.Thread(target=self._accept_loop, name="corral-proxy", daemon=True)
        self._thread.start()
        self._dns.start()

    def stop(self) -> None:
        self._stopped = True
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._workers.close()
        self._dns.stop()
        if self._ca is not None:
            self._ca.close()

    def replace_rules(self, corral: CorralNetworkSpec) -> None:
        self._rules = corral.hosts  # one reference swap: each connection reads it once

    def _name_allowed(self, name: str) -> bool:
        return hostrules.name_allowed(self._rules, name)

    def describe(self) -> list[str]:
        rules = self._rules
        lines = [f"deny {hostrules.describe(r)}" for r in rules.deny]
        lines += [f"allow {hostrules.describe(r)}" for r in rules.allow]
        if self._ca is not None:
            lines.append("TLS interception: leaf certificates from a per-sandbox CA")
        lines.append(
            f"DNS stub on host loopback port {self.dns_port} (every IPv4 port-53 query of the "
            "sandbox is DNATed to it): answers only allowed names, from the pins"
        )
        return [*lines, f"listening on host loopback port {self.port}; everything else denied"]

    # -- connections ----------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self._server.accept()
            except OSError:
                if self._stopped:
                    return
                time.sleep(0.01)  # a client that reset before accept(), or out of fds: go on
                continue
            try:
                self._workers.submit(functools.partial(self._serve, conn))
            except RuntimeError:  # no thread could be started (the host's limit): refuse it
                conn.close()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(CONNECT_TIMEOUT_S)
            h11conn = h11.Connection(h11.SERVER)
            try:
                request, body = _read_request(conn, h11conn)
                if request.method == b"CONNECT":
                    self._tunnel(conn, h11conn, request)
                else:
                    self._forward(conn, h11conn, request, body)
            except Refused as refusal:
                send_refusal(conn, h11conn, refusal)
            except (OSError, h11.ProtocolError, ValueError):
                return

    def _tunnel(self, conn: socket.socket, h11conn: h11.Connection, request: h11.Request) -> None:
        host, port = _split_authority(request.target.decode("ascii", "replace"), 443)
        decision = hostrules.decide_tunnel(self._rules, host, port, intercept=self._ca is not None)
        self._record(decision.allowed, host, port, None, None, decision.rule)
        if not decision.allowed:
            raise Refused(f"CONNECT {host}:{port} is denied: {decision.rule}", decision.rule)
        if decision.inspect:
            self._intercept(conn, h11conn, host, port)
            return
        upstream = self._connect(host, port)
        with upstream:
            conn.sendall(_TUNNEL_OPEN)
            leftover = bytes(h11conn.trailing_data[0])
            sni = client_hello_sni(leftover or _peek_hello(conn))
            if sni is not None and sni.lower().rstrip(".") != host.lower().rstrip("."):
                self._record(False, host, port, None, None, f"SNI {sni!r} does not match {host!r}")
                return
            if leftover:
                upstream.sendall(leftover)
            conn.settimeout(None)
            upstream.settimeout(None)
            self._splice_both_ways(conn, upstream)

    def _intercept(
        self, conn: socket.socket, h11conn: h11.Connection, host: str, port: int
    ) -> None:
        assert self._ca is not None, "inspection is decided only with interception on"
        conn.sendall(_TUNNEL_OPEN)
        sni = None if h11conn.trailing_data[0] else client_hello_sni(_peek_hello(conn))
        if sni is None or sni.lower().rstrip(".") != host:
            # Pipelined bytes, plain text or another name: nothing this proxy can decrypt.
            self._record(False, host, port, None, None, f"TLS hello naming {sni!r} expected")
            return
        intercept.serve(
            conn,
            host,
            port,
            server_context=self._ca.server_context(host),
            upstream_context=self._upstream_tls,
            check=lambda method, path: self._check(host, port, method, path),
            open_upstream=lambda: self._connect(host, port),
        )

    def _forward(
        self, conn: socket.socket, h11conn: h11.Connection, request: h11.Request, body: bytes
    ) -> None:
        target = request.target.decode("ascii", "replace")
        if not target.startswith("http://"):
            raise Refused("only absolute http:// URLs and CONNECT are proxied", "proxy protocol")
        authority, _, rest = target[len("http://") :].partition("/")
        host, port = _split_authority(authority, 80)
        path = "/" + rest
        host_header = _header(request, b"host")
        if host_header is not None and _split_authority(host_header, 80) != (host, port):
            raise Refused(f"Host header {host_header!r} does not match {authority!r}", "host match")
        self._check(host, port, request.method.decode(), path)
        upstream = self._connect(host, port)
        with upstream:
            client = h11.Connection(h11.CLIENT)
            headers = [(k, v) for k, v in request.headers if k.lower() not in _HOP_BY_HOP]
            headers.append((b"connection", b"close"))
            out = client.send(h11.Request(method=request.method, target=path, headers=headers))
            out = (out or b"") + (client.send(h11.Data(data=body)) or b"") if body else out or b""
            upstream.sendall(out + (client.send(h11.EndOfMessage()) or b""))
            conn.settimeout(None)
            upstream.settimeout(None)
            _splice(upstream, conn)  # the response; the client gets no second request in

    # -- decisions --------------------------------------------------------------------------
    def _check(self, host: str, port: int, method: str | None, path: str | None) -> None:
        if path is not None and _has_dot_segments(path):
            self._record(False, host, port, method, path, "path with dot segments")
            raise Refused(f"path {path!r} has dot segments a server may resolve", "path")
        decision = hostrules.decide(self._rules, host, port, method, path)
        self._record(decision.allowed, host, port, method, path, decision.rule)
        if not decision.allowed:
            raise Refused(
                f"{method or 'CONNECT'} {host}:{port}{path or ''} is denied", decision.rule
            )

    def _connect(self, host: str, port: int) -> socket.socket:
        for addr in self._pin(host, port):
            try:
                return _open_upstream(addr, port)
            except OSError:
                continue
        raise Refused(f"cannot connect to {host}:{port}", "upstream unreachable")

    def _splice_both_ways(self, a: socket.socket, b: socket.socket) -> None:
        back_done = threading.Event()

        def back() -> None:
            _splice(b, a)
            back_done.set()

        self._workers.submit(back)
        _splice(a, b)
        back_done.wait()

    def _pin(self, host: str, port: int) -> list[str]:
        try:
            return self._pins.addresses(host, port)
        except PinRefused as refusal:
            self._record(False, host, port, None, None, refusal.reason)
            raise Refused(refusal.reason, refusal.rule) from refusal

    def _record(
        self, allowed: bool, host: str, port: int, method: str | None, path: str | None, rule: str
    ) -> None:
        if self._audit is not None:
            self._audit(
                {
                    "event": "network.proxy",
                    "decision": "allow" if allowed else "deny",
                    "host": host,
                    "port": port,
                    "method": method or "CONNECT",
                    "path": path,
                    "rule": rule,
                }
            )


_HOP_BY_HOP = intercept.HOP_BY_HOP


def _has_dot_segments(path: str) -> bool:
    """``/v1/../admin`` matches the prefix ``/v1/`` but a server may serve ``/admin``."""
    decoded = urllib.parse.unquote(path.partition("?")[0])
    return "\\" in decoded or any(seg in (".", "..") for seg in decoded.split("/"))


def _read_request(conn: socket.socket, h11conn: h11.Connection) -> tuple[h11.Request, bytes]:
    request: h11.Request | None = None
    body = b""
    while True:
        event = h11conn.next_event()
        if event is h11.NEED_DATA:
            h11conn.receive_data(conn.recv(65536))
        elif isinstance(event, h11.Request):
            request = event
            if event.method == b"CONNECT":
                return event, b""
        elif isinstance(event, h11.Data):
            body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage) and request is not None:
            return request, body
        else:
            raise ValueError("the client closed before sending a request")


def _header(request: h11.Request, name: bytes) -> str | None:
    for key, value in request.headers:
        if key.lower() == name:
            return bytes(value).decode("ascii", "replace")
    return None


def _split_authority(authority: str, default_port: int) -> tuple[str, int]:
    authority = authority.rpartition("@")[2]
    if authority.startswith("["):
        host, _, rest = authority[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = authority.partition(":")
    port = int(port_text) if port_text else default_port
    if not host or not 0 < port < 65536:
        raise Refused(f"bad destination {authority!r}", "proxy protocol")
    return host.lower().rstrip("."), port


def _peek_hello(conn: socket.socket) -> bytes:
    """The client's first bytes, waiting (briefly) for a whole TLS record when it is one."""
    data = b""
    for _ in range(20):
        data = conn.recv(16384, socket.MSG_PEEK)
        if not data or data[0] != 0x16 or client_hello_sni(data) != "" or len(data) >= 16384:
            return data
        threading.Event().wait(0.05)
    return data


def _open_upstream(addr: str, port: int) -> socket.socket:
    # Pins are address literals: no getaddrinfo (create_connection's) on this path.
    upstream = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
    try:
        upstream.settimeout(CONNECT_TIMEOUT_S)
        upstream.connect((addr, port))
    except OSError:
        upstream.close()
        raise
    return upstream


@contextlib.contextmanager
def _pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    try:
        with contextlib.suppress(OSError):  # 1 MiB: 16x fewer round trips than 64 KiB
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        yield read_end, write_end
    finally:
        os.close(read_end)
        os.close(write_end)


def _splice(src: socket.socket, dst: socket.socket) -> None:
    """Copy ``src`` to ``dst`` until EOF through a kernel pipe, then half-close ``dst``.
    Never raises: the other direction's thread may still use both sockets."""
    try:
        with _pipe() as (read_end, write_end):
            while True:
                moved = os.splice(src.fileno(), write_end, _PIPE_SIZE, flags=_SPLICE_FLAGS)
                if moved == 0:
                    break
                while moved:
                    moved -= os.splice(read_end, dst.fileno(), moved, flags=_SPLICE_FLAGS)
    except OSError:
        pass  # a reset, or no fds left for the pipe: this direction ends
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


__all__: Sequence[str] = ("PolicyProxy", "Refused", "not_local", "system_resolver")
