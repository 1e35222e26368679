"""The five phases, run in the caller's own process and with its own uid.

Every phase takes the sandbox's lock, reloads its state (another process may have changed it)
and checks the transition:

    provision ─► provisioned ─start─► started ─exec*─► started ─stop─► stopped ─start─► ...
                 any phase ─deprovision─► (gone: stale_id from then on)
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
from collections.abc import Callable
from typing import Any

from corral.contract.model import ProcessSpec, Request
from corral.errors import CorralError, ErrorCode, LifecycleError, PolicyError
from corral.lifecycle import ids, microvm, network_policy, session, store, trail
from corral.lifecycle.client import RemoteProcess, start_exec
from corral.lifecycle.launch import kill_supervisor, plan_exec, plan_sandbox, start_supervisor
from corral.plan import Plan

CONTAINMENTS = tuple(ids.PREFIXES)


def provision(request: Request, *, acting_uid: int | None = None) -> dict[str, Any]:
    """``acting_uid``: root provisioning for that user (the service); default the caller."""
    owner = _acting(acting_uid)
    try:
        result = _provision(request, owner)
    except CorralError as exc:
        trail.refused(trail.recorder(None, owner, request.raw, acting_uid), "provision", exc)
        raise
    rec = trail.recorder(result["sandboxId"], owner, request.raw, acting_uid)
    trail.phase(rec, "provision", containment=result["containment"])
    return result


def _provision(request: Request, owner: int) -> dict[str, Any]:
    containment = request.containment or "process"
    if containment not in CONTAINMENTS:
        raise PolicyError(
            f"containment {containment!r} cannot be provisioned on Linux by Corral yet",
            code=ErrorCode.UNSUPPORTED_CONTAINMENT,
            remediation="provision 'process', 'bubblewrap', 'isolation_session', 'microvm' or "
            "'vm', or run it one-shot",
        )
    if containment == session.CONTAINMENT:
        session.require_root_for(None)
    plan = plan_sandbox(request)  # validate now: a bad policy fails here, not at start
    state = store.SandboxState(
        id=ids.new_id(containment),
        containment=containment,
        owner_uid=owner,
        owner_gid=store.primary_gid(owner) if owner != os.getuid() else os.getgid(),
        request=request.raw,
    )
    path = store.create(state)
    result: dict[str, Any] = {
        "sandboxId": state.id,
        "containment": containment,
        "phase": state.phase,
        "warnings": list(plan.warnings),
    }
    if containment == session.CONTAINMENT:
        try:
            state.session = session.bind_new_identity(state.id, owner)
        except BaseException:
            remove_sandbox(path, None)
            raise
        store.save(path, state)
        result.update(state.session)
    return result


def _acting(acting_uid: int | None) -> int:
    return os.getuid() if acting_uid is None else acting_uid


def _locked_phase(
    sandbox_id: str,
    body: Callable[[str, store.SandboxState], Any],
    acting_uid: int | None = None,
    *,
    phase: str,
) -> Any:
    """``body`` under the sandbox's lock; ``phase`` (or its refusal) goes to the owner's
    audit trail, except for exec, whose launch and end the caller records (:func:`spawn`)."""
    path = store.find_sandbox(sandbox_id, _acting(acting_uid))
    with store.locked(path):
        state = store.load(path)
        if state is None or state.phase == "deprovisioning":
            raise store.stale(sandbox_id)
        if session.needs_root(state.id) and os.geteuid() == 0:
            # Root trusts its own record of the supervisor, not the owner-writable state.
            state.supervisor_pid, state.supervisor_start = session.trusted_supervisor(state.id)
        notice_crash(path, state)
        rec = trail.of_state(state, acting_uid)
        try:
            result = body(path, state)
        except CorralError as exc:
            trail.refused(rec, phase, exc)
            raise
        if phase != "exec":
            trail.phase(rec, phase, **{k: v for k, v in result.items() if k == "rules"})
        return result


def notice_crash(path: str, state: store.SandboxState) -> None:
    """A started sandbox whose supervisor died is stopped (its resources are released here)."""
    if state.phase == "started" and not store.supervisor_alive(state):
        _release(path, state)
        state.phase = "stopped"
        store.save(path, state)


def start(sandbox_id: str, *, acting_uid: int | None = None) -> dict[str, Any]:
    session.require_root_for(sandbox_id)

    def body(path: str, state: store.SandboxState) -> dict[str, Any]:
        if state.phase == "started":
            raise _phase_error(ErrorCode.ALREADY_STARTED, sandbox_id, "is already started")
        plan = plan_sandbox(_request(state))
        if session.needs_root(state.id):
            started = session.start(path, state, plan)
        elif microvm.is_vm(state.id):
            started = microvm.start(path)
        else:
            started = start_supervisor(path, state, plan)
        state.phase = "started"
        state.supervisor_pid, state.supervisor_start = started.pid, started.start_time
        state.cgroup = started.cgroup
        store.save(path, state)
        return {"sandboxId": sandbox_id, "phase": state.phase}

    result: dict[str, Any] = _locked_phase(sandbox_id, body, acting_uid, phase="start")
    return result


def spawn(
    sandbox_id: str,
    process: ProcessSpec,
    *,
    pty: tuple[int, int] | None = None,
    stdin_devnull: bool = False,
) -> RemoteProcess:
    def body(path: str, state: store.SandboxState) -> RemoteProcess:
        if state.phase != "started":
            raise _phase_error(ErrorCode.NOT_STARTED, sandbox_id, f"is {state.phase}, not started")
        request = _request(state)
        if state.session is not None:
            plan = session.plan_exec(state.session, process, private_display=not request.ui.disable)
        else:
            plan = plan_exec(_sandbox_plan(state, request), request, process)
        proc = start_exec(
            os.path.join(path, store.CONTROL_SOCKET),
            command=plan.command,
            env=network_policy.exec_environment(path, plan.env),
            cwd=plan.cwd,
            timeout_ms=plan.timeout_ms,
            pty=pty,
            stdin_devnull=stdin_devnull,
        )
        # Its end is written by whoever sees it end (corral.lifecycle.api), through this.
        proc.trail = trail.exec_launched(trail.of_state(state), proc.pid, process.command_line)
        return proc

    proc: RemoteProcess = _locked_phase(sandbox_id, body, phase="exec")
    return proc


def stop(sandbox_id: str, *, acting_uid: int | None = None) -> dict[str, Any]:
    session.require_root_for(sandbox_id)

    def body(path: str, state: store.SandboxState) -> dict[str, Any]:
        if state.phase == "stopped":
            raise _phase_error(ErrorCode.ALREADY_STOPPED, sandbox_id, "is already stopped")
        if state.phase == "provisioned":
            raise _phase_error(ErrorCode.NOT_STARTED, sandbox_id, "was never started")
        _release(path, state)
        state.phase = "stopped"
        store.save(path, state)
        return {"sandboxId": sandbox_id, "phase": state.phase}

    result: dict[str, Any] = _locked_phase(sandbox_id, body, acting_uid, phase="stop")
    return result


def deprovision(sandbox_id: str, *, acting_uid: int | None = None) -> dict[str, Any]:
    session.require_root_for(sandbox_id)

    def body(path: str, state: store.SandboxState) -> dict[str, Any]:
        state.phase = "deprovisioning"  # a crash from here on is finished by `corral gc`
        store.save(path, state)
        remove_sandbox(path, state)
        return {"sandboxId": sandbox_id, "phase": "deprovisioned"}

    result: dict[str, Any] = _locked_phase(sandbox_id, body, acting_uid, phase="deprovision")
    return result


def set_network_policy(
    sandbox_id: str, policy: object, *, acting_uid: int | None = None
) -> dict[str, Any]:
    """Replace the sandbox's network rules (`corral policy set`): validated as part of the
    provision request, stored for later starts, and swapped atomically in a running sandbox
    (new connections see them)."""
    session.require_root_for(sandbox_id)

    def body(path: str, state: store.SandboxState) -> dict[str, Any]:
        old = plan_sandbox(_request(state))
        raw = network_policy.merged_request(state.request, policy)
        new = plan_sandbox(_parse_cached(json.dumps(raw, sort_keys=True)))
        network_policy.check_change(old.network, new.network, started=state.phase == "started")
        rules: list[str] = []
        if state.phase == "started":
            owner = 0 if session.needs_root(state.id) else state.owner_uid
            rules = network_policy.install(path, state, new.network, owner)
        state.request = raw
        store.save(path, state)
        return {"sandboxId": sandbox_id, "phase": state.phase, "rules": rules}

    result: dict[str, Any] = _locked_phase(sandbox_id, body, acting_uid, phase="policy")
    return result


def remove_sandbox(path: str, state: store.SandboxState | None) -> None:
    """Every trace: processes, identity, cgroup, socket, logs, state (the directory last)."""
    if state is not None:
        _release(path, state)
        if session.needs_root(state.id) and os.geteuid() == 0:
            session.unbind(state.id)
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _release(path: str, state: store.SandboxState) -> None:
    if session.needs_root(state.id) and os.geteuid() == 0:
        if state.supervisor_pid is not None:
            kill_supervisor(state.supervisor_pid, state.supervisor_start, 0)
        with contextlib.suppress(LifecycleError):
            session.end_processes(state.id, state.owner_uid)
    elif state.supervisor_pid is not None:
        kill_supervisor(state.supervisor_pid, state.supervisor_start, state.owner_uid)
    network_policy.stop_proxy(path, state.owner_uid)  # else it would outlive stop by a moment
    if microvm.is_vm(state.id):
        microvm.collect()  # QEMU's run directory, when its owner was killed before cleaning up
    if state.cgroup:
        remove_cgroups(os.path.basename(path))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(path, store.CONTROL_SOCKET))
    state.supervisor_pid = state.supervisor_start = None
    state.cgroup = None


def remove_cgroups(token: str) -> None:
    """Kill what is left in sandbox ``token``'s cgroups and remove them. They are found by the
    name Corral gives them, never by a path from the state file (its owner can write it)."""
    from corral.kernel import cgroups

    for path in cgroups.list_leftovers():
        if os.path.basename(path) == cgroup_name(token):
            cgroups.remove_leftover(path)


def cgroup_name(token: str) -> str:
    return f"sandbox-{token}"


def logs(sandbox_id: str) -> list[dict[str, Any]]:
    path = store.find_sandbox(sandbox_id, os.getuid())
    entries: list[dict[str, Any]] = []
    with contextlib.suppress(FileNotFoundError), open(os.path.join(path, store.EXEC_LOG)) as f:
        for line in f:
            with contextlib.suppress(ValueError):
                entries.append(json.loads(line))
    return entries


def log_exec(sandbox_id: str, entry: dict[str, Any]) -> None:
    """Append one exec record (best effort: a sandbox deprovisioned meanwhile has no log)."""
    with contextlib.suppress(OSError, LifecycleError):
        path = store.find_sandbox(sandbox_id, os.getuid())
        fd = os.open(
            os.path.join(path, store.EXEC_LOG), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600
        )
        with os.fdopen(fd, "a") as f:
            f.write(json.dumps(entry) + "\n")


def list_sandboxes() -> list[dict[str, Any]]:
    """The caller's sandboxes (root: everyone's)."""
    uid = os.getuid()
    dirs = [p for _, p in store.user_dirs()] if uid == 0 else [store.user_dir(uid, create=False)]
    out: list[dict[str, Any]] = []
    for base in dirs:
        with contextlib.suppress(FileNotFoundError):
            for token in sorted(os.listdir(base)):
                state = store.load(os.path.join(base, token))
                if state is None:
                    continue
                alive = store.supervisor_alive(state)
                out.append({
                    "sandboxId": state.id,
                    "containment": state.containment,
                    "owner": state.owner_uid,
                    "phase": "stopped (supervisor died)" if state.phase == "started" and not alive else state.phase,
                    "created": state.created,
                    "supervisorPid": state.supervisor_pid if alive else None,
                })  # fmt: skip
    return out


def _request(state: store.SandboxState) -> Request:
    return _parse_cached(json.dumps(state.request, sort_keys=True))


@functools.lru_cache(maxsize=64)
def _parse_cached(request_json: str) -> Request:
    from corral import api

    # experimental: the gate (microvm, vm) was passed when the request was provisioned
    return api.parse(json.loads(request_json), experimental=True)


_plans: dict[tuple[str, int | None], Plan] = {}


def _sandbox_plan(state: store.SandboxState, request: Request) -> Plan:
    """The sandbox's plan as of its current start (one per supervisor: a restart re-plans)."""
    key = (state.id, state.supervisor_start)
    if key not in _plans:
        if len(_plans) > 64:
            _plans.clear()
        _plans[key] = plan_sandbox(request)
    return _plans[key]


def _phase_error(code: ErrorCode, sandbox_id: str, what: str) -> LifecycleError:
    hint = {
        ErrorCode.ALREADY_STARTED: "exec in it, or stop it first",
        ErrorCode.ALREADY_STOPPED: "start it again, or deprovision it",
        ErrorCode.NOT_STARTED: "start it first",
    }[code]
    return LifecycleError(f"sandbox {sandbox_id} {what}", code=code, remediation=hint)
