"""One workload running in a micro-VM, seen from the host as a SandboxProcess."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket
import struct
import termios
import threading
import tty
from collections.abc import Callable
from typing import IO

from corral.backends.base import LaunchOptions, SandboxProcess, StdioMode
from corral.backends.microvm import protocol

_KILL_GRACE = 5.0  # seconds the agent gets to report a killed workload before QEMU dies
_WINDOW_POLL_S = 0.1  # how often a terminal's size is checked for changes to pass on


class Channel:
    """The agent socket: whole frames out under a lock, frames in from one reader at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()

    def send(self, kind: bytes, payload: bytes = b"") -> None:
        with self._lock:
            self._sock.sendall(protocol.frame(kind, payload))

    def receive(self, timeout: float | None = None) -> tuple[bytes, bytes]:
        self._sock.settimeout(timeout)
        try:
            return protocol.read_frame(self._sock)
        except OSError as exc:
            if isinstance(exc, TimeoutError):
                raise
            raise protocol.AgentGone(f"the micro-VM's agent channel failed: {exc}") from exc

    def close(self) -> None:
        self._sock.close()


class GuestProcess(SandboxProcess):
    def __init__(
        self,
        channel: Channel,
        exec_payload: bytes,
        *,
        pid: int,
        timeout_ms: int,
        options: LaunchOptions,
        on_close: Callable[[], None],
        hard_kill: Callable[[], None],
        stdio: tuple[int, int, int] | None = None,
        terminal: int | None = None,
    ) -> None:
        """``stdio``: descriptors the workload's stdin, stdout and stderr go to directly (a
        lifecycle caller's, received over the control socket), taken over and closed at the
        end; ``terminal``: the slave side of a host pty (a lifecycle caller's) relayed to a
        terminal in the guest, taken over likewise; ``options``' modes apply otherwise (with
        ``options.pty``, a new host pty whose master is ``pty_fd``).

        A terminal exec runs on the guest's own pty (its line discipline is the one that
        counts); the host pty is put in raw mode and relayed byte for byte, and its window size
        is passed on whenever it changes (polled: the relay is not the pty's session)."""
        self.pid = pid
        self._channel = channel
        self._close_callbacks = [on_close]
        self._hard_kill = hard_kill
        self._returncode: int | None = None
        self._timed_out = False
        self._closed = False
        self._done = threading.Event()
        self._exit_r, self._exit_w = os.pipe()
        stdin_source: int | None
        out_sink: int | None
        err_sink: int | None
        self._terminal = terminal
        if options.pty is not None and terminal is None:
            self.pty_fd, self._terminal = os.openpty()
            _set_window(self.pty_fd, *options.pty)
        if self._terminal is not None:
            tty.setraw(self._terminal)
            stdin_source, out_sink, err_sink = os.dup(self._terminal), self._terminal, None
            self._window = _window_of(self._terminal)
            exec_payload = self._window + exec_payload
        elif stdio is not None:
            stdin_source, out_sink, err_sink = stdio
        else:
            out_sink, self.stdout = _sink(options.stdout, 1)
            err_sink, self.stderr = _sink(options.stderr, 2)
            stdin_source = self._stdin_source(options.stdin)
        kind = protocol.EXEC if self._terminal is None else protocol.EXEC_TTY
        channel.send(kind, exec_payload)
        self._threads = [
            threading.Thread(target=self._pump, args=(out_sink, err_sink), daemon=True)
        ]
        if stdin_source is not None:
            self._threads.append(
                threading.Thread(target=self._feed, args=(stdin_source,), daemon=True)
            )
        self._timer = threading.Timer(timeout_ms / 1000, self._expire) if timeout_ms else None
        for thread in self._threads:
            thread.start()
        if self._timer is not None:
            self._timer.daemon = True
            self._timer.start()

    def wait(self, timeout: float | None = None) -> int:
        if not self._done.wait(timeout):
            raise TimeoutError(f"the micro-VM workload is still running after {timeout} s")
        assert self._returncode is not None
        return self._returncode

    def poll(self) -> int | None:
        return self._returncode

    def kill(self) -> None:
        if self._done.is_set():
            return
        try:
            self._channel.send(protocol.KILL)
        except OSError:
            self._hard_kill()
        if not self._done.wait(_KILL_GRACE):
            self._hard_kill()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.kill()
        if self._timer is not None:
            self._timer.cancel()
        for thread in self._threads:
            thread.join(_KILL_GRACE)
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        if self.pty_fd is not None:
            os.close(self.pty_fd)
        os.close(self._exit_r)
        for callback in self._close_callbacks:
            callback()

    def resize(self, rows: int, columns: int) -> None:
        if self.pty_fd is None:
            raise RuntimeError("this workload was not started with a pty")
        _set_window(self.pty_fd, rows, columns)
        self._pass_window()

    def _pass_window(self) -> None:
        """Send the terminal's size to the guest when it changed since last sent."""
        if self._terminal is None or self._done.is_set():
            return  # the relay (and the host pty it reads) ends with the workload
        with contextlib.suppress(OSError):
            window = _window_of(self._terminal)
            if window != self._window:
                self._window = window
                self._channel.send(protocol.RESIZE, window)

    def add_close_callback(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` after close() released the process (the one-shot VM's shutdown)."""
        self._close_callbacks.append(callback)

    def fileno_for_exit(self) -> int | None:
        return self._exit_r

    def _stdin_source(self, mode: StdioMode) -> int | None:
        if mode == "devnull":
            self._channel.send(protocol.STDIN)  # end of input at once
            return None
        if mode == "inherit":
            return os.dup(0)
        read_end, write_end = os.pipe()
        self.stdin = os.fdopen(write_end, "wb", buffering=0)
        return read_end

    def _feed(self, source: int) -> None:
        """Forward stdin until it ends or the workload exits (the exit pipe wakes it, so an open
        stdin the workload never reads cannot outlive it and leak into the next exec)."""
        poll = _WINDOW_POLL_S if self._terminal is not None else None
        try:
            while True:
                ready = select.select([source, self._exit_r], [], [], poll)[0]
                if self._exit_r in ready:
                    break
                if not ready:  # a terminal's poll interval
                    self._pass_window()
                    continue
                data = os.read(source, 1 << 16)
                if self._done.is_set():
                    break
                self._channel.send(protocol.STDIN, data)  # empty data: end of input
                if not data:
                    break
        except OSError:
            pass
        finally:
            os.close(source)

    def _pump(self, out: int | None, err: int | None) -> None:
        code = 128 + 9
        try:
            while True:
                kind, payload = self._channel.receive()
                if kind == protocol.STDOUT:
                    _write(out, payload)
                elif kind == protocol.STDERR:
                    _write(err, payload)
                elif kind == protocol.EXITED:
                    code = int.from_bytes(payload, "big")
                    break
                elif kind == protocol.ERROR:
                    _write(err, b"corral: micro-VM agent: " + payload + b"\n")
                    code = 127
                    break
        except (OSError, protocol.AgentGone):
            pass  # the VM is gone: report the workload as killed
        finally:
            for fd in (out, err):
                if fd is not None:
                    os.close(fd)
            self._returncode = code
            self._done.set()
            os.close(self._exit_w)

    def _expire(self) -> None:
        if not self._done.is_set():
            self._timed_out = True
            self.kill()


def _sink(mode: StdioMode, host_fd: int) -> tuple[int | None, IO[bytes] | None]:
    if mode == "devnull":
        return None, None
    if mode == "inherit":
        return os.dup(host_fd), None
    read_end, write_end = os.pipe()
    return write_end, os.fdopen(read_end, "rb")


def _write(fd: int | None, data: bytes) -> None:
    if fd is None:
        return
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except BrokenPipeError:
        pass  # the reader closed its end; keep draining the guest


def _window_of(terminal: int) -> bytes:
    rows, columns, _, _ = struct.unpack("HHHH", fcntl.ioctl(terminal, termios.TIOCGWINSZ, bytes(8)))
    return protocol.window(rows, columns)


def _set_window(terminal: int, rows: int, columns: int) -> None:
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
