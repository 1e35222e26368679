"""The sandbox's init (PID 1 inside it) as a server: runs exec requests from the control socket.

Called by the launcher in place of one workload, with the root already built and the Landlock
ruleset prepared. Each exec forks a child that becomes the workload through the launcher's own
``exec_workload`` (same namespaces, root, Landlock, seccomp, capabilities as a one-shot run).
Init reaps every orphan, enforces each exec's timeout, kills a workload whose caller hung up,
and never exits on its own: stopping the sandbox means killing its supervisor.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import selectors
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any

from corral.backends.process.launcher import ChildSpec, exec_workload
from corral.lifecycle import protocol

_PR_SET_NAME = 15
_PR_SET_DUMPABLE = 4
INIT_NAME = "corral-init"


@dataclass
class _Workload:
    conn: socket.socket
    pid: int = 0
    deadline: float | None = None
    timed_out: bool = False


def serve(spec: ChildSpec, landlock: Any) -> int:
    libc = ctypes.CDLL(None)
    libc.prctl(_PR_SET_NAME, INIT_NAME.encode(), 0, 0, 0)
    # Init is neither Landlocked nor filtered: no workload of the same uid may ptrace it or
    # read its memory through /proc (Landlock also forbids that, where it is applied).
    libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    assert spec.control_fd is not None
    listener = socket.socket(fileno=spec.control_fd)
    listener.setblocking(False)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    server = _Server(spec, landlock, listener, wake_r)
    server.run()
    return 0


class _Server:
    def __init__(self, spec: ChildSpec, landlock: Any, listener: socket.socket, wake_r: int):
        self.spec, self.landlock, self.wake_r = spec, landlock, wake_r
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ, self._accept)
        self.selector.register(wake_r, selectors.EVENT_READ, self._reap)
        self.by_conn: dict[socket.socket, _Workload] = {}
        self.by_pid: dict[int, _Workload] = {}

    def run(self) -> None:
        while True:
            deadlines = [w.deadline for w in self.by_pid.values() if w.deadline is not None]
            wait = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            for key, _ in self.selector.select(wait):
                key.data(key.fileobj)
            self._expire()

    def _accept(self, listener: Any) -> None:
        with contextlib.suppress(BlockingIOError):
            conn, _ = listener.accept()
            conn.setblocking(True)
            self.by_conn[conn] = _Workload(conn)
            self.selector.register(conn, selectors.EVENT_READ, self._message)

    def _message(self, conn: Any) -> None:
        work = self.by_conn.get(conn)
        if work is None:  # hung up earlier in this same round
            return
        try:
            message, fds = protocol.receive(conn)
        except OSError:
            message, fds = None, []
        try:
            if message is None:
                self._hang_up(work)
            elif message.get("op") == "exec" and not work.pid:
                self._exec(work, message, fds)
            elif message.get("op") == "kill":
                _kill_group(work.pid)
        finally:
            for fd in fds:
                os.close(fd)

    def _exec(self, work: _Workload, message: dict[str, Any], fds: list[int]) -> None:
        pty = bool(message.get("pty"))
        if len(fds) != (1 if pty else 3):
            self._reply(work, {"event": "error", "message": "exec needs 3 stdio fds or 1 pty"})
            return
        try:
            command, env = message["command"], message["env"]
            if not (command and all(isinstance(a, str) for a in command)):
                raise TypeError("command must be a non-empty list of strings")
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
                raise TypeError("env must map strings to strings")
            spec = dataclasses.replace(
                self.spec,
                command=tuple(command),
                env=dict(env),
                cwd=str(message["cwd"]),
                stdio=(None, None, None) if pty else (fds[0], fds[1], fds[2]),
                pty_slave=fds[0] if pty else None,
            )
        except (KeyError, TypeError, AttributeError) as exc:  # a bad request never kills init
            self._reply(work, {"event": "error", "message": f"malformed exec request: {exc}"})
            return
        error_r, error_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            _workload_child(spec, self.landlock, error_w)
        os.close(error_w)
        error = _read_all(error_r)
        if error:
            self._reply(work, {"event": "error", "message": error.decode(errors="replace")})
            return
        work.pid = pid
        timeout = message.get("timeoutMs")
        timeout_ms = timeout if isinstance(timeout, int) and timeout > 0 else 0
        work.deadline = time.monotonic() + timeout_ms / 1000 if timeout_ms else None
        self.by_pid[pid] = work
        self._reply(work, {"event": "started", "pid": pid})

    def _reap(self, _: Any) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_r, 512):
                pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            work = self.by_pid.pop(pid, None)
            if work is not None:
                code = (
                    128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                )
                self._reply(work, {"event": "exit", "code": code, "timedOut": work.timed_out})
                work.pid = 0
                work.deadline = None

    def _expire(self) -> None:
        now = time.monotonic()
        for work in self.by_pid.values():
            if work.deadline is not None and now >= work.deadline:
                work.timed_out = True
                work.deadline = None
                _kill_group(work.pid)

    def _hang_up(self, work: _Workload) -> None:
        if work.pid:
            _kill_group(work.pid)
            self.by_pid.pop(work.pid, None)  # still reaped by _reap, just not reported
        self.selector.unregister(work.conn)
        del self.by_conn[work.conn]
        work.conn.close()

    def _reply(self, work: _Workload, message: dict[str, Any]) -> None:
        try:
            protocol.send(work.conn, message)
        except OSError:
            self._hang_up(work)


def _kill_group(pid: int) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # the workload leads its own session (setsid)


def _workload_child(spec: ChildSpec, landlock: Any, error_w: int) -> None:
    """Become the workload; never return into the server loop."""
    code = 127
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        code = exec_workload(spec, landlock, error_w)
    except BaseException as exc:  # report, then die: this is a forked child
        with contextlib.suppress(BaseException):
            os.write(error_w, f"{type(exc).__name__}: {exc}".encode(errors="replace")[:4000])
    finally:
        os._exit(code)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)
