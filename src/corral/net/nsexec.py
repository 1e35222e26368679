"""Run a short function inside another process's network namespace (and user namespace).

A forked child joins the namespaces with setns(2) and reports back through a pipe; the
caller's own namespaces never change. A fork, not a thread: joining a user namespace is
refused to a multithreaded process.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
from collections.abc import Callable
from typing import Any

from corral.errors import CorralError, ErrorCode

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def namespace_fds(pid: int) -> list[tuple[int, int]]:
    """Open the namespaces of ``pid`` to join, in order: (fd, nstype). The caller closes them."""
    wanted: list[tuple[str, int]] = []
    if _differs(pid, "user"):
        wanted.append(("user", CLONE_NEWUSER))
    wanted.append(("net", CLONE_NEWNET))
    opened: list[tuple[int, int]] = []
    try:
        for name, nstype in wanted:
            opened.append((os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC), nstype))
    except OSError as exc:
        for fd, _ in opened:
            os.close(fd)
        raise CorralError(
            f"cannot open the namespaces of sandbox process {pid}: {exc}",
            code=ErrorCode.BACKEND_ERROR,
        ) from exc
    return opened


def run_in_netns(pid: int, func: Callable[[], Any], *, timeout: float = 10.0) -> Any:
    """Call ``func`` in a child that joined ``pid``'s namespaces; return its JSON-able result."""
    return _run_forked(namespace_fds(pid), func, timeout)


def run_in_fresh_netns(func: Callable[[], Any], *, timeout: float = 10.0) -> Any:
    """Call ``func`` in a child with a new, empty network namespace (a probe's trial)."""
    return _run_forked([], func, timeout)


def _run_forked(fds: list[tuple[int, int]], func: Callable[[], Any], timeout: float) -> Any:
    read_end, write_end = os.pipe()
    try:
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the forked child
            _child(fds, write_end, func)
        os.close(write_end)
        write_end = -1
        data = _read_all(read_end, timeout, child)
        os.waitpid(child, 0)
    finally:
        for fd, _ in fds:
            os.close(fd)
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    try:
        reply = json.loads(data)
    except ValueError:
        reply = {"error": "the namespace helper died without answering"}
    if "error" in reply:
        raise CorralError(
            f"inside the sandbox's network namespace: {reply['error']}",
            code=ErrorCode.BACKEND_ERROR,
        )
    return reply["result"]


def _child(fds: list[tuple[int, int]], write_end: int, func: Callable[[], Any]) -> None:
    try:
        for fd, nstype in fds:
            if _libc.setns(fd, nstype) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns: {os.strerror(err)}")
        if not fds:
            flags = CLONE_NEWNET | (CLONE_NEWUSER if os.geteuid() != 0 else 0)
            if _libc.unshare(flags) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"unshare: {os.strerror(err)}")
        reply: dict[str, Any] = {"result": func()}
    except BaseException as exc:
        reply = {"error": str(exc) or type(exc).__name__}
    try:
        os.write(write_end, json.dumps(reply).encode())
    finally:
        os._exit(0)


def _read_all(fd: int, timeout: float, child: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            os.kill(child, signal.SIGKILL)
            return b""
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _differs(pid: int, ns: str) -> bool:
    return os.stat(f"/proc/{pid}/ns/{ns}").st_ino != os.stat(f"/proc/self/ns/{ns}").st_ino
