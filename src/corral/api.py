"""The synchronous Python SDK. Everything public is re-exported from `corral`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import IO, TYPE_CHECKING, Any, Literal, overload

from corral.backends.base import LaunchOptions, SandboxProcess, StdioMode
from corral.backends.process.handle import communicate
from corral.backends.registry import available_backends, get_backend
from corral.contract.model import Request
from corral.errors import CorralError, ErrorCode
from corral.plan import Plan, backend_for, build_plan

if TYPE_CHECKING:
    from corral.audit.kernel_denials import KernelDenialWatcher
    from corral.audit.recorder import Recorder
    from corral.learn.run import LearnResult
    from corral.policy.admin import AdminPolicy

RequestLike = Request | Mapping[str, Any] | str | bytes


@dataclass(frozen=True)
class ExecutionResult:
    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ValidationResult:
    valid: bool
    error: dict[str, Any] | None = None  # the MXC error envelope's body when invalid
    warnings: tuple[str, ...] = ()
    plan: dict[str, Any] | None = None


@dataclass
class Process:
    """A sandboxed process started by :func:`spawn`; binary streams, like subprocess.Popen."""

    _sandbox: SandboxProcess
    warnings: tuple[str, ...] = field(default=())
    _trail: RunAudit | None = None  # written when the workload is seen to end

    @property
    def pid(self) -> int:
        return self._sandbox.pid

    @property
    def stdin(self) -> IO[bytes] | None:
        return self._sandbox.stdin

    @property
    def stdout(self) -> IO[bytes] | None:
        return self._sandbox.stdout

    @property
    def stderr(self) -> IO[bytes] | None:
        return self._sandbox.stderr

    @property
    def pty_fd(self) -> int | None:
        return self._sandbox.pty_fd

    @property
    def returncode(self) -> int | None:
        return self._sandbox.returncode

    @property
    def timed_out(self) -> bool:
        return self._sandbox.timed_out

    def wait(self, timeout: float | None = None) -> int:
        code = self._sandbox.wait(timeout)
        self._ended()
        return code

    def poll(self) -> int | None:
        code = self._sandbox.poll()
        if code is not None:
            self._ended()
        return code

    def kill(self) -> None:
        self._sandbox.kill()

    def resize(self, rows: int, columns: int) -> None:
        self._sandbox.resize(rows, columns)

    def communicate(self, input: bytes | None = None) -> tuple[bytes, bytes]:
        out = communicate(self._sandbox, input)
        self._ended()
        return out

    def close(self) -> None:
        try:
            self._sandbox.close()
        finally:
            self._ended()

    def _ended(self) -> None:
        if self._trail is not None:
            self._trail.finish(self._sandbox)

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse(request: RequestLike, *, experimental: bool = False) -> Request:
    """A validated Request from any accepted form; ``version`` is filled when absent."""
    if isinstance(request, Request):
        return request
    from corral.contract import parse_request

    return parse_request(request, experimental=experimental, fill_version=True)


def plan(request: RequestLike, *, experimental: bool = False) -> Plan:
    """The effective-enforcement plan for a one-shot request, without running anything."""
    from corral.policy.admin import AdminPolicy

    return _plan(parse(request, experimental=experimental), AdminPolicy.load())


def _plan(req: Request, admin: AdminPolicy | None) -> Plan:
    if not req.is_one_shot:
        raise CorralError(
            f"a {req.phase!r} request has no one-shot plan; use the lifecycle calls",
            code=ErrorCode.UNSUPPORTED_PHASE,
        )
    clamp = admin.clamp(req) if admin is not None else None
    req = clamp.request if clamp is not None else req
    return build_plan(req, get_backend(backend_for(req)).probe(), clamp)


def launch(plan_: Plan, options: LaunchOptions) -> SandboxProcess:
    return get_backend(plan_.backend).launch(plan_, options)


def audited_launch(
    request: RequestLike, options: LaunchOptions, *, experimental: bool = False, audit: bool = True
) -> tuple[Plan, SandboxProcess, RunAudit]:
    """Parse, clamp, plan and launch, recording request/refusal, plan and launch events; the
    returned :class:`RunAudit` writes the kernel's denials and the exit once it is over."""
    from corral.audit.kernel_denials import KernelDenialWatcher
    from corral.audit.recorder import Recorder
    from corral.policy.admin import AdminPolicy

    admin = AdminPolicy.load()
    if admin is not None:
        admin.check_audit(audit)
    recorder = Recorder.open(enabled=audit)
    try:
        req = parse(request, experimental=experimental)
        recorder = Recorder.open(enabled=audit, declared_actor=req.corral.actor)
        p = _plan(req, admin)
    except CorralError as exc:
        recorder.emit("refusal", decision="deny", reason=exc.message, code=str(exc.code))
        raise
    recorder.emit("request", decision="allow", containment=p.containment, command=p.command[-1])
    recorder.emit("plan", clauses=[c.as_dict() for c in p.clauses], warnings=list(p.warnings))
    # Kernel denial records (Landlock, seccomp): subscribed before the launch asks for them.
    denials = KernelDenialWatcher.open(enabled=audit)
    try:
        proc = launch(
            p, replace(options, audit=recorder.network_decision, log_denials=denials.listening)
        )
    except BaseException:
        denials.close()
        raise
    recorder.emit("launch", pid=proc.pid, backend=p.backend)
    denials.attach(proc.pid)
    return p, proc, RunAudit(recorder, denials)


@dataclass
class RunAudit:
    """The end of a one-shot run's trail: its kernel denials, then its exit or timeout."""

    recorder: Recorder
    denials: KernelDenialWatcher | None = None  # None: not watched (long-lived sandboxes' execs)
    _done: bool = False

    def finish(self, proc: SandboxProcess) -> None:
        """Once the workload ended (idempotent); also releases the watch when it did not."""
        if self._done:
            return
        self._done = True
        try:
            code = proc.returncode
            if code is not None:
                if self.denials is not None:
                    self.denials.finish(self.recorder)
                self.recorder.emit(
                    "timeout" if proc.timed_out else "exit", pid=proc.pid, exitCode=code
                )
        finally:
            if self.denials is not None:
                self.denials.close()


@overload
def run(
    request: RequestLike,
    *,
    input: bytes | None = None,
    experimental: bool = False,
    audit: bool = True,
    learn: Literal[False] = False,
) -> ExecutionResult: ...


@overload
def run(
    request: RequestLike,
    *,
    input: bytes | None = None,
    experimental: bool = False,
    audit: bool = True,
    learn: Literal[True],
) -> LearnResult: ...


def run(
    request: RequestLike,
    *,
    input: bytes | None = None,
    experimental: bool = False,
    audit: bool = True,
    learn: bool = False,
) -> ExecutionResult | LearnResult:
    """Run a one-shot request to completion and collect its output. ``learn=True`` runs it
    in learning mode instead (see :func:`learn`)."""
    if learn:
        return _learn(request, input=input, experimental=experimental, audit=audit)
    stdin: StdioMode = "pipe" if input else "devnull"
    p, proc, trail = audited_launch(
        request, LaunchOptions(stdin=stdin), experimental=experimental, audit=audit
    )
    try:
        with proc:
            out, err = communicate(proc, input)
            code = proc.wait()
    finally:
        trail.finish(proc)
    return ExecutionResult(
        out.decode(errors="replace"), err.decode(errors="replace"), code, proc.timed_out, p.warnings
    )


def learn(
    request: RequestLike,
    *,
    input: bytes | None = None,
    experimental: bool = False,
    audit: bool = True,
) -> LearnResult:
    """Learning mode: run permissively (writes outside the read-write grants go to a
    throwaway layer), record what the request would have refused, and return the request
    plus the least grants that would have let it run (``proposed``, ``diff``). Refused when
    the admin policy forbids learning."""
    return _learn(request, input=input, experimental=experimental, audit=audit)


def _learn(
    request: RequestLike, *, input: bytes | None, experimental: bool, audit: bool
) -> LearnResult:
    from corral.audit.recorder import Recorder
    from corral.learn.run import learn_request

    try:
        req = parse(request, experimental=experimental)
    except CorralError as exc:
        Recorder.open(enabled=audit).emit(
            "refusal", decision="deny", reason=exc.message, code=str(exc.code), learning=True
        )
        raise
    return learn_request(req, input=input, audit=audit)


def spawn(request: RequestLike, *, experimental: bool = False, audit: bool = True) -> Process:
    """Start a one-shot request; talk to it through pipes."""
    p, proc, trail = audited_launch(
        request, LaunchOptions(), experimental=experimental, audit=audit
    )
    return Process(proc, p.warnings, trail)


def spawn_with_pty(
    request: RequestLike,
    rows: int = 24,
    columns: int = 80,
    *,
    experimental: bool = False,
    audit: bool = True,
) -> Process:
    """Start a one-shot request on its own pseudo-terminal (``pty_fd`` is the master side)."""
    options = LaunchOptions(pty=(rows, columns))
    p, proc, trail = audited_launch(request, options, experimental=experimental, audit=audit)
    return Process(proc, p.warnings, trail)


def validate(request: RequestLike, *, experimental: bool = False) -> ValidationResult:
    """Would this request be accepted here? Never raises for a bad request."""
    try:
        req = parse(request, experimental=experimental)
        if not req.is_one_shot:
            return ValidationResult(True)
        p = plan(req)
    except CorralError as exc:
        return ValidationResult(False, exc.to_envelope()["error"])
    return ValidationResult(True, None, p.warnings, p.to_dict())


def get_available_backends() -> list[dict[str, Any]]:
    return [info.to_dict() for info in available_backends()]


def get_platform_support() -> dict[str, Any]:
    backends = available_backends()
    return {
        "platform": "linux",
        "kernel": os.uname().release,
        "supported": any(b.available for b in backends),
        "containments": sorted({c for b in backends if b.available for c in b.containments}),
        "backends": [b.to_dict() for b in backends],
    }
