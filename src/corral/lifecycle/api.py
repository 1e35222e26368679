"""The lifecycle SDK (sync) and the wire-envelope entry point for `corral exec`.

Control phases go through the local service when it runs (`corral serve`), else run in this
process. Exec always talks to the sandbox's own control socket (0600, the owner's): the
kernel's file permissions are the check, and the stdio descriptors travel there directly.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

from corral.api import ExecutionResult, Process, RequestLike, ValidationResult, parse
from corral.contract.model import ProcessSpec, Request
from corral.errors import CorralError, ErrorCode
from corral.lifecycle import manager, microvm, privsep, service_client, session, store


@dataclass(frozen=True)
class ProvisionResult:
    container_id: str
    containment: str
    phase: str = "provisioned"
    warnings: tuple[str, ...] = field(default=())
    # MXC's provision metadata (isolation_session: agentUserName, agentUserSid,
    # ephemeralWorkspacePath)
    metadata: dict[str, Any] = field(default_factory=dict)


HUMAN_DISPLAY = ("DISPLAY", "XAUTHORITY")


def _control(op: str, sandbox_id: str, **params: Any) -> dict[str, Any]:
    if service_client.available():
        if op == "start":  # a session sandbox's clipboard broker reaches the caller's display
            params["display"] = {k: v for k, v in os.environ.items() if k in HUMAN_DISPLAY}
        result: dict[str, Any] = service_client.call(op, sandboxId=sandbox_id, **params)
        return result
    return run_locally(op, sandbox_id, **params)


def run_locally(op: str, sandbox_id: str, **params: Any) -> dict[str, Any]:
    """A control phase in this process, as the sandbox's owner (root acting for a user forks),
    or as root for that owner where the phase needs root (isolation_session)."""
    actions: dict[str, Any] = {
        "start": manager.start,
        "stop": manager.stop,
        "deprovision": manager.deprovision,
        "policy": lambda sid, **kw: manager.set_network_policy(sid, params.get("policy"), **kw),
    }
    action = actions[op]
    if os.getuid() == 0:
        state = store.load(store.find_sandbox(sandbox_id, 0))
        if state is not None and state.owner_uid != 0:
            if session.needs_root(sandbox_id):
                return dict(action(sandbox_id, acting_uid=state.owner_uid))
            result: dict[str, Any] = privsep.run_as(
                state.owner_uid, state.owner_gid, lambda: action(sandbox_id)
            )
            return result
    return dict(action(sandbox_id))


def _phase_request(request: RequestLike, phase: str, *, experimental: bool = False) -> Request:
    req = parse(request, experimental=experimental)
    if req.phase != phase:
        raise CorralError(
            f"expected a {phase!r} request, got phase {req.phase!r}",
            code=ErrorCode.UNSUPPORTED_PHASE,
        )
    return req


def provision_container(request: RequestLike, *, experimental: bool = False) -> ProvisionResult:
    """``experimental``: allow 1.1.0-alpha's experimental containments (microvm, vm)."""
    req = _phase_request(request, "provision", experimental=experimental)
    # The service does not take the experimental switch: those (root-only) run here.
    if service_client.available() and req.containment not in microvm.CONTAINMENTS:
        result = service_client.call("provision", request=req.raw)
    else:
        result = manager.provision(req)
    core = ("sandboxId", "containment", "phase", "warnings")
    return ProvisionResult(
        result["sandboxId"],
        result["containment"],
        result["phase"],
        tuple(result["warnings"]),
        {k: v for k, v in result.items() if k not in core},
    )


def start_container(sandbox_id: str) -> None:
    _control("start", sandbox_id)


def stop_container(sandbox_id: str) -> None:
    _control("stop", sandbox_id)


def deprovision_container(sandbox_id: str) -> None:
    _control("deprovision", sandbox_id)


def set_container_network_policy(sandbox_id: str, policy: dict[str, Any]) -> list[str]:
    """Replace a sandbox's network rules (``{"network": ..., "corral": {"network": ...}}``);
    a running sandbox applies them to new connections. Returns the rules now enforced."""
    rules: list[str] = _control("policy", sandbox_id, policy=policy).get("rules", [])
    return rules


def _process_of(request_or_process: RequestLike | ProcessSpec | str) -> ProcessSpec:
    if isinstance(request_or_process, ProcessSpec):
        return request_or_process
    if isinstance(request_or_process, str) and not request_or_process.lstrip().startswith("{"):
        return ProcessSpec(request_or_process)  # a bare command line
    req = _phase_request(request_or_process, "exec")
    assert req.process is not None
    return req.process


def run_in_container(
    sandbox_id: str,
    request_or_process: RequestLike | ProcessSpec | str,
    *,
    input: bytes | None = None,
) -> ExecutionResult:
    """Run one command in a started sandbox to completion (exec request, ProcessSpec, or a
    command line)."""
    process = _process_of(request_or_process)
    began = time.time()
    with contextlib.closing(manager.spawn(sandbox_id, process, stdin_devnull=not input)) as proc:
        try:
            out, err = proc.communicate(input)
            code = proc.wait()
        finally:
            if proc.trail is not None:
                proc.trail.finish(proc)
        manager.log_exec(sandbox_id, {
            "time": began, "command": process.command_line, "exitCode": code,
            "timedOut": proc.timed_out, "durationMs": round((time.time() - began) * 1000, 3),
        })  # fmt: skip
        return ExecutionResult(
            out.decode(errors="replace"), err.decode(errors="replace"), code, proc.timed_out
        )


def spawn_in_container(
    sandbox_id: str, request_or_process: RequestLike | ProcessSpec | str
) -> Process:
    proc = manager.spawn(sandbox_id, _process_of(request_or_process))
    return Process(proc, (), proc.trail)


def spawn_in_container_with_pty(
    sandbox_id: str,
    request_or_process: RequestLike | ProcessSpec | str,
    rows: int = 24,
    columns: int = 80,
) -> Process:
    proc = manager.spawn(sandbox_id, _process_of(request_or_process), pty=(rows, columns))
    return Process(proc, (), proc.trail)


def list_containers() -> list[dict[str, Any]]:
    if service_client.available():
        result: list[dict[str, Any]] = service_client.call("ps")
        return result
    return manager.list_sandboxes()


def container_logs(sandbox_id: str) -> list[dict[str, Any]]:
    return manager.logs(sandbox_id)


def _validate(request: RequestLike, phase: str) -> ValidationResult:
    try:
        req = _phase_request(request, phase)
        if phase == "provision":
            from corral.lifecycle.launch import plan_sandbox

            plan = plan_sandbox(req)
            return ValidationResult(True, None, plan.warnings, plan.to_dict())
        if req.sandbox_id is not None:
            from corral.lifecycle.ids import token_of

            token_of(req.sandbox_id)
    except CorralError as exc:
        return ValidationResult(False, exc.to_envelope()["error"])
    return ValidationResult(True)


def validate_provision(request: RequestLike) -> ValidationResult:
    return _validate(request, "provision")


def validate_start(request: RequestLike) -> ValidationResult:
    return _validate(request, "start")


def validate_exec(request: RequestLike) -> ValidationResult:
    return _validate(request, "exec")


def validate_stop(request: RequestLike) -> ValidationResult:
    return _validate(request, "stop")


def validate_deprovision(request: RequestLike) -> ValidationResult:
    return _validate(request, "deprovision")


def handle(request: Request) -> dict[str, Any]:
    """The ``result`` body of a state-aware envelope (`corral exec` with a phase)."""
    if request.phase == "provision":
        p = provision_container(request)
        return {"sandboxId": p.container_id, "containment": p.containment, "phase": p.phase,
                "warnings": list(p.warnings), **p.metadata}  # fmt: skip
    sandbox_id = request.sandbox_id or request.container_id
    if sandbox_id is None:
        raise CorralError(
            f"a {request.phase!r} request needs a sandboxId", code=ErrorCode.MALFORMED_ID
        )
    if request.phase == "exec":
        result = run_in_container(sandbox_id, request)
        return {"sandboxId": sandbox_id, "exitCode": result.exit_code, "stdout": result.stdout,
                "stderr": result.stderr, "timedOut": result.timed_out}  # fmt: skip
    if request.phase in ("start", "stop", "deprovision"):
        return _control(request.phase, sandbox_id)
    raise CorralError(f"unknown phase {request.phase!r}", code=ErrorCode.UNSUPPORTED_PHASE)
