"""Start a provisioned sandbox: plan it again, fork the detached supervisor, wait until its init
serves the control socket."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import shutil
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from corral.backends.process.launcher import (
    ChildSpec,
    Launched,
    fork_sandbox,
    network_overrides,
    read_launch_error,
)
from corral.contract.model import ProcessSpec, Request
from corral.errors import CorralError, ErrorCode
from corral.lifecycle import store
from corral.plan import Plan
from corral.policy.environment import build_environment, choose_cwd

SUPERVISOR_NAME = "corral-sup"
INIT_NAME = "corral-init"  # the sandbox's PID 1 (set by the native launcher)
EXIT_GRACE_S = 2.0
NETWORK_DIR = "net"  # slirp4netns's API socket and log, inside the sandbox's directory
# Provision carries no process; the sandbox is planned around this placeholder.
PLACEHOLDER = ProcessSpec("true")


@dataclass(frozen=True)
class Started:
    pid: int
    start_time: int
    cgroup: str | None  # the cgroup's name, when the sandbox has resource limits


def plan_sandbox(request: Request, process: ProcessSpec = PLACEHOLDER) -> Plan:
    """The one-shot plan equivalent of a sandbox (and of one exec in it)."""
    from corral import api

    one_shot = dataclasses.replace(request, phase=None, sandbox_id=None, process=process)
    return api.plan(one_shot)


@dataclass(frozen=True)
class ExecPlan:
    command: tuple[str, ...]
    env: dict[str, str]
    cwd: str
    timeout_ms: int


def plan_exec(sandbox: Plan, request: Request, process: ProcessSpec) -> ExecPlan:
    """One exec in a started sandbox. The sandbox's plan (filesystem view, network) is fixed at
    start; only the process part is planned here, with the same policy functions as a one-shot
    run. An admin policy may clamp any part of a request: with one, the full planner runs.
    A proxy on the host's loopback is named as the sandbox reaches it (through 10.0.2.2)."""
    from corral.policy.admin import AdminPolicy

    if AdminPolicy.load() is not None:
        full = plan_sandbox(request, process)
        env = _proxy_inside(full.env, sandbox)
        return ExecPlan(full.command, env, full.cwd, full.timeout_ms)
    proxy = sandbox.network.proxy_url if sandbox.network.mode == "proxy" else None
    return ExecPlan(
        ("/bin/sh", "-c", process.command_line),
        _proxy_inside(build_environment(process, proxy_url=proxy), sandbox),
        choose_cwd(process, sandbox.filesystem),
        process.timeout_ms,
    )


def _proxy_inside(env: dict[str, str], sandbox: Plan) -> dict[str, str]:
    if sandbox.network.mode != "proxy" or sandbox.network.proxy_url is None:
        return env
    from corral.net.attachment import proxy_url_inside

    inside = proxy_url_inside(sandbox.network.proxy_url)
    return {
        k: inside if k.lower().endswith("_proxy") and k.lower() != "no_proxy" else v
        for k, v in env.items()
    }


def start_supervisor(
    path: str,
    state: store.SandboxState,
    plan: Plan,
    *,
    adjust: Callable[[ChildSpec], None] | None = None,
    socket_owner: tuple[int, int] | None = None,
) -> Started:
    """Fork the sandbox's detached supervisor. ``adjust`` edits its ChildSpec (a session's
    agent identity); ``socket_owner`` hands the control socket to the sandbox's owner when
    root starts it for them."""
    from corral.backends.process import child_spec

    networked = plan.network.mode != "none"
    control = os.path.join(path, store.CONTROL_SOCKET)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(control)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    cgroup = None
    # slirp4netns exits when every holder of exit_w is gone: the supervisor and its init.
    exit_r, exit_w = os.pipe2(os.O_CLOEXEC) if networked else (-1, -1)
    try:
        _bind_private(listener, path, socket_owner)
        listener.listen(64)
        cgroup = _make_cgroup(state, plan)
        spec = child_spec(
            plan,
            cgroup,
            wait_for_network=networked,
            control_fd=listener.fileno(),
            detach=True,
            process_name=SUPERVISOR_NAME,
            keep_fds=(exit_w,) if networked else (),
        )
        if adjust is not None:
            adjust(spec)
        launched = fork_sandbox(spec)
        if networked:
            os.close(exit_w)
            exit_w = -1
            _attach_network(plan, launched, exit_r, os.path.join(path, NETWORK_DIR), state.id)
        os.close(launched.lifeline_w)
        error = read_launch_error(launched.error_r)
        start_time = store.process_start_time(launched.pid)
        if error or start_time is None:
            kill_supervisor(launched.pid)
            raise CorralError(
                f"sandbox set-up failed: {error or 'the supervisor exited'}",
                code=ErrorCode.BACKEND_ERROR,
                remediation="run `corral backends` to check what this host supports",
            )
        return Started(launched.pid, start_time, cgroup.name if cgroup else None)
    except BaseException:
        if cgroup is not None:
            cgroup.remove()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control)
        raise
    finally:
        listener.close()
        for fd in (exit_r, exit_w):
            if fd >= 0:
                os.close(fd)


def _bind_private(listener: socket.socket, path: str, owner: tuple[int, int] | None) -> None:
    """Bind the control socket 0600 at its real path (`corral gc` finds supervisors by it).
    Root binding for a user checks, through a descriptor of the directory taken before, that
    the socket landed there, and hands it over without following links."""
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        old_umask = os.umask(0o177)
        try:
            listener.bind(os.path.join(path, store.CONTROL_SOCKET))
        finally:
            os.umask(old_umask)
        if owner is not None:
            bound = os.stat(os.path.join(path, store.CONTROL_SOCKET), follow_symlinks=False)
            there = os.stat(store.CONTROL_SOCKET, dir_fd=dir_fd, follow_symlinks=False)
            if (bound.st_dev, bound.st_ino) != (there.st_dev, there.st_ino):
                raise CorralError(
                    f"{path} changed while the sandbox started", code=ErrorCode.BACKEND_ERROR
                )
            os.chown(store.CONTROL_SOCKET, *owner, dir_fd=dir_fd, follow_symlinks=False)
    finally:
        os.close(dir_fd)


def _attach_network(
    plan: Plan, launched: Launched, exit_r: int, workdir: str, sandbox_id: str
) -> None:
    """Rules, link and policy proxy for the supervisor's network namespace, before its init
    starts. The proxy audits to the trail of the uid starting it (the owner's)."""
    from corral import net
    from corral.lifecycle import network_policy, trail

    assert launched.ready_r is not None and launched.sync_w is not None
    try:
        if os.read(launched.ready_r, 1) != b"R":
            return  # the child failed; its error arrives on the error pipe
        shutil.rmtree(workdir, ignore_errors=True)  # a previous start's
        attached = net.attach_detached(
            plan.network, pid=launched.pid, exit_fd=exit_r, workdir=workdir,
            sandbox=sandbox_id, audit_log=trail.audit_log_of(os.geteuid()),
        )  # fmt: skip
        # exec requests carry their own environment (network_policy.exec_environment)
        binds = network_policy.ca_binds(attached.ca_bundle_path)
        os.write(launched.sync_w, network_overrides({}, binds))
    except BaseException:
        kill_supervisor(launched.pid)
        os.close(launched.error_r)
        os.close(launched.lifeline_w)
        raise
    finally:
        os.close(launched.ready_r)
        os.close(launched.sync_w)


def _make_cgroup(state: store.SandboxState, plan: Plan) -> Any:
    res = plan.resources
    if not (res.memory_mb or res.pids or res.cpu_percent):
        return None
    from corral.kernel import cgroups

    return cgroups.create(
        f"sandbox-{state.id.rpartition(':')[2]}",  # manager.cgroup_name: found again by name
        memory_mb=res.memory_mb,
        pids=res.pids,
        cpu_percent=res.cpu_percent,
    )


def kill_supervisor(pid: int, start_time: int | None = None, owner: int | None = None) -> None:
    """Stop a sandbox: SIGKILL its init (the PID namespace dies with it), let the supervisor
    reap it and exit, and reap the supervisor when it is our child. Killing init first keeps
    it from becoming an orphan zombie on hosts whose PID 1 does not reap.
    ``start_time`` guards against a reused pid; ``owner`` (for pids read from a state file,
    which its owner can write) requires a Corral supervisor of that uid."""
    current = store.process_start_time(pid)
    if current is not None and start_time is not None and current != start_time:
        return  # a different process now has this pid
    if current is not None and owner is not None and not is_supervisor_of(pid, owner):
        return
    if current is not None:
        with contextlib.suppress(OSError):
            pidfd = os.pidfd_open(pid)
            try:
                for child in _children(pid):
                    with contextlib.suppress(OSError):
                        os.kill(child, signal.SIGKILL)
                if not select.select([pidfd], [], [], EXIT_GRACE_S)[0]:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            finally:
                os.close(pidfd)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0 if current is not None else os.WNOHANG)


def is_supervisor_of(pid: int, owner: int) -> bool:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == SUPERVISOR_NAME and os.stat(f"/proc/{pid}").st_uid == owner
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []
