"""Learning mode: run the workload in a permissive sandbox, record what the requested policy
would have refused, and propose the request plus the least grants that would have let it run.

The learning sandbox is the process backend with a widened view (see ``_widen``): the host's
tree read-only with every read-only part overlaid by a throwaway layer, the request's own
read-write grants as they are, the request's and the admin's denials still in force, and the
host's loopback reachable (nothing else the request does not already allow). An observer
(seccomp user notification) sees every path- and address-taking syscall of the workload.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from corral.backends.base import LaunchOptions, StdioMode
from corral.backends.process import launch as process_launch
from corral.backends.process.handle import communicate
from corral.backends.registry import get_backend
from corral.contract.model import FilesystemSpec, IngressSpec, NetworkSpec, Request
from corral.errors import BackendUnavailableError, CorralError, ErrorCode
from corral.learn import analyse as analysis
from corral.learn import proposal
from corral.learn.notify import PreparedListener, syscall_numbers
from corral.learn.observe import FsAccess, NetAccess
from corral.learn.supervisor import Supervisor
from corral.learn.view import prepare_child
from corral.plan import Plan, backend_for, build_plan
from corral.policy import baseline
from corral.policy.environment import choose_cwd
from corral.policy.filesystem import resolve_filesystem

if TYPE_CHECKING:
    from corral.audit.events import EventType
    from corral.audit.recorder import Recorder
    from corral.policy.admin import AdminPolicy

_OBSERVER_GRACE_S = 10.0


@dataclass(frozen=True)
class LearnResult:
    """What one learning run saw and what it proposes."""

    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool
    denials: tuple[analysis.Denial, ...]
    proposed: dict[str, Any]  # the MXC request to review
    diff: str  # unified diff from the request as given to ``proposed``
    needs_admin: tuple[str, ...]  # grants the admin policy forbids; never proposed
    warnings: tuple[str, ...] = ()

    def denials_as_dicts(self) -> list[dict[str, Any]]:
        return [_denial_record(d) for d in self.denials]


def learn_request(
    request: Request, *, input: bytes | None = None, audit: bool = True
) -> LearnResult:
    """Learning mode for a parsed request, under the machine's admin policy, audited."""
    from corral.audit.recorder import Recorder
    from corral.policy.admin import AdminPolicy

    admin = AdminPolicy.load()
    if admin is not None:
        admin.check_audit(audit)
    recorder = Recorder.open(enabled=audit, declared_actor=request.corral.actor)
    return learn(request, admin, recorder, input=input)


def learn(
    request: Request,
    admin: AdminPolicy | None,
    recorder: Recorder,
    *,
    input: bytes | None = None,
) -> LearnResult:
    """Run ``request`` (parsed, one-shot) in learning mode; ``admin`` may forbid it."""
    try:
        if admin is not None:
            admin.check_learning()
        enforced_plan, learning_plan, enforced = _plans(request, admin)
    except CorralError as exc:
        recorder.emit(
            "refusal", decision="deny", reason=exc.message, code=str(exc.code), learning=True
        )
        raise
    recorder.emit("request", decision="allow", containment=learning_plan.containment,
                  command=learning_plan.command[-1], learning=True)  # fmt: skip
    recorder.emit("plan", clauses=[asdict(c) for c in learning_plan.clauses],
                  warnings=list(learning_plan.warnings), learning=True)  # fmt: skip

    supervisor = Supervisor()
    listener = PreparedListener.prepare(syscall_numbers().values())
    supervisor.start()
    stdin: StdioMode = "pipe" if input else "devnull"
    try:
        proc = process_launch(
            learning_plan,
            LaunchOptions(stdin=stdin),
            adjust=lambda spec: prepare_child(spec, supervisor.child, listener),
        )
    finally:
        supervisor.sandbox_started()
    recorder.emit("launch", pid=proc.pid, backend=learning_plan.backend, learning=True)
    with proc:
        out, err = communicate(proc, input)
        code = proc.wait()
    finished = supervisor.join(_OBSERVER_GRACE_S)
    recorder.emit(
        "timeout" if proc.timed_out else "exit", pid=proc.pid, exitCode=code, learning=True
    )
    if not supervisor.attached:
        raise CorralError(
            "learning mode could not observe the workload"
            + (f": {supervisor.error}" if supervisor.error else ""),
            code=ErrorCode.BACKEND_ERROR,
            remediation="learning mode needs seccomp user notification (Linux 5.5 or newer)",
        )

    denials = tuple(analysis.analyse(list(supervisor.accesses), enforced))
    warnings = list(enforced_plan.warnings)
    if not finished:
        warnings.append(
            "the observer was still busy when the sandbox ended; some accesses may be missing"
        )
    if "nftables" not in learning_plan.mechanisms:
        warnings.append("no network rules on this host: the host's loopback stayed unreachable")
    if supervisor.truncated:
        warnings.append("the workload made too many distinct accesses; the rest went unrecorded")
    for denial in denials:
        _emit_denial(recorder, denial)
    grants = proposal.minimal_grants(denials)
    cwd = _pinned_cwd(request, enforced_plan.cwd, grants)
    proposed = proposal.propose(request.raw, grants, cwd=cwd)
    failed = supervisor.report.get("failed") or []
    if failed:
        warnings.append(
            "writes could not be diverted under " + ", ".join(failed[:5])
            + "; they stayed read-only during learning (attempts are still recorded)"
        )  # fmt: skip
    return LearnResult(
        out.decode(errors="replace"),
        err.decode(errors="replace"),
        code,
        proc.timed_out,
        denials,
        proposed,
        proposal.unified_diff(request.raw, proposed),
        _needs_admin(denials),
        tuple(warnings),
    )


def _plans(request: Request, admin: AdminPolicy | None) -> tuple[Plan, Plan, analysis.Enforced]:
    """The plan the request gets under enforcement, the learning plan, and what the
    analysis compares against."""
    if not request.is_one_shot or request.process is None:
        raise CorralError("learning mode runs one-shot requests", code=ErrorCode.UNSUPPORTED_PHASE)
    if backend_for(request) != "process":
        raise BackendUnavailableError(
            f"learning mode runs on the process backend; containment "
            f"{request.containment!r} is not supported",
            code=ErrorCode.UNSUPPORTED_CONTAINMENT,
            remediation="learn with containment 'process', then use the proposal with any",
        )
    clamp = admin.clamp(request) if admin is not None else None
    clamped = clamp.request if clamp is not None else request
    info = get_backend("process").probe()
    enforced_plan = build_plan(clamped, info, clamp)
    loopback = "nftables" in info.mechanisms  # else the learning run keeps the request's network
    learning_plan = build_plan(_widen(clamped, enforced_plan.cwd, admin, loopback), info, clamp)
    never_grant = tuple(os.path.realpath(p) for p in (admin.never_grant_paths if admin else ()))
    admin_denied = never_grant + tuple(
        os.path.realpath(p) for p in (admin.always_deny_paths if admin else ())
    )
    enforced = analysis.Enforced(
        filesystem=enforced_plan.filesystem,
        network=clamped.network,
        private_tmp=not any(
            e.path == analysis.PRIVATE_TMP and e.access != "deny"
            for e in enforced_plan.filesystem.entries
        ),
        network_proxy=clamped.network_proxy,
        never_grant=never_grant,
        never_allow=tuple(
            ipaddress.ip_network(str(n)) for n in (admin.never_allow_cidrs if admin else ())
        ),
        admin_denied=admin_denied,
        secrets=tuple(os.path.realpath(p) for p in hidden_secrets()),
    )
    return enforced_plan, learning_plan, enforced


def _widen(request: Request, cwd: str, admin: AdminPolicy | None, loopback: bool) -> Request:
    """The learning request: the host's tree read-only (the backend's view builder then
    diverts writes), denials kept, the host's loopback reachable, the same cwd."""
    fs = request.filesystem
    never = admin.never_grant_paths if admin is not None else ()
    widened_fs = FilesystemSpec(
        readonly_paths=(*fs.readonly_paths, *host_view()),
        readwrite_paths=fs.readwrite_paths,
        denied_paths=(*fs.denied_paths, *never, *hidden_secrets()),
    )
    network = request.network
    if request.network_proxy is None and loopback:
        network = NetworkSpec(network.egress, IngressSpec(network.ingress.default, "allow"))
    assert request.process is not None
    return replace(
        request,
        filesystem=widened_fs,
        network=network,
        network_given=True,
        process=replace(request.process, cwd=cwd),
    )


# Host secrets that stay hidden even in learning mode's permissive view.
SYSTEM_SECRETS = ("/etc/shadow", "/etc/gshadow", "/etc/sudoers", "/etc/sudoers.d", "/etc/ssh",
                  "/etc/ssl/private", "/root/.ssh", "/root/.gnupg")  # fmt: skip


def hidden_secrets() -> tuple[str, ...]:
    """Credentials of the caller (and the system) that learning never exposes or proposes."""
    from corral.policy.helpers import SENSITIVE_PROFILE_ENTRIES

    home = os.path.expanduser("~")
    candidates = (*SYSTEM_SECRETS, *(os.path.join(home, e) for e in SENSITIVE_PROFILE_ENTRIES))
    return tuple(p for p in candidates if os.path.lexists(p))


def host_view() -> tuple[str, ...]:
    """The host's tree as read-only grants, around what the backend builds itself (/proc,
    /dev, the system directories and /etc's baseline, which it copies onto its own root)."""
    own = {"/proc", "/sys", "/dev", "/etc", *baseline.SYSTEM_DIRS}
    tops = [f"/{n}" for n in sorted(os.listdir("/")) if f"/{n}" not in own]
    etc = [f"/etc/{n}" for n in sorted(os.listdir("/etc")) if n not in baseline.ETC_ENTRIES]
    return tuple(p for p in (*tops, *etc) if not os.path.islink(p) and os.access(p, os.R_OK))


def _pinned_cwd(request: Request, learned_cwd: str, grants: proposal.Grants) -> str | None:
    """The cwd to write into the proposal when the new grants would change Corral's choice."""
    assert request.process is not None
    if request.process.cwd is not None or not (grants.readonly or grants.readwrite):
        return None
    fs = request.filesystem
    proposed = FilesystemSpec(
        (*fs.readonly_paths, *grants.readonly),
        (*fs.readwrite_paths, *grants.readwrite),
        fs.denied_paths,
    )
    chosen = choose_cwd(request.process, resolve_filesystem(proposed))
    return None if chosen == learned_cwd else learned_cwd


def _needs_admin(denials: tuple[analysis.Denial, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for d in denials:
        if d.verdict != "admin":
            continue
        a = d.access
        what = (
            f"{d.grant_access} {d.grant}"
            if isinstance(a, FsAccess)
            else f"egress {a.address} {a.protocol}/{a.port}"
        )
        out.append(f"{what}: {d.note}")
    return tuple(dict.fromkeys(out))


def _denial_record(d: analysis.Denial) -> dict[str, Any]:
    a = d.access
    record: dict[str, Any] = {"learned": True, "verdict": d.verdict}
    if isinstance(a, FsAccess):
        record.update(path=a.path, op=a.op, syscall=a.syscall)
        if d.grant:
            record.update(grant=d.grant, access=d.grant_access)
    elif isinstance(a, NetAccess):
        record.update(address=a.address, port=a.port, protocol=a.protocol)
    if d.note:
        record["note"] = d.note
    return record


def _emit_denial(recorder: Recorder, d: analysis.Denial) -> None:
    kind: EventType = "fs_denial" if isinstance(d.access, FsAccess) else "network_decision"
    recorder.emit(kind, decision="deny", reason=d.note or "the requested policy refuses it",
                  **_denial_record(d))  # fmt: skip
