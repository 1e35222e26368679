"""The caller's handle on a running process sandbox: streams, wait with deadline, kill."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import struct
import termios
import time
from collections.abc import Callable
from typing import IO

from corral.backends.base import SandboxProcess


class ProcessSandbox(SandboxProcess):
    def __init__(
        self,
        pid: int,
        *,
        timeout_ms: int,
        lifeline_w: int,
        stdin: IO[bytes] | None,
        stdout: IO[bytes] | None,
        stderr: IO[bytes] | None,
        pty_fd: int | None,
        cleanups: list[Callable[[], None]],
        kill_tree: Callable[[], None] | None = None,
    ) -> None:
        self.pid = pid
        self.stdin, self.stdout, self.stderr, self.pty_fd = stdin, stdout, stderr, pty_fd
        self._pidfd = os.pidfd_open(pid)
        self._lifeline_w = lifeline_w
        self._deadline = time.monotonic() + timeout_ms / 1000 if timeout_ms else None
        self._cleanups = cleanups
        self._kill_tree = kill_tree
        self._returncode: int | None = None
        self._timed_out = False
        self._closed = False

    @property
    def deadline(self) -> float | None:
        return self._deadline

    def fileno_for_exit(self) -> int | None:
        return self._pidfd

    def poll(self) -> int | None:
        if self._returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._record(status)
        return self._returncode

    def wait(self, timeout: float | None = None) -> int:
        limit = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            now = time.monotonic()
            if self._deadline is not None and now >= self._deadline:
                self.expire()
                continue
            ends = [t for t in (self._deadline, limit) if t is not None]
            if limit is not None and now >= limit:
                raise TimeoutError(f"sandbox {self.pid} still running after {timeout} s")
            select.select([self._pidfd], [], [], (min(ends) - now) if ends else None)
        assert self._returncode is not None
        return self._returncode

    def expire(self) -> None:
        """The plan's timeout passed: kill everything and remember why."""
        self._timed_out = True
        self.kill()

    def kill(self) -> None:
        if self._returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)  # its init dies with it, and so its PID namespace
        if self._kill_tree is not None:
            self._kill_tree()

    def resize(self, rows: int, columns: int) -> None:
        if self.pty_fd is None:
            raise RuntimeError("this sandbox was not started with a pty")
        fcntl.ioctl(self.pty_fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.poll() is None:
            self.kill()
            self.wait()
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        if self.pty_fd is not None:
            os.close(self.pty_fd)
        os.close(self._pidfd)
        os.close(self._lifeline_w)
        for cleanup in reversed(self._cleanups):
            cleanup()

    def _record(self, status: int) -> None:
        self._returncode = (
            128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        )


def output_buffers(proc: SandboxProcess) -> dict[int, list[bytes]]:
    """One buffer per output descriptor of ``proc`` (its pipes, or its pty)."""
    out: dict[int, list[bytes]] = {}
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            out[stream.fileno()] = []
    if proc.pty_fd is not None:
        out[proc.pty_fd] = []
    return out


def stdin_writers(proc: SandboxProcess, stdin_data: bytes | None) -> list[int]:
    """The stdin descriptor to feed, if any; stdin is closed at once when there is nothing."""
    writers = [proc.stdin.fileno()] if proc.stdin is not None and stdin_data else []
    if proc.stdin is not None and not writers:
        proc.stdin.close()
    return writers


def read_ready(fd: int, out: dict[int, list[bytes]], readers: list[int]) -> None:
    """Read what ``fd`` has; at EOF (or the pty's EIO) stop watching it."""
    try:
        chunk = os.read(fd, 65536)
    except OSError:  # EIO: the pty's last writer closed
        chunk = b""
    if chunk:
        out[fd].append(chunk)
    else:
        readers.remove(fd)


def feed_stdin(proc: SandboxProcess, writers: list[int], pending: memoryview) -> memoryview:
    """Write the next chunk of stdin; close stdin when all is written or the reader left."""
    try:
        pending = pending[os.write(writers[0], pending[:65536]) :]
    except BrokenPipeError:
        pending = pending[:0]
    if not pending:
        assert proc.stdin is not None
        proc.stdin.close()
        writers.clear()
    return pending


def collected(proc: SandboxProcess, out: dict[int, list[bytes]]) -> tuple[bytes, bytes]:
    """(stdout, stderr) from the buffers; a pty's single stream counts as stdout."""
    stdout = b"".join(out[proc.stdout.fileno()]) if proc.stdout is not None else b""
    stderr = b"".join(out[proc.stderr.fileno()]) if proc.stderr is not None else b""
    if proc.pty_fd is not None:
        stdout = b"".join(out[proc.pty_fd])
    return stdout, stderr


def communicate(proc: SandboxProcess, stdin_data: bytes | None = None) -> tuple[bytes, bytes]:
    """Feed stdin, collect stdout/stderr until exit, enforcing the plan's deadline."""
    out = output_buffers(proc)
    readers = list(out)
    pending = memoryview(stdin_data or b"")
    writers = stdin_writers(proc, stdin_data)
    deadline = getattr(proc, "deadline", None)
    while readers or writers:
        wait_for = None if deadline is None else max(0.0, deadline - time.monotonic())
        rlist, wlist, _ = select.select(readers, writers, [], wait_for)
        if not rlist and not wlist:
            if (
                deadline is not None
                and time.monotonic() >= deadline
                and isinstance(proc, ProcessSandbox)
            ):
                proc.expire()
                deadline = None
            continue
        for fd in rlist:
            read_ready(fd, out, readers)
        if wlist:
            pending = feed_stdin(proc, writers, pending)
    proc.wait()
    return collected(proc, out)
