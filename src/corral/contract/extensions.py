"""Corral's own top-level ``corral`` section: its wire shape and its typed model.

Strict like MXC's sections (unknown fields and null rejected). Absent, the request is
pure MXC.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from corral.contract.model import (
    ActorSpec,
    CorralNetworkSpec,
    CorralSection,
    HostRule,
    HostRulesSpec,
    ProtectedPathsSpec,
    PublishSpec,
    ResourcesSpec,
)
from corral.contract.shapes import BOOL, STR, U16_NONZERO, Arr, Enum, Int, Str, obj

# An exact DNS name, or `*.` + one: letters, digits and inner hyphens per label, 63 per
# label, the last label not all digits (so an IP address is never taken for a name).
HOST_PATTERN = (
    r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"(?=[A-Za-z0-9-]*[A-Za-z])[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?$"
)
MAX_HOST_LENGTH = 253
DEFAULT_HOST_PORTS = (80, 443)

_HOST_RULE = obj(
    {
        "host": Str(
            pattern=HOST_PATTERN,
            hint="an exact DNS name such as api.example.com, or *.example.com for its subdomains",
        ),
        "ports": Arr(U16_NONZERO, non_empty=True),
        "methods": Arr(
            Str(pattern=r"^[A-Z][A-Z-]*$", hint="an uppercase HTTP method such as GET"),
            non_empty=True,
        ),
        "paths": Arr(
            Str(pattern=r"^/", hint="a URL path prefix starting with '/'"), non_empty=True
        ),
    },
    "host",
    name="HostRule",
)
_CORRAL_NETWORK = obj(
    {
        "publish": Arr(
            obj(
                {
                    "hostPort": U16_NONZERO,
                    "sandboxPort": U16_NONZERO,
                    "protocol": Enum(("tcp", "udp")),
                },
                "hostPort",
                "sandboxPort",
            )
        ),
        "hosts": obj({"allow": Arr(_HOST_RULE), "deny": Arr(_HOST_RULE)}),
        "tlsInterception": BOOL,
    },
    name="CorralNetwork",
)
_ABSOLUTE_PATH = Str(pattern=r"^/[^\x00]*$", hint="an absolute path without NUL characters")
CORRAL_SHAPE = obj(
    {
        "resources": obj(
            {"memoryMb": Int(4, 2**52), "pids": Int(1, 2**22), "cpuPercent": Int(1, 10000)}
        ),
        "network": _CORRAL_NETWORK,
        "actor": obj({"kind": Enum(("agent", "human")), "name": STR, "session": STR}, "kind"),
        "protectedPaths": obj({"add": Arr(_ABSOLUTE_PATH), "relax": Arr(_ABSOLUTE_PATH)}),
        "requireKvm": BOOL,
    },
    name="Corral",
)
# An exec request may only adjust the running sandbox's network.
CORRAL_EXEC_SHAPE = obj({"network": _CORRAL_NETWORK}, name="CorralExec")


def corral_problems(section: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """Rules the shape cannot say: (rule, path relative to ``corral``, message)."""
    problems: list[tuple[str, str, str]] = []
    network = section.get("network", {})
    seen: dict[tuple[int, str], int] = {}
    for index, entry in enumerate(network.get("publish", ())):
        key = (entry["hostPort"], entry.get("protocol", "tcp"))
        if key in seen:
            problems.append(
                (
                    "publish_duplicate",
                    f"network.publish[{index}].hostPort",
                    f"host port {key[0]}/{key[1]} is already published by "
                    f"network.publish[{seen[key]}]; publish each host port once",
                )
            )
        seen.setdefault(key, index)
    for action in ("allow", "deny"):
        for index, rule in enumerate(network.get("hosts", {}).get(action, ())):
            if len(rule["host"]) > MAX_HOST_LENGTH:
                problems.append(
                    (
                        "host_length",
                        f"network.hosts.{action}[{index}].host",
                        f"a DNS name has at most {MAX_HOST_LENGTH} characters; shorten it",
                    )
                )
    return problems


def build_corral_section(section: Mapping[str, Any]) -> CorralSection:
    resources = section.get("resources", {})
    network = section.get("network", {})
    hosts = network.get("hosts", {})
    actor = section.get("actor")
    protected = section.get("protectedPaths", {})
    return CorralSection(
        resources=ResourcesSpec(
            memory_mb=resources.get("memoryMb"),
            pids=resources.get("pids"),
            cpu_percent=resources.get("cpuPercent"),
        ),
        network=CorralNetworkSpec(
            publish=tuple(
                PublishSpec(
                    host_port=p["hostPort"],
                    sandbox_port=p["sandboxPort"],
                    protocol=p.get("protocol", "tcp"),
                )
                for p in network.get("publish", ())
            ),
            hosts=HostRulesSpec(
                allow=tuple(_host_rule(r) for r in hosts.get("allow", ())),
                deny=tuple(_host_rule(r) for r in hosts.get("deny", ())),
            ),
            hosts_given="hosts" in network,
            tls_interception=network.get("tlsInterception", False),
        ),
        actor=None
        if actor is None
        else ActorSpec(kind=actor["kind"], name=actor.get("name"), session=actor.get("session")),
        protected_paths=ProtectedPathsSpec(
            add=tuple(protected.get("add", ())), relax=tuple(protected.get("relax", ()))
        ),
        require_kvm=section.get("requireKvm", False),
        raw=dict(section),
    )


def _host_rule(rule: Mapping[str, Any]) -> HostRule:
    methods = rule.get("methods")
    paths = rule.get("paths")
    return HostRule(
        host=cast(str, rule["host"]).lower().rstrip("."),
        ports=tuple(rule.get("ports", DEFAULT_HOST_PORTS)),
        methods=None if methods is None else tuple(methods),
        paths=None if paths is None else tuple(paths),
    )
