"""The answer a refused request gets: an HTTP status with a JSON body naming the rule, so
the agent can read why and which rule to change."""

from __future__ import annotations

import json
import socket

import h11


class Refused(Exception):
    def __init__(self, reason: str, rule: str, status: int = 403) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rule = rule
        self.status = status  # 403 for policy, 502 when the upstream fails its checks


def send_refusal(conn: socket.socket, h11conn: h11.Connection, refusal: Refused) -> None:
    body = json.dumps(
        {"error": "denied by Corral network policy", "reason": refusal.reason, "rule": refusal.rule}
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    try:
        head = h11conn.send(h11.Response(status_code=refusal.status, headers=headers)) or b""
        data = h11conn.send(h11.Data(data=body)) or b""
        conn.sendall(head + data + (h11conn.send(h11.EndOfMessage()) or b""))  # one segment
    except (OSError, h11.LocalProtocolError):
        pass
