"""The `process` backend (also serving `bubblewrap`): namespaces, a deny-by-default root,
Landlock, seccomp, dropped capabilities and cgroups, all applied by Corral itself."""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
from collections.abc import Callable, Sequence
from typing import IO, Any

from corral.backends.base import BackendInfo, LaunchOptions, SandboxProcess
from corral.backends.process.handle import ProcessSandbox
from corral.backends.process.launcher import (
    ChildSpec,
    fork_sandbox,
    network_overrides,
    read_launch_error,
)
from corral.backends.process.rootfs import PRIVATE_TMP, plan_mounts
from corral.errors import BackendUnavailableError, CorralError, ErrorCode
from corral.kernel import namespaces
from corral.plan import Plan
from corral.policy.environment import proxy_environment

NAME = "process"
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
CA_BUNDLE_VARIABLES = (
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
)
CONTAINMENTS = ("process", "bubblewrap")


class ProcessBackend:
    name = NAME

    def probe(self) -> BackendInfo:
        return _probe()

    def launch(self, plan: Plan, options: LaunchOptions) -> SandboxProcess:
        return launch(plan, options)


@functools.cache
def _probe() -> BackendInfo:
    from corral.backends.probe_cache import cached_probe

    return cached_probe(NAME, _probe_host)


def _unavailable(reason: str) -> BackendInfo:
    return BackendInfo(NAME, False, reason, containments=CONTAINMENTS)


def _probe_host() -> BackendInfo:
    root = os.geteuid() == 0
    if not root and not namespaces.unprivileged_userns_allowed():
        return BackendInfo(
            NAME,
            False,
            "unprivileged user namespaces are disabled on this host "
            "(sysctl kernel.unprivileged_userns_clone=1 or user.max_user_namespaces>0), "
            "or run as root",
            containments=CONTAINMENTS,
        )
    mech: dict[str, str] = {
        "mount-namespace": "private mount namespace, deny-by-default root (pivot_root)",
        "pid-namespace": "own PID namespace with a reaping init",
        "network-namespace": "private network namespace (loopback only unless rules add more)",
        "ipc-namespace": "own System V IPC and POSIX message queues",
        "uts-namespace": "own hostname",
        "capabilities": "all capabilities dropped, no_new_privs, securebits locked",
    }
    if not root:
        mech["user-namespace"] = "caller's uid mapped to itself"
    from corral.kernel import landlock, seccomp

    # Landlock and seccomp are part of what this backend promises: without them it refuses
    # to run rather than run with less.
    abi = landlock.host_abi()
    if not abi:
        return _unavailable("the kernel has no Landlock (Linux >= 5.13 with lsm=landlock)")
    mech["landlock"] = f"Landlock ABI {abi}"
    if not _seccomp_available():
        return _unavailable("the kernel has no seccomp filter support (CONFIG_SECCOMP_FILTER)")
    mech["seccomp"] = (
        "default filter: " + ", ".join(seccomp.describe_default_filter()[:6]) + ", ..."
    )
    from corral.kernel import cgroups

    host = cgroups.detect()
    for name, placement in host.controllers.items():
        if placement.writable:
            mech[f"cgroup-{name}"] = f"cgroup v{placement.version} at {placement.mount}"
    try:
        from corral import net

        mech.update(net.probe())
    except ImportError:
        pass
    return BackendInfo(NAME, True, mechanisms=mech, containments=CONTAINMENTS)


@functools.cache
def _seccomp_filter() -> Any:
    from corral.kernel import seccomp

    return seccomp.prepare_filter(seccomp.build_default_filter())


def _seccomp_available() -> bool:
    with open("/proc/self/status") as f:
        return any(line.startswith("Seccomp:") for line in f)


def child_spec(plan: Plan, cgroup: Any, **overrides: Any) -> ChildSpec:
    """Everything the sandbox's children need for ``plan``, prepared in the caller (shared by
    one-shot launches and long-lived sandboxes)."""
    from corral.kernel import privileges

    for entry in plan.filesystem.entries:
        if entry.origin == "protected-placeholder":
            os.makedirs(entry.path, mode=0o755, exist_ok=True)
    spec = ChildSpec(
        command=plan.command,
        env=dict(plan.env),
        cwd=plan.cwd,
        mount_steps=plan_mounts(plan.filesystem),
        unprivileged=os.geteuid() != 0,
        uid=os.getuid(),
        gid=os.getgid(),
        cgroup_procs=cgroup.procs_files() if cgroup else [],
        wait_for_network=plan.network.mode != "none",
        landlock_rules=_landlock_rules(plan),
        privileges=privileges.prepare_privilege_drop(),
        seccomp=_seccomp_filter(),
    )
    return dataclasses.replace(spec, **overrides)


def launch(
    plan: Plan,
    options: LaunchOptions,
    *,
    adjust: Callable[[ChildSpec], None] | None = None,
    extra_cleanups: Sequence[Callable[[], None]] = (),
) -> SandboxProcess:
    """Launch ``plan``. Backends built on this one (``session``) pass ``adjust`` to edit the
    child's spec before the fork and ``extra_cleanups``, run after this backend's own."""
    cleanups: list[Any] = list(extra_cleanups)
    sandbox_id = os.urandom(6).hex()
    child_fds: list[int] = []
    try:
        parent_streams, child_stdio, pty_master, pty_slave = _open_stdio(options, child_fds)
        cgroup = None
        res = plan.resources
        if res.memory_mb or res.pids or res.cpu_percent:
            from corral.kernel import cgroups

            cgroup = cgroups.create(
                f"sandbox-{sandbox_id}",
                memory_mb=res.memory_mb,
                pids=res.pids,
                cpu_percent=res.cpu_percent,
            )
            cleanups.append(cgroup.remove)
        spec = child_spec(
            plan, cgroup, pty_slave=pty_slave, stdio=child_stdio, log_denials=options.log_denials
        )
        if adjust is not None:
            adjust(spec)
        proxy_from = _ask_for_proxy_listener(plan, spec, child_fds)
        launched = fork_sandbox(spec)
        for fd in child_fds:
            os.close(fd)
        child_fds.clear()
        if spec.wait_for_network:
            _attach_network(plan, launched, cleanups, options, proxy_from)
        error = read_launch_error(launched.error_r)
        if error:
            os.close(launched.lifeline_w)
            os.waitpid(launched.pid, 0)
            raise CorralError(
                f"sandbox set-up failed: {error}",
                code=ErrorCode.BACKEND_ERROR,
                remediation="run `corral backends` to check what this host supports",
            )
        return ProcessSandbox(
            launched.pid,
            timeout_ms=plan.timeout_ms,
            lifeline_w=launched.lifeline_w,
            stdin=parent_streams[0],
            stdout=parent_streams[1],
            stderr=parent_streams[2],
            pty_fd=pty_master,
            cleanups=cleanups,
            kill_tree=cgroup.kill_all if cgroup else None,
        )
    except BaseException:
        for fd in child_fds:
            os.close(fd)
        for cleanup in reversed(cleanups):
            cleanup()
        raise


def _ask_for_proxy_listener(
    plan: Plan, spec: ChildSpec, child_fds: list[int]
) -> socket.socket | None:
    """With hostname rules, the native launcher makes the policy proxy's listening socket on
    the sandbox's own loopback and sends it here: the workload's proxied traffic then skips
    user-mode networking (one hop fewer than a direct connection through it)."""
    if spec.landlock_prepare is not None or plan.network.mode == "none":
        return None  # the Python launcher (learning mode) keeps the proxy on the host side
    from corral.net.attachment import wants_policy_proxy

    if not wants_policy_proxy(plan.network):
        return None
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    mine.set_inheritable(False)
    child_fds.append(theirs.detach())
    spec.proxy_listener_to = child_fds[-1]
    return mine


def _attach_network(
    plan: Plan,
    launched: Any,
    cleanups: list[Any],
    options: LaunchOptions,
    proxy_from: socket.socket | None,
) -> None:
    assert launched.ready_r is not None and launched.sync_w is not None
    try:
        if os.read(launched.ready_r, 1) != b"R":
            return  # the child failed; its error arrives on the error pipe
        from corral import net

        listener = _receive_listener(proxy_from) if proxy_from is not None else None
        attachment = net.attach(
            plan.network, pid=launched.pid, audit=options.audit, listener=listener
        )
        cleanups.append(attachment.close)
        inside = attachment.proxy_url_inside
        # The proxy as the sandbox reaches it.
        env = proxy_environment(inside) if inside else {}
        binds: list[tuple[str, str]] = []
        if attachment.ca_bundle_path:
            # TLS interception: the sandbox trusts its own CA (and the system's), nothing else.
            binds.append((attachment.ca_bundle_path, SYSTEM_CA_BUNDLE))
            env.update(dict.fromkeys(CA_BUNDLE_VARIABLES, SYSTEM_CA_BUNDLE))
        os.write(launched.sync_w, network_overrides(env, binds))
    except ImportError as exc:
        raise BackendUnavailableError(f"network policy needs corral.net: {exc}") from exc
    finally:
        os.close(launched.ready_r)
        os.close(launched.sync_w)
        if proxy_from is not None:
            proxy_from.close()


def _receive_listener(channel: socket.socket) -> socket.socket:
    _, fds, _, _ = socket.recv_fds(channel, 1, 1)
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise CorralError(
            "the sandbox did not hand over the policy proxy's listener",
            code=ErrorCode.BACKEND_ERROR,
        )
    os.set_inheritable(fds[0], False)
    return socket.socket(fileno=fds[0])


def _landlock_rules(plan: Plan) -> list[Any]:
    """Rules on the sandbox's own view (the ruleset is built inside it): /etc there is
    Corral's allow-listed tmpfs, so one rule covers it instead of one per entry."""
    from corral.kernel.landlock import PathRule

    # Listing is harmless in a root that holds only what the policy shows (denied paths are
    # mode-000 covers), and agents do run `ls /` and `find`; opening files stays per grant.
    rules = [PathRule("/", "list"), PathRule("/etc", "read")]
    rules += [
        PathRule(e.path, "write" if e.access == "rw" else "read")
        for e in plan.filesystem.entries
        if e.access != "deny" and not (e.origin == "baseline" and e.path.startswith("/etc/"))
    ]
    rules += [PathRule(PRIVATE_TMP, "write"), PathRule("/dev", "write"), PathRule("/proc", "read")]
    return rules


def _open_stdio(
    options: LaunchOptions, child_fds: list[int]
) -> tuple[
    tuple[IO[bytes] | None, ...], tuple[int | None, int | None, int | None], int | None, int | None
]:
    if options.pty is not None:
        master, slave = os.openpty()
        child_fds.append(slave)
        rows, cols = options.pty
        import fcntl
        import struct
        import termios

        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        return (None, None, None), (None, None, None), master, slave
    parent: list[IO[bytes] | None] = []
    child: list[int | None] = []
    for index, mode in enumerate((options.stdin, options.stdout, options.stderr)):
        if mode == "inherit":
            parent.append(None)
            child.append(index)
        elif mode == "devnull":
            fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            child_fds.append(fd)
            parent.append(None)
            child.append(fd)
        else:
            r, w = os.pipe2(os.O_CLOEXEC)
            mine, theirs = (w, r) if index == 0 else (r, w)
            child_fds.append(theirs)
            parent.append(os.fdopen(mine, "wb" if index == 0 else "rb", buffering=0))
            child.append(theirs)
    return tuple(parent), (child[0], child[1], child[2]), None, None
