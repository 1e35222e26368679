"""The control-socket protocol between callers and a sandbox's init (the native launcher's
serve loop, corral/native/launch.c).

An AF_UNIX SOCK_SEQPACKET socket: every message is one packet, and may carry file descriptors
(SCM_RIGHTS). Caller -> init: an exec request as records (corral.native.records.exec_request:
command, env, cwd, timeout, pty) with the workload's stdin/stdout/stderr (or one pty slave)
attached, then optionally the kill record. Init -> caller, one JSON object per packet:
``{"event": "started", "pid"}`` or ``{"event": "error", "message"}``, then
``{"event": "exit", "code", "timedOut"}``. Closing the connection kills the workload.
"""

from __future__ import annotations

import array
import json
import socket
from typing import Any

MAX_MESSAGE = 256 * 1024
MAX_FDS = 3


def send(sock: socket.socket, data: bytes, fds: list[int] | None = None) -> None:
    # MSG_NOSIGNAL: the sandbox's init runs with SIGPIPE at its default (so its workloads do);
    # a caller that hung up must give EPIPE there, not kill the init.
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], ancillary, socket.MSG_NOSIGNAL)


def receive(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and its descriptors; (None, []) at EOF. Malformed data counts as EOF."""
    data, ancillary, _, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * 4))
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(payload[: len(payload) - len(payload) % 4])
            fds.extend(received)
    if not data:
        return None, fds
    try:
        message = json.loads(data)
    except ValueError:
        return None, fds
    return (message if isinstance(message, dict) else None), fds
