"""Fork choreography of one process sandbox.

The native launcher (``corral/native/launch.c``) performs it for every sandbox; the Python
version below remains for sandboxes whose init must run Python of Corral's (learning mode's
``landlock_prepare`` hook builds its overlay view there). Both follow the same steps:

    caller ──fork──► outer (C1) ──fork──► init (C2, PID 1) ──fork──► workload (C3) ─exec─► sh -c
                     joins cgroup,        builds the root,          setsid, stdio, cwd,
                     unshares namespaces, reaps orphans,            rlimits, caps, Landlock,
                     waits for network,   exits with the            seccomp (last), execve
                     lifeline to caller   workload's status

Everything that loads libraries or allocates much (seccomp BPF, capability tables, the mount
steps, Landlock's masks) is prepared in the caller before forking. Setup failures in any child travel back
over a close-on-exec pipe: EOF without data means the workload exec'd.
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
from dataclasses import dataclass, field
from typing import Any

from corral.backends.process.rootfs import MountStep, build_root
from corral.kernel import namespaces

SANDBOX_HOSTNAME = "corral"
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


@dataclass
class ChildSpec:
    """Everything the children need, prepared by the caller."""

    command: tuple[str, ...]
    env: dict[str, str]
    cwd: str
    mount_steps: list[MountStep]
    unprivileged: bool
    uid: int
    gid: int
    cgroup_procs: list[str] = field(default_factory=list)
    wait_for_network: bool = False
    landlock_rules: list[Any] = field(default_factory=list)  # kernel.landlock.PathRule
    # Python run in init with the root built, returning the prepared Landlock ruleset (or
    # None); setting it selects the Python launcher (learning mode).
    landlock_prepare: Callable[..., Any] | None = None
    # Kernel audit records for the workload's Landlock and seccomp denials (native launcher).
    log_denials: bool = False
    privileges: Any = None  # kernel.privileges.PreparedPrivileges
    seccomp: Any = None  # kernel.seccomp.PreparedSeccomp
    rlimits: dict[int, tuple[int, int]] = field(default_factory=dict)
    pty_slave: int | None = None
    stdio: tuple[int | None, int | None, int | None] = (None, None, None)
    run_as: tuple[int, int] | None = None  # (uid, gid) of a distinct agent identity (root only)
    new_session_keyring: bool = False  # the workload's own kernel session keyring
    # Long-lived sandboxes: instead of one workload, init serves exec requests on this socket
    # (native launcher only; the protocol is corral.lifecycle.protocol's).
    control_fd: int | None = None
    # Detached supervisor: survives the caller (own session, no lifeline, stdio on /dev/null)
    # and carries a recognisable name (/proc/PID/comm) so `corral gc` can find it.
    detach: bool = False
    process_name: str | None = None
    # Descriptors the sandbox's own processes keep (not its workloads), e.g. the write end of
    # a helper's exit pipe, so the helper lives exactly as long as the sandbox.
    keep_fds: tuple[int, ...] = ()


@dataclass
class Launched:
    pid: int  # the outer child; killing it tears the whole sandbox down
    sync_w: int | None  # caller -> outer: network ready (only when wait_for_network)
    ready_r: int | None  # outer -> caller: namespaces ready (only when wait_for_network)
    error_r: int
    lifeline_w: int


def fork_sandbox(spec: ChildSpec) -> Launched:
    if spec.landlock_prepare is None:
        return _spawn_native(spec)
    if spec.control_fd is not None or spec.new_session_keyring:
        raise ValueError("long-lived and session sandboxes run through the native launcher")
    return _fork_python(spec)


def _spawn_native(spec: ChildSpec) -> Launched:
    from corral.native import launcher_path

    path = launcher_path()
    pipes = _Pipes.open(spec.wait_for_network)
    spec_fd = os.memfd_create("corral-launch-spec", os.MFD_CLOEXEC)
    try:
        os.write(spec_fd, encode_spec(spec, pipes))
        os.lseek(spec_fd, 0, os.SEEK_SET)
        passed = [spec_fd, pipes.error_w, pipes.lifeline_r, pipes.ready_w, pipes.sync_r,
                  *spec.stdio, spec.pty_slave, spec.control_fd, *spec.keep_fds]  # fmt: skip
        # dup2 onto itself clears close-on-exec: exactly these descriptors reach the launcher.
        actions = [(os.POSIX_SPAWN_DUP2, fd, fd) for fd in passed if fd is not None and fd > 2]
        pid = os.posix_spawn(
            path, [path, str(spec_fd), str(pipes.error_w)], {}, file_actions=actions
        )
    except BaseException:
        pipes.close_all()
        raise
    finally:
        os.close(spec_fd)
    return pipes.handed_over(pid)


@dataclass
class _Pipes:
    error_r: int
    error_w: int
    lifeline_r: int
    lifeline_w: int
    ready_r: int | None = None
    ready_w: int | None = None
    sync_r: int | None = None
    sync_w: int | None = None

    @classmethod
    def open(cls, network: bool) -> _Pipes:
        pipes = cls(*os.pipe2(os.O_CLOEXEC), *os.pipe2(os.O_CLOEXEC))
        if network:
            pipes.ready_r, pipes.ready_w = os.pipe2(os.O_CLOEXEC)
            pipes.sync_r, pipes.sync_w = os.pipe2(os.O_CLOEXEC)
        return pipes

    def handed_over(self, pid: int) -> Launched:
        """Close the child's ends in the caller."""
        for fd in (self.error_w, self.lifeline_r, self.ready_w, self.sync_r):
            if fd is not None:
                os.close(fd)
        return Launched(pid, self.sync_w, self.ready_r, self.error_r, self.lifeline_w)

    def close_all(self) -> None:
        for fd in vars(self).values():
            if fd is not None:
                os.close(fd)


_SECCOMP_FILTER_FLAG_LOG = 2
_MOUNT_KINDS = {"bind": "b", "copy": "c", "deny": "d", "tmpfs": "t", "symlink": "s"}


def encode_spec(spec: ChildSpec, pipes: _Pipes) -> bytes:
    """``spec`` as the native launcher's record stream (see corral/native/records.py)."""
    from corral.kernel.landlock import plan_ruleset
    from corral.native.records import record

    out = [record("A", arg) for arg in spec.command]
    out += [record("E", f"{key}={value}") for key, value in spec.env.items()]
    out.append(record("C", spec.cwd))
    out.append(record("H", SANDBOX_HOSTNAME))
    for step in spec.mount_steps:
        flags = ("r" if step.readonly else "") + ("d" if step.is_dir else "")
        extra = step.target if step.kind == "symlink" else step.source
        out.append(record("M", _MOUNT_KINDS[step.kind], flags, step.path, extra))
    if spec.unprivileged:
        out.append(record("U", spec.uid, spec.gid))
    out += [record("G", path) for path in spec.cgroup_procs]
    if pipes.ready_w is not None:
        out.append(record("N", pipes.ready_w, pipes.sync_r or -1))
    if spec.landlock_rules:
        ruleset = plan_ruleset(spec.landlock_rules, log_denials=spec.log_denials)
        out.append(record("F", ruleset.handled_fs, ruleset.handled_net, ruleset.scoped,
                          ruleset.file_rights, ruleset.restrict_flags))  # fmt: skip
        out += [record("R", rights, path) for rights, path in ruleset.rules]
    if spec.seccomp is not None:
        out.append(record("S", bytes(spec.seccomp.instructions)))
        if spec.log_denials:  # audit records for the filter's refusals, too
            out.append(record("s", _SECCOMP_FILTER_FLAG_LOG))
    if spec.privileges is not None:
        if spec.privileges.keep_caps:
            raise ValueError("the native launcher drops every capability")
        last_cap = max(spec.privileges.bounding_drops, default=0)
        out.append(record("P", spec.privileges.securebits, last_cap))
    out += [record("L", rid, soft, hard) for rid, (soft, hard) in spec.rlimits.items()]
    if spec.pty_slave is not None:
        out.append(record("T", spec.pty_slave))
    out.append(record("I", *(-1 if fd is None else fd for fd in spec.stdio)))
    if spec.run_as is not None:
        out.append(record("W", *spec.run_as))
    if spec.new_session_keyring:
        out.append(record("K"))
    if spec.control_fd is not None:
        out.append(record("O", spec.control_fd))
    if spec.detach:
        out.append(record("D", spec.process_name or ""))
    out += [record("X", fd) for fd in spec.keep_fds]
    out.append(record("l", pipes.lifeline_r))
    return b"".join(out)


def network_overrides(env: dict[str, str], binds: Sequence[tuple[str, str]]) -> bytes:
    """The caller's message once the sandbox's network is wired: environment additions (the
    proxy) and files bound over sandbox paths (the CA bundle). Never empty: an empty message
    means the caller gave up."""
    from corral.native.records import record

    out = [record("n")]
    out += [record("E", f"{key}={value}") for key, value in env.items()]
    out += [record("B", source, target) for source, target in binds]
    return b"".join(out)


def _fork_python(spec: ChildSpec) -> Launched:
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
        overrides = _read_all(sync_r)
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


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def read_launch_error(error_r: int) -> str:
    """Block until the workload exec'd (EOF, returns "") or a child reported a failure."""
    message = _read_all(error_r).decode(errors="replace")
    os.close(error_r)
    return message
