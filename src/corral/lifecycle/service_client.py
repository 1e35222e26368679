"""Talk to `corral serve` over its unix socket with the standard library (fast to import)."""

from __future__ import annotations

import http.client
import json
import os
import socket
from typing import Any

from corral.lifecycle import store
from corral.lifecycle.privsep import unwrap

TIMEOUT_S = 60.0


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=TIMEOUT_S)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT_S)
        self.sock.connect(self._path)


def available() -> bool:
    """A service is running (its socket exists) and we are not it (CORRAL_NO_SERVICE unset)."""
    return not os.environ.get("CORRAL_NO_SERVICE") and os.path.exists(store.service_socket())


def call(op: str, **params: Any) -> Any:
    """One operation through the service; its result, or its error raised as CorralError."""
    conn = _UnixConnection(store.service_socket())
    try:
        conn.request("POST", f"/v1/{op}", json.dumps(params), {"Content-Type": "application/json"})
        reply = json.loads(conn.getresponse().read() or b"{}")
    finally:
        conn.close()
    return unwrap(reply)
