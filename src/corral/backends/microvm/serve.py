"""A running VM's side of the lifecycle control socket (corral/lifecycle/protocol.py): the same
exec protocol a process sandbox's init speaks, so callers cannot tell the two apart.

One connection carries one exec: a request (corral.native.records: A argv, E env, C cwd,
t timeout, p pty) with the caller's stdin, stdout and stderr attached (or, with ``p``, the
slave of the caller's pty, relayed to a terminal in the guest); the workload's streams go
straight to those descriptors. Replies: ``started`` (pid: QEMU's, the host-side process of
the workload) or ``error``, then ``exit {code, timedOut}``. The kill record, or the caller
hanging up, kills the workload. The agent runs one workload at a time: an exec arriving while
another runs waits up to BUSY_WAIT_S for it to end (a caller that just hung up on the previous
one need not race its kill), then is refused with an ``error``.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import threading
from typing import Any

from corral.backends.microvm.process import GuestProcess
from corral.backends.microvm.vm import MicroVM
from corral.errors import CorralError
from corral.lifecycle import protocol
from corral.native import records

BUSY_WAIT_S = 2.0


def serve(vm: MicroVM, listener: socket.socket) -> None:
    """Accept exec connections on ``listener`` for as long as this process lives."""
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_serve_one, args=(vm, conn), daemon=True).start()


def _serve_one(vm: MicroVM, conn: socket.socket) -> None:
    with conn:
        data, fds, _, _ = socket.recv_fds(conn, protocol.MAX_MESSAGE, protocol.MAX_FDS)
        try:
            proc = _start(vm, data, fds)
        except (CorralError, ValueError, UnicodeDecodeError) as exc:
            for fd in fds:
                os.close(fd)
            message = exc.message if isinstance(exc, CorralError) else f"malformed request: {exc}"
            _reply(conn, {"event": "error", "message": message})
            return
        try:
            _reply(conn, {"event": "started", "pid": vm.pid})
            outcome = _follow(conn, proc)
        finally:
            proc.close()  # before the exit reaches the caller: its next exec finds the VM free
        if outcome is not None:
            code, timed_out = outcome
            _reply(conn, {"event": "exit", "code": code, "timedOut": timed_out})


def _start(vm: MicroVM, data: bytes, fds: list[int]) -> GuestProcess:
    argv: list[str] = []
    env: dict[str, str] = {}
    cwd, timeout_ms, pty = "/", 0, False
    for tag, fields in records.decode(data):
        if tag == "A":
            argv.append(fields[0])
        elif tag == "E":
            key, _, value = fields[0].partition("=")
            env[key] = value
        elif tag == "C":
            cwd = fields[0]
        elif tag == "t":
            timeout_ms = int(fields[0])
        elif tag == "p":
            pty = True
    if not argv or len(fds) != (1 if pty else 3):
        raise ValueError("an exec needs a command and three stdio descriptors, or one pty")
    streams = {"terminal": fds[0]} if pty else {"stdio": (fds[0], fds[1], fds[2])}
    return vm.exec(argv, cwd=cwd, env=env, timeout_ms=timeout_ms, wait_s=BUSY_WAIT_S, **streams)


def _follow(conn: socket.socket, proc: GuestProcess) -> tuple[int, bool] | None:
    """Until the workload exits: the caller's kill record or hang-up kills it. Its exit code
    and whether it timed out; None when the caller hung up."""
    exited = proc.fileno_for_exit()
    assert exited is not None
    while True:
        ready = select.select([conn.fileno(), exited], [], [])[0]
        if exited in ready:
            break
        if not conn.recv(64):  # hang-up: nobody to report to
            proc.kill()
            return None
        proc.kill()  # the kill record (the only thing a caller sends after the request)
    return proc.wait(), proc.timed_out


def _reply(conn: socket.socket, message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        protocol.send(conn, json.dumps(message).encode())
