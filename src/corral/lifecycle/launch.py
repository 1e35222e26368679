"""Start a provisioned sandbox: plan it again, fork the detached supervisor, wait until its init
serves the control socket."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import select
import signal
import socket
from dataclasses import dataclass
from typing import Any

from corral.backends.process.launcher import fork_sandbox, read_launch_error
from corral.contract.model import ProcessSpec, Request
from corral.errors import BackendUnavailableError, CorralError, ErrorCode
from corral.lifecycle import store
from corral.lifecycle.serve import serve
from corral.plan import Plan
from corral.policy.environment import build_environment, choose_cwd

SUPERVISOR_NAME = "corral-sup"
EXIT_GRACE_S = 2.0
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
    run. An admin policy may clamp any part of a request: with one, the full planner runs."""
    if importlib.util.find_spec("corral.policy.admin") is not None:
        full = plan_sandbox(request, process)
        return ExecPlan(full.command, full.env, full.cwd, full.timeout_ms)
    proxy = sandbox.network.proxy_url if sandbox.network.mode == "proxy" else None
    return ExecPlan(
        ("/bin/sh", "-c", process.command_line),
        build_environment(process, proxy_url=proxy),
        choose_cwd(process, sandbox.filesystem),
        process.timeout_ms,
    )


def start_supervisor(path: str, state: store.SandboxState, plan: Plan) -> Started:
    from corral.backends.process import child_spec

    if plan.network.mode != "none":
        raise BackendUnavailableError(
            "network rules for long-lived sandboxes need a detachable network attachment "
            "from corral.net, which this build does not have",
            remediation="provision without a network section (deny all), or use one-shot runs",
        )
    control = os.path.join(path, store.CONTROL_SOCKET)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(control)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    cgroup = None
    try:
        old_umask = os.umask(0o177)
        try:
            listener.bind(control)  # 0600: only the owner (and root) may connect
        finally:
            os.umask(old_umask)
        listener.listen(64)
        cgroup = _make_cgroup(state, plan)
        spec = child_spec(
            plan,
            cgroup,
            wait_for_network=False,
            control_fd=listener.fileno(),
            serve=serve,
            detach=True,
            process_name=SUPERVISOR_NAME,
        )
        launched = fork_sandbox(spec)
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
    if current is not None and owner is not None and not _is_supervisor_of(pid, owner):
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


def _is_supervisor_of(pid: int, owner: int) -> bool:
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
