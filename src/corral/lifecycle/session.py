"""`isolation_session` sandboxes in the lifecycle: one agent identity per sandbox, held from
provision to deprovision.

Creating and removing identities needs root, so these phases run as root (the Corral service
acting for a caller it identified by peer credentials, or root itself). What root must trust
lives in a root-only *binding* per sandbox, never in the sandbox's state file (its owner can
write that): which identity belongs to the sandbox, whose sandbox it is, and which process is
its supervisor.

    <run dir>/sessions/            mode 0700, root
    <run dir>/sessions/<token>     {"sandboxId", "owner", "identity", "supervisor": [pid, start],
                                    "helpers": [[pid, start], ...]}

``helpers`` are the started sandbox's processes outside its supervisor (its private Xvfb and
the two halves of its clipboard broker): detached so that they outlive the starting call,
recorded before the supervisor starts, killed by this record at stop, deprovision and
`corral gc` (which also ends what a start that crashed half-way left, and deprovisions
orphaned bindings). The agent-uid ones also die with every process of the identity; the
broker's human half (the owner's uid) also ends when its other half does.

The owner's own process (exec) reads only the untrusted copy in the state (``state.session``):
it decides nothing but the workload's environment, which the owner chooses anyway.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from typing import TYPE_CHECKING, Any

from corral.contract.model import ProcessSpec
from corral.errors import BackendUnavailableError, ErrorCode, LifecycleError
from corral.lifecycle import store
from corral.lifecycle.ids import token_of
from corral.lifecycle.launch import ExecPlan, Started, kill_supervisor, start_supervisor
from corral.plan import Plan
from corral.policy.environment import build_environment

if TYPE_CHECKING:
    from corral.backends.session import AgentIdentity

# The session backend (and its X11 helpers) is imported only by session phases, which run as
# root: the owner's exec and every other containment never pay for it.

CONTAINMENT = "isolation_session"
BINDINGS = "sessions"


def _bindings_dir() -> str:
    path = os.path.join(store.run_dir(), BINDINGS)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if st.st_uid != 0 or st.st_mode & 0o077 or not os.path.isdir(path) or os.path.islink(path):
        raise LifecycleError(
            f"{path} is not a root-only directory; refusing to trust it",
            code=ErrorCode.BACKEND_ERROR,
            remediation="remove it as root and try again",
        )
    return path


def _binding_path(sandbox_id: str) -> str:
    return os.path.join(_bindings_dir(), token_of(sandbox_id))


def _write(sandbox_id: str, binding: dict[str, Any]) -> None:
    path = _binding_path(sandbox_id)
    tmp = f"{path}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(binding, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read(sandbox_id: str) -> dict[str, Any] | None:
    try:
        with open(_binding_path(sandbox_id)) as f:
            binding = json.load(f)
    except (OSError, ValueError):
        return None
    return binding if isinstance(binding, dict) else None


def needs_root(sandbox_id: object) -> bool:
    """Whether phases of this id run as root (decided by the id's shape, before any state)."""
    return isinstance(sandbox_id, str) and sandbox_id.startswith("corral-session:")


def require_root_for(sandbox_id: str | None) -> None:
    """``None``: a new sandbox (provision)."""
    if (sandbox_id is None or needs_root(sandbox_id)) and os.geteuid() != 0:
        what = sandbox_id or "an isolation_session sandbox"
        raise BackendUnavailableError(
            f"{what} runs under an agent identity (a host account) that only root controls",
            remediation="send the request through the Corral service (`corral serve`, run as "
            "root), which checks your credentials",
        )


def bind_new_identity(sandbox_id: str, owner_uid: int) -> dict[str, Any]:
    """Provision: a fresh identity for the sandbox; MXC's metadata for the result."""
    from corral.backends.session import SessionBackend, allocate, release

    identity = allocate()
    try:
        _write(sandbox_id, {"sandboxId": sandbox_id, "owner": owner_uid, "identity": identity.name})
    except BaseException:
        release(identity)
        raise
    return SessionBackend.provision_metadata(identity)


def identity_of(sandbox_id: str, owner_uid: int) -> AgentIdentity:
    """The sandbox's identity, from the root-only binding; ``stale_id`` when there is none."""
    from corral.backends.session import lookup

    require_root_for(sandbox_id)
    binding = _read(sandbox_id)
    identity = lookup(str(binding.get("identity"))) if binding else None
    if binding is None or binding.get("owner") != owner_uid or identity is None:
        raise store.stale(sandbox_id)
    return identity


def trusted_supervisor(sandbox_id: str) -> tuple[int | None, int | None]:
    binding = _read(sandbox_id) or {}
    pid, start = binding.get("supervisor") or (None, None)
    return (pid, start) if isinstance(pid, int) and isinstance(start, int) else (None, None)


def record_supervisor(sandbox_id: str, started: Started | None) -> None:
    binding = _read(sandbox_id)
    if binding is not None:
        binding["supervisor"] = [started.pid, started.start_time] if started else None
        _write(sandbox_id, binding)


def start(path: str, state: store.SandboxState, plan: Plan) -> Started:
    """Start the sandbox as its agent identity; the owner may connect to its control socket.
    A private display (``ui.disable: false``) and its clipboard broker are started detached,
    recorded in the binding. The broker's human side is the display the starting process's
    environment names (DISPLAY, XAUTHORITY, as for a one-shot run), reached as the owner."""
    from corral.backends.session import human_display_from, prepare_session

    identity = identity_of(state.id, state.owner_uid)
    previous = trusted_supervisor(state.id)  # the state may lie about a running one
    if previous[0] is not None:
        kill_supervisor(previous[0], previous[1], 0)
    _kill_helpers(state.id)
    human = None
    if plan.ui.clipboard != "none":
        human = human_display_from(os.environ, state.owner_uid)
    setup = prepare_session(plan, identity, human=human, detached=True)
    try:
        _record(state.id, "helpers", [_pid_and_start(pid) for pid in setup.helper_pids])
        started = start_supervisor(
            path,
            state,
            setup.plan,
            adjust=setup.adjust,
            socket_owner=(state.owner_uid, state.owner_gid),
        )
    except BaseException:
        setup.close()
        raise
    setup.let_go()
    record_supervisor(state.id, started)
    return started


def _pid_and_start(pid: int) -> list[int | None]:
    return [pid, store.process_start_time(pid)]


def _record(sandbox_id: str, key: str, value: object) -> None:
    binding = _read(sandbox_id)
    if binding is not None:
        binding[key] = value
        _write(sandbox_id, binding)


def _kill_helpers(sandbox_id: str) -> None:
    """The sandbox's processes outside its supervisor (its private display), by the pid and
    start time root recorded: a reused pid is left alone."""
    binding = _read(sandbox_id) or {}
    for entry in binding.get("helpers") or []:
        if not (isinstance(entry, list) and len(entry) == 2 and all(type(v) is int for v in entry)):
            continue
        pid, start_time = entry
        if store.process_start_time(pid) == start_time:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    _record(sandbox_id, "helpers", [])


def end_processes(sandbox_id: str, owner_uid: int) -> None:
    """Stop: its helpers, and every process of the agent identity (also any it left outside
    the sandbox)."""
    from corral.backends.session.identity import kill_processes_of

    identity = identity_of(sandbox_id, owner_uid)
    _kill_helpers(sandbox_id)
    kill_processes_of(identity.uid)
    record_supervisor(sandbox_id, None)


def end_stray_processes(sandbox_id: str, owner_uid: int) -> None:
    """`corral gc` on a sandbox that is not started: whatever a start that crashed half-way
    left running (display, broker, agent processes) is ended."""
    with contextlib.suppress(LifecycleError):
        end_processes(sandbox_id, owner_uid)


def unbind(sandbox_id: str) -> None:
    """Deprovision: release the identity (its account, files, ACLs) and forget the binding."""
    from corral.backends.session import lookup, release

    binding = _read(sandbox_id)
    identity = lookup(str(binding.get("identity"))) if binding else None
    _kill_helpers(sandbox_id)
    if identity is not None:
        release(identity)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_binding_path(sandbox_id))


def orphaned_bindings(live_tokens: set[str]) -> list[str]:
    """Sandbox ids of bindings whose sandbox is gone (for `corral gc`, root only)."""
    if os.geteuid() != 0:
        return []
    out = []
    base = _bindings_dir()
    for name in os.listdir(base):
        if name in live_tokens or "." in name:
            continue
        binding = _read_file(os.path.join(base, name))
        if binding is not None and isinstance(binding.get("sandboxId"), str):
            out.append(binding["sandboxId"])
    return out


def _read_file(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def plan_exec(
    session: dict[str, Any], process: ProcessSpec, *, private_display: bool = False
) -> ExecPlan:
    """One exec, planned in the owner's process: the agent's HOME/USER, the human's session
    variables scrubbed (DISPLAY/XAUTHORITY name the sandbox's private display, if it has one),
    the workspace as default working directory."""
    from corral.backends.session.identity import display_dir_of
    from corral.backends.session.sandbox import HUMAN_SESSION_VARIABLES
    from corral.ui.display import client_env

    env = {k: v for k, v in build_environment(process).items() if k not in HUMAN_SESSION_VARIABLES}
    workspace = str(session.get("ephemeralWorkspacePath", "/"))
    name = str(session.get("agentUserName", ""))
    env.update(HOME=workspace, USER=name, LOGNAME=name)
    if private_display:  # only names paths: the display is reachable only inside the sandbox
        env.update(client_env(display_dir_of(name)))
    cwd = process.cwd if process.cwd is not None else workspace
    return ExecPlan(("/bin/sh", "-c", process.command_line), env, cwd, process.timeout_ms)


ABANDONED_AFTER_S = 600.0


def abandoned_identities(live_tokens: set[str]) -> list[AgentIdentity]:
    """Agent accounts no sandbox record claims, with no process left and older than
    ABANDONED_AFTER_S (a one-shot session run that crashed before releasing its identity);
    the age guard spares a one-shot run between allocating its identity and starting."""
    import time

    from corral.backends.session import identity as identities

    if os.geteuid() != 0:
        return []
    claimed = set()
    for name in os.listdir(_bindings_dir()):
        binding = _read_file(os.path.join(_bindings_dir(), name))
        if binding is not None and isinstance(binding.get("identity"), str):
            claimed.add(binding["identity"])
    out = []
    for ident in identities.list_leftover_identities(in_use=claimed):
        try:
            age = time.time() - os.stat(ident.workspace).st_mtime
        except FileNotFoundError:
            age = ABANDONED_AFTER_S + 1
        if age > ABANDONED_AFTER_S and not _has_processes(ident.uid):
            out.append(ident)
    return out


def _has_processes(uid: int) -> bool:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    return True
            except FileNotFoundError:
                continue
    return False
