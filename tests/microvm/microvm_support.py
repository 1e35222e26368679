"""Helpers for the micro-VM tests: run a command in a booted VM and collect everything."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from corral.backends.microvm import MicroVM, MicrovmBackend
from corral.contract.model import FilesystemSpec, ProcessSpec, Request
from corral.plan import Plan, build_plan

GUEST_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class Tree:
    ro: Path  # granted read-only
    rw: Path  # granted read-write
    denied: Path  # inside rw, denied
    hidden: Path  # exists on the host, granted nowhere


@dataclass
class Result:
    code: int
    out: str
    err: str
    timed_out: bool


def run(
    vm: MicroVM, command: str, *, stdin: bytes = b"", timeout_ms: int = 0, cwd: str = "/"
) -> Result:
    proc = vm.exec(
        ["/bin/sh", "-c", command], cwd=cwd, env={"PATH": GUEST_PATH}, timeout_ms=timeout_ms
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        proc.stdin.write(stdin)
        proc.stdin.close()
        out = proc.stdout.read().decode()
        err = proc.stderr.read().decode()
        code = proc.wait(timeout=120)
        return Result(code, out, err, proc.timed_out)
    finally:
        proc.close()


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def make_plan(
    backend: MicrovmBackend, tree: Tree, command: str = "true", timeout_ms: int = 0
) -> Plan:
    request = Request(
        version="1.1.0-alpha",
        containment="microvm",
        process=ProcessSpec(command, timeout_ms=timeout_ms),
        filesystem=FilesystemSpec(
            readonly_paths=(str(tree.ro),),
            readwrite_paths=(str(tree.rw),),
            denied_paths=(str(tree.denied),),
        ),
    )
    return build_plan(request, backend.probe())


def read_until(fd: int, token: bytes, timeout: float = 30.0) -> bytes:
    """What a pty master gives until ``token`` appears (or it closes, or time runs out)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while token not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: every slave is closed
                break
            if not chunk:
                break
            seen += chunk
    return seen


# Prints the terminal, its size, echoes a line typed on it, then the size after a resize.
TERMINAL_SCRIPT = (
    "test -t 0 && test -t 1 && test -t 2 && echo on-a-tty; stty size; read line; "
    "echo got:$line; sleep 1; stty size; exit 3"
)


GREETING = b"hello-from-host\n"


@contextlib.contextmanager
def greeting(server: socket.socket) -> Iterator[None]:
    """Answer every connection to the listening ``server`` with GREETING while the block runs;
    closes ``server`` at the end."""
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = server.accept()
                conn.sendall(GREETING)
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        server.close()
