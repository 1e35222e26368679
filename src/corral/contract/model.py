"""Typed, validated request model: what the contract layer hands to policy and plan.

Plain frozen dataclasses with Python names; the wire (camelCase JSON) lives only in
``corral.contract.parse``. Everything here has already passed validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Version = Literal["0.9.0-alpha", "1.0.0", "1.1.0-alpha"]
SUPPORTED_VERSIONS: tuple[Version, ...] = ("0.9.0-alpha", "1.0.0", "1.1.0-alpha")
DEFAULT_VERSION: Version = "1.0.0"

Phase = Literal["provision", "start", "exec", "stop", "deprovision"]
Action = Literal["allow", "deny"]
Protocol = Literal["tcp", "udp", "icmp", "any"]
Clipboard = Literal["none", "read", "write", "all"]


@dataclass(frozen=True)
class ProcessSpec:
    command_line: str
    cwd: str | None = None
    env: tuple[str, ...] | None = None  # None: backend default; () is "empty, verbatim"
    inherit_default_env: bool = False
    timeout_ms: int = 0  # 0 = no timeout


@dataclass(frozen=True)
class FilesystemSpec:
    readonly_paths: tuple[str, ...] = ()
    readwrite_paths: tuple[str, ...] = ()
    denied_paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class PortSpec:
    protocol: Protocol = "any"
    port: int | None = None  # None: every port
    end_port: int | None = None  # inclusive


@dataclass(frozen=True)
class PeerSpec:
    cidr: str
    except_cidrs: tuple[str, ...] = ()


@dataclass(frozen=True)
class NetworkRule:
    to: tuple[PeerSpec, ...] | None = None  # None: every destination, both families
    ports: tuple[PortSpec, ...] | None = None  # None: every protocol and port


@dataclass(frozen=True)
class EgressSpec:
    default: Action = "deny"
    allow: tuple[NetworkRule, ...] = ()
    deny: tuple[NetworkRule, ...] = ()


@dataclass(frozen=True)
class IngressSpec:
    default: Action = "deny"
    host_loopback: Action = "deny"


@dataclass(frozen=True)
class NetworkSpec:
    """Directional network policy. The default instance is MXC's 'omitted network': deny all."""

    egress: EgressSpec = field(default_factory=EgressSpec)
    ingress: IngressSpec = field(default_factory=IngressSpec)


@dataclass(frozen=True)
class UiSpec:
    disable: bool = True
    clipboard: Clipboard = "none"
    injection: bool = False


@dataclass(frozen=True)
class ResourcesSpec:
    memory_mb: int | None = None
    pids: int | None = None
    cpu_percent: int | None = None  # of one CPU; 200 = two CPUs


@dataclass(frozen=True)
class PublishSpec:
    """A sandbox port reachable from the host (``corral.network.publish``)."""

    host_port: int
    sandbox_port: int
    protocol: Literal["tcp", "udp"] = "tcp"


@dataclass(frozen=True)
class HostRule:
    """An HTTP(S) destination by name, enforced by the proxy (``corral.network.hosts``)."""

    host: str  # lower-case exact DNS name, or "*.suffix" for every subdomain of suffix
    ports: tuple[int, ...] = (80, 443)
    methods: tuple[str, ...] | None = None  # None: every method
    paths: tuple[str, ...] | None = None  # None: every path; else path prefixes


@dataclass(frozen=True)
class HostRulesSpec:
    allow: tuple[HostRule, ...] = ()
    deny: tuple[HostRule, ...] = ()


@dataclass(frozen=True)
class CorralNetworkSpec:
    publish: tuple[PublishSpec, ...] = ()
    hosts: HostRulesSpec = field(default_factory=HostRulesSpec)
    hosts_given: bool = False  # was `corral.network.hosts` present on the wire
    tls_interception: bool = False


@dataclass(frozen=True)
class ActorSpec:
    """Who asked: recorded in the audit trail."""

    kind: Literal["agent", "human"]
    name: str | None = None
    session: str | None = None


@dataclass(frozen=True)
class ProtectedPathsSpec:
    add: tuple[str, ...] = ()  # extra paths never granted, whatever the request says
    relax: tuple[str, ...] = ()  # built-in protected paths this request may use


@dataclass(frozen=True)
class CorralSection:
    """Corral's own extensions (top-level ``corral`` key). Other layers add typed fields here;
    ``raw`` keeps the validated JSON for sections a layer reads itself."""

    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    network: CorralNetworkSpec = field(default_factory=CorralNetworkSpec)
    actor: ActorSpec | None = None
    protected_paths: ProtectedPathsSpec = field(default_factory=ProtectedPathsSpec)
    require_kvm: bool = False
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    """A validated request: one-shot when ``phase`` is None, else a state-aware phase."""

    version: Version
    phase: Phase | None = None
    containment: str | None = None
    sandbox_id: str | None = None
    container_id: str | None = None
    process: ProcessSpec | None = None
    filesystem: FilesystemSpec = field(default_factory=FilesystemSpec)
    network: NetworkSpec = field(default_factory=NetworkSpec)
    network_given: bool = False  # was `network` present on the wire
    network_proxy: str | None = None  # runtimeConfig.networkProxy
    ui: UiSpec = field(default_factory=UiSpec)
    corral: CorralSection = field(default_factory=CorralSection)
    raw: dict[str, Any] = field(default_factory=dict)  # the request as received (validated)

    @property
    def is_one_shot(self) -> bool:
        return self.phase is None
