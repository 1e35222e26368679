"""Launch one process sandbox: the caller's half (spec, pipes, spawn) of its choreography.

The native launcher (``corral/native/launch.c``) performs the sandbox's half for every sandbox;
``python_launcher`` holds the same steps in Python for sandboxes whose init must run Python of
Corral's (learning mode's ``landlock_prepare`` hook builds its overlay view there):

    caller ─spawn─► outer (C1) ──fork──► init (C2, PID 1) ──fork──► workload (C3) ─exec─► sh -c
                    joins cgroup,        builds the root,          setsid, stdio, cwd,
                    unshares namespaces, reaps orphans,            rlimits, caps, Landlock,
                    waits for network,   exits with the            seccomp (last), execve
                    lifeline to caller   workload's status

Everything that loads libraries or allocates much (seccomp BPF, capability tables, the mount
steps, Landlock's masks) is prepared in the caller. Set-up failures in any child travel back
over a close-on-exec pipe: EOF without data means the workload exec'd.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from corral.backends.process.rootfs import MountStep

SANDBOX_HOSTNAME = "corral"


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
    # A unix socket to send the policy proxy's listener to, made on the loopback of the
    # sandbox's network namespace (native launcher only).
    proxy_listener_to: int | None = None
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
    if spec.control_fd is not None or spec.new_session_keyring or spec.proxy_listener_to:
        raise ValueError("long-lived and session sandboxes run through the native launcher")
    from corral.backends.process.python_launcher import fork_python

    return fork_python(spec)


def _spawn_native(spec: ChildSpec) -> Launched:
    from corral.native import launcher_path

    path = launcher_path()
    pipes = _Pipes.open(spec.wait_for_network)
    spec_fd = os.memfd_create("corral-launch-spec", os.MFD_CLOEXEC)
    try:
        os.write(spec_fd, encode_spec(spec, pipes))
        os.lseek(spec_fd, 0, os.SEEK_SET)
        passed = [spec_fd, pipes.error_w, pipes.lifeline_r, pipes.ready_w, pipes.sync_r,
                  *spec.stdio, spec.pty_slave, spec.control_fd, spec.proxy_listener_to,
                  *spec.keep_fds]  # fmt: skip
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
    if spec.log_denials and os.geteuid() == 0:
        out.append(record("a"))  # an audit session of the sandbox's own, to tell its records
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
    if spec.proxy_listener_to is not None:
        out.append(record("q", spec.proxy_listener_to))
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


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def read_launch_error(error_r: int) -> str:
    """Block until the workload exec'd (EOF, returns "") or a child reported a failure."""
    message = read_all(error_r).decode(errors="replace")
    os.close(error_r)
    return message
