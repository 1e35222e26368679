"""The machine-wide admin policy: limits no request can loosen.

A root-owned JSON file (``/etc/corral/admin.json``) clamps every request before planning:
paths never granted, paths always denied, destinations never allowed, maximum timeout and
resources, allowed containments, learning mode, mandatory audit and protected files. A request
asking for more is refused, or narrowed where the admin says ``"onViolation": "narrow"``, and
every clause that applied is reported for the plan and the audit trail.

``CORRAL_ADMIN_POLICY`` names another file, for tests only: it is honoured only while no system
file exists (so it cannot switch an installed policy off) and the result says it was used.
"""

from __future__ import annotations

import ipaddress
import json
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NoReturn, cast

from corral.contract.model import (
    FilesystemSpec,
    NetworkRule,
    NetworkSpec,
    PeerSpec,
    ProcessSpec,
    Request,
    ResourcesSpec,
)
from corral.errors import ErrorCode, PolicyError

SYSTEM_PATH = "/etc/corral/admin.json"
ENV_PATH = "CORRAL_ADMIN_POLICY"
KNOWN_CONTAINMENTS = frozenset(
    {
        "process",
        "processcontainer",
        "appcontainer",
        "lxc",
        "bubblewrap",
        "seatbelt",
        "macos_sandbox",
        "isolation_session",
        "wslc",
        "vm",
        "microvm",
        "hyperlight",
        "windows_sandbox",
    }
)
_RESOURCE_FIELDS = {"memoryMb": "memory_mb", "pids": "pids", "cpuPercent": "cpu_percent"}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
ClampAction = Literal["refused", "narrowed", "added"]
LearningMode = Literal["allow", "deny"]
OnViolation = Literal["refuse", "narrow"]


@dataclass(frozen=True)
class AppliedClause:
    """One admin clause that changed (or refused) a request: for the plan and the audit."""

    clause: str  # the admin policy's field name, e.g. "neverGrantPaths"
    action: ClampAction
    detail: str


@dataclass(frozen=True)
class ClampResult:
    request: Request  # the request as it will be planned
    applied: list[AppliedClause]
    source: str  # the admin file that applied
    source_from_env: bool  # it came from $CORRAL_ADMIN_POLICY (tests only)


@dataclass(frozen=True)
class AdminPolicy:
    source: str
    source_from_env: bool = False
    never_grant_paths: tuple[str, ...] = ()
    always_deny_paths: tuple[str, ...] = ()
    never_allow_cidrs: tuple[Network, ...] = ()
    max_timeout_ms: int | None = None
    max_resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    allowed_containments: tuple[str, ...] | None = None  # None: every containment
    learning_mode: LearningMode = "allow"
    mandatory_audit: bool = False
    protected_paths: tuple[str, ...] = ()
    allow_relax_protected_paths: bool = False
    on_violation: OnViolation = "refuse"

    # --- loading -------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | None = None) -> AdminPolicy | None:
        """The admin policy in force: ``path`` if given, else the system file, else (only when
        there is no system file) ``$CORRAL_ADMIN_POLICY``. None when there is none."""
        from_env = False
        if path is None:
            env_path = os.environ.get(ENV_PATH)
            if os.path.lexists(SYSTEM_PATH) or not env_path:
                path = SYSTEM_PATH
                if not os.path.lexists(path):
                    return None
            else:
                path, from_env = env_path, True
        data = _read_policy_file(path, trusted_location_required=not from_env)
        return cls.from_dict(data, source=path, source_from_env=from_env)

    @classmethod
    def from_dict(
        cls, data: Any, *, source: str = "<admin policy>", source_from_env: bool = False
    ) -> AdminPolicy:
        """Strictly parse a policy document: unknown fields and wrong types are refused."""
        reader = _Reader(source)
        doc = reader.obj(data, "")
        reader.only(doc, "", _FIELDS)
        if doc.get("version") != 1:
            reader.fail("version", 'must be 1 (write "version": 1)')
        resources = reader.obj(doc.get("maxResources", {}), "maxResources")
        reader.only(resources, "maxResources", set(_RESOURCE_FIELDS))
        return cls(
            source=source,
            source_from_env=source_from_env,
            never_grant_paths=reader.paths(doc, "neverGrantPaths"),
            always_deny_paths=reader.paths(doc, "alwaysDenyPaths"),
            never_allow_cidrs=reader.cidrs(doc, "neverAllowCidrs"),
            max_timeout_ms=reader.positive(doc, "maxTimeoutMs", "maxTimeoutMs"),
            max_resources=ResourcesSpec(
                **{
                    attr: reader.positive(resources, key, f"maxResources.{key}")
                    for key, attr in _RESOURCE_FIELDS.items()
                }
            ),
            allowed_containments=reader.containments(doc),
            learning_mode=cast(
                LearningMode, reader.choice(doc, "learningMode", ("allow", "deny"), "allow")
            ),
            mandatory_audit=reader.boolean(doc, "mandatoryAudit"),
            protected_paths=reader.strings(doc, "protectedPaths"),
            allow_relax_protected_paths=reader.boolean(doc, "allowRelaxProtectedPaths"),
            on_violation=cast(
                OnViolation, reader.choice(doc, "onViolation", ("refuse", "narrow"), "refuse")
            ),
        )

    # --- checks the caller makes outside ``clamp`` ---------------------------------------

    def check_learning(self) -> None:
        """Refuse learning mode when the admin forbids it."""
        if self.learning_mode == "deny":
            raise self._refusal("learningMode", "learning mode is forbidden on this machine")

    def check_audit(self, enabled: bool) -> None:
        """Refuse to run with audit off when the admin makes it mandatory."""
        if self.mandatory_audit and not enabled:
            raise self._refusal("mandatoryAudit", "the audit trail cannot be turned off")

    def never_granted(self, path: str) -> str | None:
        """The ``neverGrantPaths`` entry that forbids granting ``path`` (at, under or above
        it), or None. For grants the plan adds itself (baseline, helpers)."""
        real = os.path.realpath(path)
        for forbidden in self.never_grant_paths:
            target = os.path.realpath(forbidden)
            if _inside(real, target) or _views_within(target, real):
                return forbidden
        return None

    # --- the clamp -----------------------------------------------------------------------

    def clamp(self, request: Request) -> ClampResult:
        """The request narrowed to this policy; raises PolicyError on a refusal."""
        applied: list[AppliedClause] = []
        self._check_containment(request)
        request = self._clamp_filesystem(request, applied)
        request = self._clamp_network(request, applied)
        request = self._clamp_timeout(request, applied)
        request = self._clamp_resources(request, applied)
        request = self._clamp_protected(request, applied)
        return ClampResult(request, applied, self.source, self.source_from_env)

    def _check_containment(self, request: Request) -> None:
        if self.allowed_containments is None or request.phase not in (None, "provision"):
            return
        containment = request.containment or "process"
        if containment not in self.allowed_containments:
            raise self._refusal(
                "allowedContainments",
                f"containment {containment!r} is not allowed; the admin allows "
                f"{', '.join(self.allowed_containments) or 'none'}",
            )

    def _clamp_filesystem(self, request: Request, applied: list[AppliedClause]) -> Request:
        fs = request.filesystem
        grants = {"ro": list(fs.readonly_paths), "rw": list(fs.readwrite_paths)}
        denied = list(fs.denied_paths)
        denied_real = [os.path.realpath(p) for p in denied]

        def deny(path: str) -> None:
            if path not in denied:
                denied.append(path)
                denied_real.append(os.path.realpath(path))

        for forbidden in self.never_grant_paths:
            target = os.path.realpath(forbidden)
            for access, paths in grants.items():
                for raw in list(paths):
                    real = os.path.realpath(raw)
                    if _inside(real, target):
                        what = f"{access} grant of {raw} lies at or under {forbidden}"
                        self._narrow("neverGrantPaths", what, "grant dropped", applied)
                        paths.remove(raw)
                        continue
                    for view in _views_within(target, real):
                        if any(_inside(view, d) and _inside(d, real) for d in denied_real):
                            continue  # the request already denies it inside this grant
                        what = f"{access} grant of {raw} would expose {forbidden}"
                        self._narrow("neverGrantPaths", what, f"{view} denied", applied)
                        deny(view)
        for always in self.always_deny_paths:
            views = {always}
            for raw in (*grants["ro"], *grants["rw"]):
                # An alias (bind mount) of an ancestor inside a grant reaches it by another name.
                views.update(_views_within(os.path.realpath(always), os.path.realpath(raw)))
            for view in sorted(views):
                if view not in denied and os.path.realpath(view) not in denied_real:
                    applied.append(AppliedClause("alwaysDenyPaths", "added", f"{view} denied"))
                    deny(view)
        new_fs = FilesystemSpec(tuple(grants["ro"]), tuple(grants["rw"]), tuple(denied))
        return request if new_fs == fs else replace(request, filesystem=new_fs)

    def _clamp_network(self, request: Request, applied: list[AppliedClause]) -> Request:
        egress = request.network.egress
        added: list[NetworkRule] = []
        for cidr, origin in _with_mapped(self.never_allow_cidrs):
            exposure = _egress_exposure(egress.default, egress.allow, cidr)
            deny = (*egress.deny, *added)
            if exposure is None or _denied_by(deny, cidr) or _denied_by(deny, origin):
                continue
            what = f"egress {exposure} reaches {cidr}"
            self._narrow("neverAllowCidrs", what, "denied", applied)
            added.append(NetworkRule(to=(PeerSpec(str(cidr)),)))
        if not added:
            return request
        new_egress = replace(egress, deny=(*egress.deny, *added))
        network = NetworkSpec(egress=new_egress, ingress=request.network.ingress)
        return replace(request, network=network)

    def _clamp_timeout(self, request: Request, applied: list[AppliedClause]) -> Request:
        process, limit = request.process, self.max_timeout_ms
        if process is None or limit is None or 0 < process.timeout_ms <= limit:
            return request
        if process.timeout_ms == 0:
            applied.append(AppliedClause("maxTimeoutMs", "added", f"timeout set to {limit} ms"))
        else:
            what = f"timeout {process.timeout_ms} ms exceeds {limit} ms"
            self._narrow("maxTimeoutMs", what, f"set to {limit} ms", applied)
        new_process: ProcessSpec = replace(process, timeout_ms=limit)
        return replace(request, process=new_process)

    def _clamp_resources(self, request: Request, applied: list[AppliedClause]) -> Request:
        if request.phase not in (None, "provision"):
            return request  # resources are fixed when the sandbox is provisioned
        asked = request.corral.resources
        values: dict[str, int | None] = {}
        for key, attr in _RESOURCE_FIELDS.items():
            limit, value = getattr(self.max_resources, attr), getattr(asked, attr)
            values[attr] = value
            if limit is None or (value is not None and value <= limit):
                continue
            clause = f"maxResources.{key}"
            if value is None:
                applied.append(AppliedClause(clause, "added", f"{key} set to {limit}"))
            else:
                self._narrow(clause, f"{key} {value} exceeds {limit}", f"set to {limit}", applied)
            values[attr] = limit
        resources = ResourcesSpec(**values)
        if resources == asked:
            return request
        return replace(request, corral=replace(request.corral, resources=resources))

    def _clamp_protected(self, request: Request, applied: list[AppliedClause]) -> Request:
        spec = request.corral.protected_paths
        relax = spec.relax
        if relax and not self.allow_relax_protected_paths:
            what = "the request relaxes protected paths " + ", ".join(relax)
            self._narrow("allowRelaxProtectedPaths", what, "ignored", applied)
            relax = ()
        add = (*spec.add, *(p for p in self.protected_paths if p not in spec.add))
        if self.protected_paths:
            applied.append(
                AppliedClause("protectedPaths", "added", ", ".join(self.protected_paths))
            )
        new_spec = replace(spec, add=add, relax=relax)
        if new_spec == spec:
            return request
        return replace(request, corral=replace(request.corral, protected_paths=new_spec))

    # --- refusals ------------------------------------------------------------------------

    def _narrow(self, clause: str, what: str, outcome: str, applied: list[AppliedClause]) -> None:
        """Refuse (the default), or record the narrowing the caller then makes."""
        if self.on_violation == "refuse":
            raise self._refusal(clause, what)
        applied.append(AppliedClause(clause, "narrowed", f"{what}: {outcome}"))

    def _refusal(self, clause: str, what: str) -> PolicyError:
        return PolicyError(
            f"admin policy {self.source} refuses this request ({clause}): {what}",
            details={"clause": clause, "adminPolicy": self.source},
            remediation="ask for less, or ask the machine's administrator to change the policy",
        )


_FIELDS = {
    "version",
    "neverGrantPaths",
    "alwaysDenyPaths",
    "neverAllowCidrs",
    "maxTimeoutMs",
    "maxResources",
    "allowedContainments",
    "learningMode",
    "mandatoryAudit",
    "protectedPaths",
    "allowRelaxProtectedPaths",
    "onViolation",
    "$schema",
    "_comment",
}


# --- file trust ----------------------------------------------------------------------------


def _read_policy_file(path: str, *, trusted_location_required: bool) -> Any:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise PolicyError(
            f"cannot read the admin policy {path}: {exc.strerror}",
            details={"adminPolicy": path},
            remediation=f"create it (root-owned, mode 0644) or unset {ENV_PATH}",
        ) from exc
    with os.fdopen(fd, "rb") as f:
        if trusted_location_required:
            _check_trusted(path, os.fstat(fd))
        raw = f.read()
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise PolicyError(
            f"the admin policy {path} is not valid JSON: {exc}", details={"adminPolicy": path}
        ) from exc


def _check_trusted(path: str, st: os.stat_result) -> None:
    """Only root may be able to write the file or replace it through any parent directory."""
    problems = []
    if not stat.S_ISREG(st.st_mode):
        problems.append("it is not a regular file")
    if st.st_uid != 0:
        problems.append(f"it is owned by uid {st.st_uid}, not root")
    if st.st_mode & 0o022:
        problems.append("it is group- or world-writable")
    directory = os.path.dirname(os.path.realpath(path))
    while True:
        dst = os.stat(directory)
        sticky = bool(dst.st_mode & stat.S_ISVTX)
        if dst.st_uid != 0 or (dst.st_mode & 0o022 and not sticky):
            problems.append(f"its directory {directory} is writable by a user other than root")
        if directory == "/":
            break
        directory = os.path.dirname(directory)
    if problems:
        raise PolicyError(
            f"refusing the admin policy {path}: " + "; ".join(problems),
            details={"adminPolicy": path},
            remediation=f"chown root:root and chmod 0644 {path}, in root-only directories",
        )


# --- strict parsing ------------------------------------------------------------------------


class _Reader:
    """Typed field access that names the offending field in every error."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, name: str, problem: str) -> NoReturn:
        raise PolicyError(
            f"admin policy {self.source}: {name or 'the document'} {problem}",
            code=ErrorCode.POLICY_VALIDATION,
            details={"adminPolicy": self.source, "field": name},
        )

    def obj(self, value: Any, name: str) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            self.fail(name, "must be a JSON object")
        return value

    def only(self, value: Mapping[str, Any], name: str, allowed: set[str]) -> None:
        for key in value:
            if key not in allowed:
                where = f"{name}.{key}" if name else key
                self.fail(where, f"is not a known field; known: {', '.join(sorted(allowed))}")

    def strings(self, doc: Mapping[str, Any], key: str) -> tuple[str, ...]:
        value = doc.get(key, [])
        if not isinstance(value, list):
            self.fail(key, "must be a list of strings")
        for index, item in enumerate(value):
            if not isinstance(item, str) or not item or "\x00" in item:
                self.fail(f"{key}[{index}]", "must be a non-empty string")
        return tuple(value)

    def paths(self, doc: Mapping[str, Any], key: str) -> tuple[str, ...]:
        paths = self.strings(doc, key)
        for index, item in enumerate(paths):
            if not os.path.isabs(item):
                self.fail(f"{key}[{index}]", f"must be an absolute path, not {item!r}")
        return tuple(os.path.normpath(p) for p in paths)

    def cidrs(self, doc: Mapping[str, Any], key: str) -> tuple[Network, ...]:
        out = []
        for index, item in enumerate(self.strings(doc, key)):
            try:
                out.append(ipaddress.ip_network(item, strict=True))
            except ValueError as exc:
                self.fail(f"{key}[{index}]", f"is not a CIDR with zero host bits: {exc}")
        return tuple(out)

    def positive(self, doc: Mapping[str, Any], key: str, name: str) -> int | None:
        value = doc.get(key)
        if value is not None and (type(value) is not int or value <= 0):
            self.fail(name, "must be a positive integer")
        return value

    def boolean(self, doc: Mapping[str, Any], key: str) -> bool:
        value = doc.get(key, False)
        if not isinstance(value, bool):
            self.fail(key, "must be true or false")
        return value

    def choice(self, doc: Mapping[str, Any], key: str, options: Sequence[str], default: str) -> str:
        value = doc.get(key, default)
        if value not in options:
            self.fail(key, f"must be one of {', '.join(repr(o) for o in options)}")
        return str(value)

    def containments(self, doc: Mapping[str, Any]) -> tuple[str, ...] | None:
        if "allowedContainments" not in doc:
            return None
        names = self.strings(doc, "allowedContainments")
        for index, name in enumerate(names):
            if name not in KNOWN_CONTAINMENTS:
                self.fail(f"allowedContainments[{index}]", f"names no containment: {name!r}")
        return names


# --- paths ---------------------------------------------------------------------------------


def _inside(path: str, root: str) -> bool:
    """``path`` is ``root`` or lies under it: by name, or because an ancestor of ``path`` is
    the very directory ``root`` names (a bind mount or hard-linked alias of it)."""
    if path == root or root == "/" or path.startswith(root.rstrip("/") + "/"):
        return True
    root_id = _identity(root)
    return root_id is not None and any(_identity(a) == root_id for a in _ancestors(path))


def _views_within(target: str, grant: str) -> list[str]:
    """The paths through which ``target`` is reachable inside ``grant`` when ``grant`` lies
    strictly above it, by name or through an alias of one of its ancestors."""
    if target != grant and target.startswith(grant.rstrip("/") + "/"):
        return [target]
    grant_id = _identity(grant)
    if grant_id is None:
        return []
    for ancestor in _ancestors(target)[1:]:
        if _identity(ancestor) == grant_id:
            return [os.path.join(grant, os.path.relpath(target, ancestor))]
    return []


def _ancestors(path: str) -> list[str]:
    """``path`` and every parent up to ``/``."""
    out = [path]
    while path != "/":
        path = os.path.dirname(path)
        out.append(path)
    return out


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


# --- networks ------------------------------------------------------------------------------


def _with_mapped(cidrs: Sequence[Network]) -> list[tuple[Network, Network]]:
    """(range, admin CIDR) pairs: each CIDR, and each IPv4 one also as its IPv4-mapped IPv6
    range (``::ffff:a.b.c.d/96+n``), which reaches the same hosts from an IPv6 socket. Traffic
    to a mapped address leaves as IPv4, so denying the IPv4 CIDR covers both."""
    out: list[tuple[Network, Network]] = [(c, c) for c in cidrs]
    for cidr in cidrs:
        if isinstance(cidr, ipaddress.IPv4Network):
            mapped = ipaddress.IPv6Network(
                (int(cidr.network_address) | 0xFFFF << 32, 96 + cidr.prefixlen)
            )
            out.append((mapped, cidr))
    return out


def _egress_exposure(default: str, allow: Sequence[NetworkRule], cidr: Network) -> str | None:
    """How the egress policy would let traffic reach ``cidr`` (before deny rules), if at all."""
    if default == "allow":
        return "default allow"
    for index, rule in enumerate(allow):
        if rule.to is None:
            return f"allow[{index}] (every destination)"
        for peer in rule.to:
            if _peer_reaches(peer, cidr):
                return f"allow[{index}] to {peer.cidr}"
    return None


def _peer_reaches(peer: PeerSpec, cidr: Network) -> bool:
    net = ipaddress.ip_network(peer.cidr, strict=False)
    if net.version != cidr.version or not net.overlaps(cidr):
        return False
    overlap = cidr if _subnet(cidr, net) else net
    return not any(_subnet(overlap, _net(e)) for e in peer.except_cidrs)


def _denied_by(deny: Sequence[NetworkRule], cidr: Network) -> bool:
    """A deny rule (every port) already covers all of ``cidr``."""
    for rule in deny:
        if rule.ports is not None:
            continue
        if rule.to is None:
            return True
        for peer in rule.to:
            if _subnet(cidr, _net(peer.cidr)) and not any(
                _net(e).overlaps(cidr) for e in peer.except_cidrs
            ):
                return True
    return False


def _net(text: str) -> Network:
    return ipaddress.ip_network(text, strict=False)


def _subnet(inner: Network, outer: Network) -> bool:
    if isinstance(inner, ipaddress.IPv4Network) and isinstance(outer, ipaddress.IPv4Network):
        return inner.subnet_of(outer)
    if isinstance(inner, ipaddress.IPv6Network) and isinstance(outer, ipaddress.IPv6Network):
        return inner.subnet_of(outer)
    return False
