"""The sandbox choreography in Python, for sandboxes whose init must run Python of Corral's
(learning mode's ``landlock_prepare`` hook builds its overlay view there). Every other sandbox
goes through the native launcher (``launcher.fork_sandbox``); both follow the steps described
in ``launcher``'s docstring and in docs/backends.md.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import resource
import select
import signal
import socket
import struct
import termios
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from corral.backends.process.launcher import (
    SANDBOX_HOSTNAME,
    ChildSpec,
    Launched,
    read_all,
)
from corral.backends.process.rootfs import MountStep, build_root
from corral.kernel import namespaces

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


def fork_python(spec: ChildSpec) -> Launched:
    error_r, error_w = os.pipe2(os.O_CLOEXEC)
    lifeline_r, lifeline_w = os.pipe2(os.O_CLOEXEC)
    ready_r = ready_w = sync_r = sync_w = None
    if spec.wait_for_network:
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        _child_guard(error_w, lambda: _outer(spec, error_w, lifeline_r, ready_w, sync_r))
    os.close(error_w)
    os.close(lifeline_r)
    for fd in (ready_w, sync_r):
        if fd is not None:
            os.close(fd)
    return Launched(pid, sync_w, ready_r, error_r, lifeline_w)


def _child_guard(error_w: int, body: Callable[[], int]) -> None:
    """Run a child's body; never return into the caller's code."""
    code = 127
    try:
        code = body()
    except BaseException as exc:  # report everything, then die: this is a forked child
        try:
            detail = (
                f"{exc}"
                if isinstance(exc, OSError)
                else "".join(traceback.format_exception_only(type(exc), exc)).strip()
            )
            os.write(error_w, detail.encode(errors="replace")[:4000])
        except BaseException:
            pass
    finally:
        os._exit(code)


def _keep_only(fds: Sequence[int | None]) -> None:
    """Close every inherited descriptor except ``fds`` (the caller's other sandboxes' pipes
    must not leak into this one)."""
    keep = sorted({fd for fd in fds if fd is not None and fd >= 0})
    low = 3
    for fd in keep:
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, 1 << 20)


def _outer(
    spec: ChildSpec, error_w: int, lifeline_r: int, ready_w: int | None, sync_r: int | None
) -> int:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    _keep_only(
        [error_w, lifeline_r, ready_w, sync_r, *spec.stdio, spec.pty_slave, spec.control_fd,
         *spec.keep_fds]
    )  # fmt: skip
    watch_lifeline: int | None = lifeline_r
    if spec.detach:
        _detach(lifeline_r, spec.process_name)
        watch_lifeline = None
    for path in spec.cgroup_procs:  # before any namespace: limits cover every descendant
        with open(path, "w") as f:
            f.write(str(os.getpid()))
    if spec.unprivileged:
        namespaces.unshare(namespaces.CLONE_NEWUSER)
        namespaces.map_self(spec.uid, spec.gid)
    namespaces.unshare(namespaces.ALL_BUT_USER)
    namespaces.sethostname(SANDBOX_HOSTNAME)
    _loopback_up()
    if ready_w is not None and sync_r is not None:
        os.write(ready_w, b"R")
        os.close(ready_w)
        overrides = read_all(sync_r)
        os.close(sync_r)
        if not overrides:
            return 125  # the caller gave up (network set-up failed and was reported there)
        from corral.native.records import decode

        for tag, fields in decode(overrides):
            if tag == "E":
                key, _, value = fields[0].partition("=")
                spec.env[key] = value
            elif tag == "B":
                source, target = fields
                spec.mount_steps.append(MountStep("bind", target, is_dir=False, source=source))
    alive_r, alive_w = os.pipe2(os.O_CLOEXEC)
    init_pid = os.fork()
    if init_pid == 0:
        os.close(alive_w)
        _child_guard(error_w, lambda: _init(spec, error_w, alive_r))
    os.close(alive_r)
    os.close(error_w)
    for fd in (*spec.stdio, spec.pty_slave):
        if fd is not None and fd > 2:
            os.close(fd)
    return _supervise(init_pid, watch_lifeline)


def _detach(lifeline_r: int, name: str | None) -> None:
    """Leave the caller's session and stdio so the sandbox outlives it."""
    os.setsid()
    os.close(lifeline_r)
    null = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(null, target)
    os.close(null)
    if name:
        _libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def _supervise(init_pid: int, lifeline_r: int | None) -> int:
    """Wait for the sandbox's init; if the caller dies (lifeline EOF), kill the sandbox.
    A detached supervisor (``lifeline_r`` None) waits for init only."""
    pidfd = os.pidfd_open(init_pid)
    watched = [pidfd] if lifeline_r is None else [pidfd, lifeline_r]
    while True:
        ready, _, _ = select.select(watched, [], [])
        if lifeline_r is not None and lifeline_r in ready:
            os.kill(init_pid, signal.SIGKILL)  # PID 1 dying empties its whole namespace
        if ready:
            _, status = os.waitpid(init_pid, 0)
            return _exit_code(status)


def _init(spec: ChildSpec, error_w: int, alive_r: int) -> int:
    _die_with_parent(alive_r)
    _scrub_cmdline(b"corral-init")
    build_root(spec.mount_steps)
    landlock = spec.landlock_prepare(spec.landlock_rules) if spec.landlock_prepare else None
    workload = os.fork()
    if workload == 0:
        _child_guard(error_w, lambda: _exec_workload(spec, landlock, error_w))
    os.close(error_w)
    if landlock is not None:
        landlock.close()
    for fd in (*spec.stdio, spec.pty_slave):
        if fd is not None:
            os.close(fd)
    # PID 1: reap every orphan; leave with the workload's own status.
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 125
        if pid == workload:
            return _exit_code(status)


def _exec_workload(spec: ChildSpec, landlock: Any, error_w: int) -> int:
    """In a fresh child of the sandbox's init: become the workload and exec it."""
    os.setsid()  # no controlling terminal of the caller: no TIOCSTI into the human's tty
    if spec.pty_slave is not None:
        fcntl.ioctl(spec.pty_slave, termios.TIOCSCTTY, 0)
        stdio: tuple[int | None, ...] = (spec.pty_slave,) * 3
    else:
        stdio = spec.stdio
    for target, fd in enumerate(stdio):
        if fd is None:
            continue
        if fd != target:
            os.dup2(fd, target)
        os.set_inheritable(target, True)
    _keep_only([0, 1, 2, error_w, landlock.fileno() if landlock is not None else None])
    if spec.run_as is not None:
        uid, gid = spec.run_as
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    os.chdir(spec.cwd)
    for resource_id, (soft, hard) in spec.rlimits.items():
        resource.setrlimit(resource_id, (soft, hard))
    if spec.privileges is not None:
        spec.privileges.apply()
    if landlock is not None:
        landlock.apply()
        landlock.close()
    if spec.seccomp is not None:
        spec.seccomp.apply()  # last: it may forbid what the steps above needed
    os.execve(spec.command[0], list(spec.command), spec.env)
    return 127  # not reached


_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def _die_with_parent(alive_r: int) -> None:
    """SIGKILL when the outer child dies; ``alive_r`` closes if it died before this call."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    ready, _, _ = select.select([alive_r], [], [], 0)
    if ready:
        os._exit(137)
    os.close(alive_r)


def _scrub_cmdline(name: bytes) -> None:
    """Init is a fork of the caller and the only process of ours the workload can see: its
    /proc/1/cmdline would show the caller's command line (which may carry secrets). Overwrite
    the argument area in place (a process may write its own memory through /proc/self/mem)."""
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rpartition(b")")[2].split()
    arg_start, arg_end = int(fields[45]), int(fields[46])  # fields 48 and 49 of proc(5)
    size = arg_end - arg_start
    if size <= 0:
        return
    with open("/proc/self/mem", "r+b", buffering=0) as mem:
        mem.seek(arg_start)
        mem.write(name[: size - 1].ljust(size, b"\0"))


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, _SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | _IFF_UP))


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)
