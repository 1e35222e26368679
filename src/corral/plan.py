"""The effective-enforcement plan: for every clause of a request, the mechanism that enforces
it on this host, or a refusal. No silent downgrade: a clause without a mechanism fails."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from corral.backends.base import BackendInfo
from corral.contract.model import NetworkSpec, Request, ResourcesSpec, UiSpec
from corral.errors import BackendUnavailableError, ErrorCode, PolicyError
from corral.policy import baseline
from corral.policy.environment import build_environment, choose_cwd
from corral.policy.filesystem import Access, FilesystemPolicy, PathEntry, resolve_filesystem
from corral.policy.protected import protected_paths

if TYPE_CHECKING:
    from corral.policy.admin import ClampResult

NetworkMode = Literal["none", "rules", "proxy"]

# Containment intents (MXC names) -> Corral backend on Linux.
LINUX_BACKENDS: dict[str, str] = {
    "process": "process",
    "bubblewrap": "process",  # served by the same engine; documented in docs/backends.md
    "isolation_session": "session",
    "microvm": "microvm",
    "vm": "microvm",
    "lxc": "container",
}
FOREIGN_CONTAINMENTS: dict[str, str] = {
    "processcontainer": "a Windows AppContainer backend",
    "appcontainer": "a Windows AppContainer backend",
    "wslc": "a Windows (WSL) backend",
    "windows_sandbox": "a Windows backend",
    "seatbelt": "a macOS backend",
    "macos_sandbox": "a macOS backend",
    "hyperlight": "a Hyperlight micro-VM runtime whose images cannot be fetched here",
}


@dataclass(frozen=True)
class Clause:
    area: str  # filesystem | network | ui | resources | timeout | isolation | admin
    subject: str
    decision: str
    mechanisms: tuple[str, ...]
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        """For JSON (``dataclasses.asdict`` deep-copies: slow on every launch's audit)."""
        return {"area": self.area, "subject": self.subject, "decision": self.decision,
                "mechanisms": list(self.mechanisms), "note": self.note}  # fmt: skip


@dataclass(frozen=True)
class NetworkPlan:
    mode: NetworkMode
    spec: NetworkSpec
    proxy_url: str | None = None
    corral: dict[str, Any] = field(default_factory=dict)  # the request's `corral.network`


@dataclass(frozen=True)
class Plan:
    backend: str
    containment: str
    command: tuple[str, ...]
    cwd: str
    env: dict[str, str]
    timeout_ms: int
    filesystem: FilesystemPolicy
    network: NetworkPlan
    resources: ResourcesSpec
    ui: UiSpec
    clauses: tuple[Clause, ...]
    warnings: tuple[str, ...]
    mechanisms: dict[str, str]  # what the backend offers on this host
    request: Request

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "containment": self.containment,
            "command": list(self.command),
            "cwd": self.cwd,
            "env": self.env,
            "timeoutMs": self.timeout_ms,
            "filesystem": [asdict(e) for e in self.filesystem.entries],
            "network": {"mode": self.network.mode, "proxy": self.network.proxy_url},
            "resources": asdict(self.resources),
            "ui": asdict(self.ui),
            "clauses": [c.as_dict() for c in self.clauses],
            "warnings": list(self.warnings),
            "mechanisms": self.mechanisms,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def render_table(self) -> str:
        rows = [("AREA", "SUBJECT", "DECISION", "ENFORCED BY")]
        rows += [(c.area, c.subject, c.decision, ", ".join(c.mechanisms)) for c in self.clauses]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"backend: {self.backend} (containment {self.containment})", f"cwd: {self.cwd}"]
        lines += ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def backend_for(request: Request) -> str:
    containment = request.containment or "process"
    if containment in FOREIGN_CONTAINMENTS:
        raise PolicyError(
            f"containment {containment!r} is {FOREIGN_CONTAINMENTS[containment]}; "
            "it cannot run on Linux",
            code=ErrorCode.UNSUPPORTED_CONTAINMENT,
            remediation="use 'process' (or 'bubblewrap'), 'isolation_session' or 'microvm'",
        )
    return LINUX_BACKENDS[containment]


def build_plan(request: Request, info: BackendInfo, admin: ClampResult | None = None) -> Plan:
    """Turn a validated request, already clamped by ``admin``, into the plan ``info``'s
    backend runs."""
    if not info.available:
        raise BackendUnavailableError(
            f"backend {info.name!r} is not available on this host: {info.reason}"
        )
    assert request.process is not None, "one-shot and exec requests carry a process"
    mech = info.mechanisms
    clauses: list[Clause] = []
    fs = _with_protected(resolve_filesystem(request.filesystem, extra=_baseline_entries()), request)
    clauses += _admin_clauses(admin)
    clauses += _filesystem_clauses(fs, mech)
    network = _network_plan(request)
    clauses += _network_clauses(network, mech, request.containment or "process")
    clauses += _ui_clauses(request.ui, mech)
    clauses += _resource_clauses(request.corral.resources, mech)
    clauses += _kvm_clauses(request, mech)
    clauses += _isolation_clauses(mech)
    timeout = request.process.timeout_ms
    if timeout:
        clauses.append(Clause("timeout", f"{timeout} ms", "kill whole tree", ("supervisor",)))
    env = build_environment(
        request.process, proxy_url=request.network_proxy if network.mode == "proxy" else None
    )
    return Plan(
        backend=info.name,
        containment=request.containment or "process",
        command=("/bin/sh", "-c", request.process.command_line),
        cwd=choose_cwd(request.process, fs),
        env=env,
        timeout_ms=timeout,
        filesystem=fs,
        network=network,
        resources=request.corral.resources,
        ui=request.ui,
        clauses=tuple(clauses),
        warnings=fs.warnings,
        mechanisms=dict(mech),
        request=request,
    )


def _baseline_entries() -> list[tuple[str, Access, str]]:
    entries: list[tuple[str, Access, str]] = [(d, "ro", "baseline") for d in baseline.system_dirs()]
    entries += [(p, "ro", "baseline") for p in baseline.etc_entries() if os.path.exists(p)]
    return entries


def _with_protected(fs: FilesystemPolicy, request: Request) -> FilesystemPolicy:
    """Files a host later executes stay read-only even inside read-write grants; a missing
    `.git/hooks` of a repository becomes an empty read-only placeholder the backend creates."""
    rw_roots = [
        e.path for e in fs.entries if e.access == "rw" and e.is_dir and e.origin == "request"
    ]
    spec = request.corral.protected_paths
    found = protected_paths(rw_roots, extra=spec.add, relax=spec.relax)
    if not found:
        return fs
    known = {e.path for e in fs.entries}
    extra = [
        PathEntry(p.path, "ro", p.pattern, p.placeholder == "dir" or os.path.isdir(p.path),
                  "protected-placeholder" if p.placeholder else "protected")
        for p in found
        if p.path not in known and (p.exists or p.placeholder)
    ]  # fmt: skip
    entries = sorted((*fs.entries, *extra), key=lambda e: (e.path.count("/"), e.path))
    return FilesystemPolicy(tuple(entries), fs.warnings)


def _admin_clauses(admin: ClampResult | None) -> list[Clause]:
    if admin is None:
        return []
    note = f"admin policy {admin.source}" + (
        " (from $CORRAL_ADMIN_POLICY, a test override)" if admin.source_from_env else ""
    )
    out = [Clause("admin", "admin policy", "applied", ("admin-policy",), note)]
    out += [Clause("admin", a.clause, a.action, ("admin-policy",), a.detail) for a in admin.applied]
    return out


def _require(mech: dict[str, str], needed: str, what: str) -> tuple[str, ...]:
    if needed not in mech:
        raise BackendUnavailableError(
            f"{what} needs {needed}, which this backend cannot provide on this host",
            details={"mechanism": needed},
            remediation="run `corral backends` to see what this host offers",
        )
    return (needed,)


def _filesystem_clauses(fs: FilesystemPolicy, mech: dict[str, str]) -> list[Clause]:
    base = _require(mech, "mount-namespace", "a filesystem policy")
    landlock = ("landlock",) if "landlock" in mech else ()
    out = [Clause("filesystem", "everything not listed", "invisible", base + landlock)]
    for e in fs.entries:
        if e.origin == "baseline":
            continue
        out.append(_path_clause(e, fs, base, landlock))
    return out


def _path_clause(
    e: PathEntry, fs: FilesystemPolicy, base: tuple[str, ...], landlock: tuple[str, ...]
) -> Clause:
    decision = {"ro": "read-only", "rw": "read-write", "deny": "denied (EACCES)"}[e.access]
    # Landlock only adds rights; it backs a grant, and a denial that lies outside every grant.
    inside_grant = any(
        g.access != "deny" and g.path != e.path and e.path.startswith(g.path.rstrip("/") + "/")
        for g in fs.entries
    )
    mechs = base + (landlock if (e.access != "deny" or not inside_grant) else ())
    note = "" if e.origin == "request" else e.origin
    subject = e.requested if e.origin == "request" else e.path
    return Clause("filesystem", subject, decision, mechs, note)


def _network_plan(request: Request) -> NetworkPlan:
    spec = request.network
    corral_net = dict(request.corral.raw.get("network", {}))
    if request.network_proxy is not None:
        return NetworkPlan("proxy", spec, request.network_proxy, corral_net)
    closed = (
        spec.egress.default == "deny"
        and not spec.egress.allow
        and spec.ingress.default == "deny"
        and spec.ingress.host_loopback == "deny"
        and not corral_net
    )
    return NetworkPlan("none" if closed else "rules", spec, None, corral_net)


def _network_clauses(net: NetworkPlan, mech: dict[str, str], containment: str) -> list[Clause]:
    netns = _require(mech, "network-namespace", "network isolation")
    if net.mode == "none":
        return [Clause("network", "all egress and ingress", "deny", netns, "loopback only")]
    if net.mode == "proxy":
        needs = _require(mech, "proxy-only-network", "runtimeConfig.networkProxy")
        return [Clause("network", f"only via proxy {net.proxy_url}", "allow", netns + needs)]
    rules = _require(mech, "nftables", "network rules")
    out: list[Clause] = []
    eg = net.spec.egress
    out.append(Clause("network", "egress default", eg.default, netns + rules))
    for verdict, items in (("deny", eg.deny), ("allow", eg.allow)):
        for rule in items:
            out.append(Clause("network", f"egress {_describe_rule(rule)}", verdict, netns + rules))
    ing = net.spec.ingress
    published = net.corral.get("publish") or []
    if ing.default == "allow" and not published and containment != "isolation_session":
        # The sandbox sits behind user-mode NAT: inbound traffic reaches it only through
        # published ports, so "allow" without any would promise what nothing delivers.
        raise PolicyError(
            "network.ingress.default 'allow' needs the ports to publish",
            details={"path": "network.ingress.default"},
            remediation='name them in corral.network.publish: [{"hostPort": 8080, '
            '"sandboxPort": 8080}], or use ingress.default "deny"',
        )
    note = "" if published else "nothing published: no inbound connection can reach it"
    out.append(Clause("network", "ingress default", ing.default, netns + rules, note))
    loop_note = (
        "sandbox to host loopback; host to sandbox only through corral.network.publish"
        if ing.host_loopback == "allow"
        else ""
    )
    out.append(Clause("network", "host loopback", ing.host_loopback, netns + rules, loop_note))
    for port in published:
        out.append(
            Clause("network", f"publish host 127.0.0.1:{port.get('hostPort')} -> sandbox "
                   f"{port.get('sandboxPort')}/{port.get('protocol', 'tcp')}", "allow",
                   netns + _require(mech, "user-mode-networking", "published ports"))
        )  # fmt: skip
    if net.corral.get("hosts"):
        proxy = _require(mech, "policy-proxy", "hostname rules (corral.network.hosts)")
        out.append(Clause("network", "hostname and HTTP rules", "per rule", netns + proxy))
    return out


def _describe_rule(rule: Any) -> str:
    to = ",".join(p.cidr for p in rule.to) if rule.to else "any"
    ports = (
        ",".join(
            f"{p.protocol}/{p.port or '*'}{'-' + str(p.end_port) if p.end_port else ''}"
            for p in rule.ports
        )
        if rule.ports
        else "any"
    )
    return f"to {to} ports {ports}"


def _ui_clauses(ui: UiSpec, mech: dict[str, str]) -> list[Clause]:
    hide = _require(mech, "mount-namespace", "ui.disable") + _require(
        mech, "network-namespace", "ui.disable"
    )
    out: list[Clause] = []
    if ui.disable:
        out.append(Clause("ui", "display", "none", hide, "no X11/Wayland sockets, env scrubbed"))
    else:
        out.append(Clause("ui", "display", "private", _require(mech, "private-display", "ui")))
    if ui.clipboard != "none":
        broker = _require(mech, "clipboard-broker", f"ui.clipboard={ui.clipboard}")
        out.append(Clause("ui", "clipboard", ui.clipboard, broker))
    else:
        out.append(Clause("ui", "clipboard", "none", hide))
    if ui.injection:
        raise PolicyError(
            "ui.injection=true (synthetic input) is not offered on Linux",
            remediation="leave ui.injection false",
        )
    inj = ("seccomp",) if "seccomp" in mech else ()
    out.append(Clause("ui", "input injection", "deny", hide + inj, "TIOCSTI/TIOCLINUX blocked"))
    return out


# Each limit, and the mechanisms that can enforce it (the first one the backend has wins).
_RESOURCE_MECHANISMS = {
    "memory": ("cgroup-memory", "guest-memory"),
    "pids": ("cgroup-pids",),
    "cpu": ("cgroup-cpu", "guest-cpus"),
}


def _resource_clauses(res: ResourcesSpec, mech: dict[str, str]) -> list[Clause]:
    out: list[Clause] = []
    for name, value in (
        ("memory", res.memory_mb and f"{res.memory_mb} MiB"),
        ("pids", res.pids),
        ("cpu", res.cpu_percent and f"{res.cpu_percent}%"),
    ):
        if not value:
            continue
        options = _RESOURCE_MECHANISMS[name]
        found = next((m for m in options if m in mech), None)
        if found is None:
            _require(mech, options[0], f"corral.resources ({name} limit)")
        out.append(Clause("resources", name, f"limit {value}", (str(found),)))
    return out


def _kvm_clauses(request: Request, mech: dict[str, str]) -> list[Clause]:
    if not request.corral.require_kvm:
        return []
    hypervisor = mech.get("hypervisor", "")
    if "kvm" not in hypervisor.lower() or "tcg" in hypervisor.lower():
        raise BackendUnavailableError(
            "corral.requireKvm is set but this backend has no usable KVM here"
            + (f" ({hypervisor})" if hypervisor else " (it is not a micro-VM)"),
            details={"mechanism": "kvm"},
            remediation="run on a host with hardware virtualisation, or drop requireKvm",
        )
    return [Clause("isolation", "hardware virtualisation", "required", ("hypervisor",))]


def _isolation_clauses(mech: dict[str, str]) -> list[Clause]:
    out: list[Clause] = []
    for name, what in (
        ("pid-namespace", "host processes invisible"),
        ("agent-identity", "workload runs under its own ephemeral uid"),
        ("session-keyring", "own login session and kernel session keyring"),
        ("seccomp", "escape syscalls blocked (EPERM)"),
        ("capabilities", "all capabilities dropped, no_new_privs"),
        ("hypervisor", "guest kernel behind a hypervisor"),
    ):
        if name in mech:
            out.append(Clause("isolation", what, "enforced", (name,), mech[name]))
    return out
