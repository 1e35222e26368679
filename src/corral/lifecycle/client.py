"""The caller's side of one exec: connect to the sandbox's control socket, hand over the stdio
(or a pty), and follow the workload through the init's messages."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket
import struct
import termios
import time
from typing import IO, TYPE_CHECKING

from corral.backends.base import SandboxProcess
from corral.backends.process.handle import (
    collected,
    feed_stdin,
    output_buffers,
    read_ready,
    stdin_writers,
)
from corral.errors import CorralError, ErrorCode
from corral.lifecycle import protocol
from corral.native import records

if TYPE_CHECKING:
    from corral.api import RunAudit

KILLED_WITH_SANDBOX = 137  # the sandbox stopped under the workload: as if SIGKILLed
DRAIN_S = 0.05


class RemoteProcess(SandboxProcess):
    """A workload running in a started sandbox; ``pid`` is its pid inside the sandbox."""

    trail: RunAudit | None = None  # its audit trail's end (corral.lifecycle.trail)

    def __init__(
        self,
        conn: socket.socket,
        pid: int,
        *,
        stdin: IO[bytes] | None,
        stdout: IO[bytes] | None,
        stderr: IO[bytes] | None,
        pty_fd: int | None,
    ) -> None:
        self.pid = pid
        self.stdin, self.stdout, self.stderr, self.pty_fd = stdin, stdout, stderr, pty_fd
        self._conn = conn
        self._returncode: int | None = None
        self._timed_out = False

    def fileno_for_exit(self) -> int | None:
        return self._conn.fileno()

    def poll(self) -> int | None:
        if self._returncode is None and select.select([self._conn], [], [], 0)[0]:
            self._read_exit()
        return self._returncode

    def wait(self, timeout: float | None = None) -> int:
        limit = None if timeout is None else time.monotonic() + timeout
        while self._returncode is None:
            left = None if limit is None else max(0.0, limit - time.monotonic())
            if not select.select([self._conn], [], [], left)[0]:
                raise TimeoutError(f"workload {self.pid} still running after {timeout} s")
            self._read_exit()
        return self._returncode

    def _read_exit(self) -> None:
        try:
            message, fds = protocol.receive(self._conn)
        except OSError:
            message, fds = None, []
        for fd in fds:
            os.close(fd)
        if message is None:
            self._returncode = KILLED_WITH_SANDBOX
        elif message.get("event") == "exit":
            self._returncode = int(message["code"])
            self._timed_out = bool(message.get("timedOut"))

    def communicate(self, stdin_data: bytes | None = None) -> tuple[bytes, bytes]:
        """Feed stdin, collect stdout/stderr until the workload exits. Unlike a one-shot run,
        the sandbox outlives the workload, and so may a background process still holding the
        pipes: after the exit, output is read only until it pauses for DRAIN_S."""
        out = output_buffers(self)
        pending = memoryview(stdin_data or b"")
        writers = stdin_writers(self, stdin_data)
        readers = list(out)
        while readers or writers:
            exited = self._returncode is not None
            watch = readers if exited else [*readers, self._conn.fileno()]
            rlist, wlist, _ = select.select(watch, writers, [], DRAIN_S if exited else None)
            if not rlist and not wlist:
                break  # exited, and the pipes went quiet
            for fd in rlist:
                if fd == self._conn.fileno():
                    self._read_exit()
                else:
                    read_ready(fd, out, readers)
            if wlist:
                pending = feed_stdin(self, writers, pending)
        self.wait()
        return collected(self, out)

    def kill(self) -> None:
        if self._returncode is None:
            with contextlib.suppress(OSError):
                protocol.send(self._conn, records.KILL)

    def resize(self, rows: int, columns: int) -> None:
        if self.pty_fd is None:
            raise RuntimeError("this workload was not started with a pty")
        fcntl.ioctl(self.pty_fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

    def close(self) -> None:
        if self._conn.fileno() < 0:
            return
        self._conn.close()  # hanging up kills a workload that is still running
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        if self.pty_fd is not None:
            os.close(self.pty_fd)


def start_exec(
    control_path: str,
    *,
    command: tuple[str, ...],
    env: dict[str, str],
    cwd: str,
    timeout_ms: int,
    pty: tuple[int, int] | None = None,
    stdin_devnull: bool = False,
) -> RemoteProcess:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    theirs: list[int] = []
    streams: list[IO[bytes] | None] = [None, None, None]
    pty_master = None
    try:
        try:
            conn.connect(control_path)
        except OSError as exc:
            raise CorralError(
                f"the sandbox's control socket does not answer ({exc.strerror})",
                code=ErrorCode.NOT_STARTED,
                remediation="start the sandbox again",
            ) from exc
        if pty is not None:
            pty_master, slave = os.openpty()
            theirs.append(slave)
            fcntl.ioctl(pty_master, termios.TIOCSWINSZ, struct.pack("HHHH", pty[0], pty[1], 0, 0))
        else:
            for index in range(3):
                if index == 0 and stdin_devnull:
                    theirs.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
                    continue
                r, w = os.pipe2(os.O_CLOEXEC)
                mine, other = (w, r) if index == 0 else (r, w)
                theirs.append(other)
                streams[index] = os.fdopen(mine, "wb" if index == 0 else "rb", buffering=0)
        request = records.exec_request(
            list(command), env, cwd, timeout_ms=timeout_ms, pty=pty is not None
        )
        protocol.send(conn, request, theirs)
        for fd in theirs:
            os.close(fd)
        theirs.clear()
        reply, fds = protocol.receive(conn)
        for fd in fds:
            os.close(fd)
        if reply is None or reply.get("event") != "started":
            detail = reply.get("message") if reply else "the sandbox stopped"
            raise CorralError(f"exec failed to start: {detail}", code=ErrorCode.BACKEND_ERROR)
        return RemoteProcess(
            conn, int(reply["pid"]), stdin=streams[0], stdout=streams[1], stderr=streams[2],
            pty_fd=pty_master,
        )  # fmt: skip
    except BaseException:
        for fd in theirs if pty_master is None else [*theirs, pty_master]:
            with contextlib.suppress(OSError):
                os.close(fd)
        for stream in streams:
            if stream is not None:
                stream.close()
        conn.close()
        raise
