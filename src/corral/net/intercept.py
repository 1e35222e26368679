"""One intercepted HTTPS request inside a CONNECT tunnel (opt-in ``tlsInterception``).

The proxy terminates the sandbox's TLS with a leaf certificate from the sandbox's own CA,
reads the request with h11, has it decided (method and path; the Host header must name
the tunnel's host), then sends it to the real upstream over TLS verified against the
system's roots (or the trust a test passes in) and relays the response. One request per
tunnel (``Connection: close``), so no second request rides on an allowed one; the body is
streamed only after the request line and headers were allowed.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable

import h11

from corral.net.refusal import Refused, send_refusal

TIMEOUT_S = 10.0
HOP_BY_HOP = frozenset(
    (b"connection", b"proxy-connection", b"keep-alive", b"proxy-authorization", b"te",
     b"trailer", b"transfer-encoding", b"upgrade")
)  # fmt: skip
Check = Callable[[str, str], None]  # (method, path); raises Refused


def serve(
    client: socket.socket,
    host: str,
    port: int,
    *,
    server_context: ssl.SSLContext,
    upstream_context: ssl.SSLContext,
    check: Check,
    open_upstream: Callable[[], socket.socket],
) -> None:
    """Handle the tunnel on ``client`` (after the proxy's ``200``) until its one request ends."""
    with server_context.wrap_socket(client, server_side=True) as tls:
        h11conn = h11.Connection(h11.SERVER)
        try:
            request = _next_request(tls, h11conn)
            check(request.method.decode("ascii", "replace"), _origin_path(request, host, port))
            with _open_verified(open_upstream, upstream_context, host) as upstream:
                _relay(tls, h11conn, request, upstream)
        except Refused as refusal:
            send_refusal(tls, h11conn, refusal)


def _next_request(tls: socket.socket, h11conn: h11.Connection) -> h11.Request:
    while True:
        event = h11conn.next_event()
        if event is h11.NEED_DATA:
            h11conn.receive_data(tls.recv(65536))
        elif isinstance(event, h11.Request):
            return event
        else:
            raise OSError("the client closed before sending a request")


def _origin_path(request: h11.Request, host: str, port: int) -> str:
    target = request.target.decode("ascii", "replace")
    if not target.startswith("/"):
        raise Refused(f"request target {target!r} is not a path", "proxy protocol")
    for key, value in request.headers:
        if key.lower() == b"host":
            named, _, named_port = bytes(value).decode("ascii", "replace").lower().partition(":")
            if named.rstrip(".") != host or (named_port and named_port != str(port)):
                raise Refused(f"Host header {named!r} does not match {host!r}", "host match")
    return target


def _open_verified(
    open_upstream: Callable[[], socket.socket], context: ssl.SSLContext, host: str
) -> ssl.SSLSocket:
    raw = open_upstream()
    try:
        return context.wrap_socket(raw, server_hostname=host)
    except (ssl.SSLError, OSError) as exc:
        raw.close()
        raise Refused(
            f"upstream {host} failed TLS verification: {exc}", "upstream tls", 502
        ) from exc


def _relay(
    tls: socket.socket, h11conn: h11.Connection, request: h11.Request, upstream: ssl.SSLSocket
) -> None:
    client = h11.Connection(h11.CLIENT)
    # h11 frames a request body only as its headers say, so transfer-encoding stays.
    headers = [
        (k, v)
        for k, v in request.headers
        if k.lower() not in HOP_BY_HOP or k.lower() == b"transfer-encoding"
    ]
    upstream.sendall(
        client.send(h11.Request(method=request.method, target=request.target, headers=headers))
        or b""
    )
    while True:  # the request body, streamed
        event = h11conn.next_event()
        if event is h11.NEED_DATA:
            h11conn.receive_data(tls.recv(65536))
        elif isinstance(event, h11.Data):
            upstream.sendall(client.send(h11.Data(data=event.data)) or b"")
        elif isinstance(event, h11.EndOfMessage):
            upstream.sendall(client.send(h11.EndOfMessage()) or b"")
            break
        else:
            raise OSError("the client closed in the middle of its request")
    tls.settimeout(None)
    upstream.settimeout(None)
    while True:  # the response, re-framed for a connection that then closes
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(upstream.recv(65536))
        elif isinstance(event, h11.InformationalResponse):
            pass  # e.g. 100 Continue: the whole body was already sent
        elif isinstance(event, h11.Response):
            kept = [(k, v) for k, v in event.headers if k.lower() not in HOP_BY_HOP]
            kept.append((b"connection", b"close"))  # h11 re-frames the body for the client
            response = h11.Response(
                status_code=event.status_code, headers=kept, reason=event.reason
            )
            tls.sendall(h11conn.send(response) or b"")
        elif isinstance(event, h11.Data):
            tls.sendall(h11conn.send(h11.Data(data=event.data)) or b"")
        elif isinstance(event, h11.EndOfMessage):
            tls.sendall(h11conn.send(h11.EndOfMessage()) or b"")
            return
        else:
            return


def upstream_context(trust: ssl.SSLContext | None) -> ssl.SSLContext:
    """The client context that verifies upstreams: the system's roots unless given one."""
    context = trust or ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])
    return context
