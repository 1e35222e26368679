"""MXC's request shapes for each registered version, plus where Corral's section may appear.

Transcribed from MXC's generated ``wire.d.ts`` (0.9.0-alpha, 1.0.0, 1.1.0-alpha) and checked
against the reference executor (tests/conformance). Integer widths follow MXC's Rust types
(u16 ports are non-zero, timeouts u32, WSLC memory u64).
"""

from __future__ import annotations

from functools import cache

from corral.contract.extensions import CORRAL_EXEC_SHAPE, CORRAL_SHAPE
from corral.contract.shapes import (
    ACTION,
    BOOL,
    STR,
    STR_LIST,
    U16_NONZERO,
    U32,
    U64,
    AnyJson,
    Arr,
    Enum,
    Obj,
    Shape,
    Str,
    obj,
    with_fields,
    without_fields,
)

V09, V10, V11 = "0.9.0-alpha", "1.0.0", "1.1.0-alpha"
PHASES = ("provision", "start", "exec", "stop", "deprovision")

ONE_SHOT_CONTAINMENTS: dict[str, tuple[str, ...]] = {
    V09: ("process", "processcontainer", "appcontainer", "lxc", "bubblewrap", "seatbelt",
          "macos_sandbox", "isolation_session", "wslc"),
    V10: ("process", "processcontainer", "lxc", "bubblewrap", "seatbelt", "isolation_session",
          "wslc"),
    V11: ("process", "processcontainer", "lxc", "bubblewrap", "seatbelt", "vm", "windows_sandbox",
          "microvm", "hyperlight", "wslc", "isolation_session"),
}  # fmt: skip
EXPERIMENTAL_CONTAINMENTS = frozenset({"vm", "microvm", "hyperlight", "windows_sandbox"})
CONTAINMENT_ALIASES = {"appcontainer": "processcontainer", "macos_sandbox": "seatbelt"}
# 0.9.0-alpha's legacy section spellings, folded into the canonical one.
SECTION_ALIASES = {"appContainer": "processContainer", "macos_sandbox": "seatbelt"}
# The per-backend section each containment allows; every other containment allows none.
BACKEND_SECTIONS = {
    "processcontainer": "processContainer",
    "lxc": "lxc",
    "seatbelt": "seatbelt",
    "wslc": "wslc",
    "hyperlight": "hyperlight",
    "windows_sandbox": "windowsSandbox",
}

# Provisioning: MXC's own shapes, and the containments Corral adds (a Corral extension).
MXC_PROVISION_CONTAINMENTS: dict[str, tuple[str, ...]] = {
    V09: ("wslc", "isolation_session"),
    V10: ("wslc", "isolation_session"),
    V11: ("wslc", "isolation_session", "windows_sandbox"),
}
CORRAL_PROVISION_CONTAINMENTS: dict[str, tuple[str, ...]] = {
    V09: ("process", "bubblewrap"),
    V10: ("process", "bubblewrap"),
    V11: ("process", "bubblewrap", "microvm", "vm"),
}

_NETWORK_PORT = obj(
    {"endPort": U16_NONZERO, "port": U16_NONZERO, "protocol": Enum(("tcp", "udp", "icmp", "any"))},
    name="NetworkPort",
)
_NETWORK_PEER = obj({"cidr": STR, "except": STR_LIST}, "cidr", name="NetworkPeer")
_NETWORK_RULE = obj(
    {"ports": Arr(_NETWORK_PORT, non_empty=True), "to": Arr(_NETWORK_PEER, non_empty=True)},
    name="NetworkRule",
)
NETWORK = obj(
    {
        "egress": obj({"allow": Arr(_NETWORK_RULE), "default": ACTION, "deny": Arr(_NETWORK_RULE)}),
        "ingress": obj({"default": ACTION, "hostLoopback": ACTION}),
    },
    name="Network",
)
_FILESYSTEM = obj(
    {"deniedPaths": STR_LIST, "readonlyPaths": STR_LIST, "readwritePaths": STR_LIST},
    name="Filesystem",
)
_PROCESS = obj(
    {
        "commandLine": Str(non_empty=True),
        "cwd": STR,
        "env": STR_LIST,
        "inheritDefaultEnv": BOOL,
        "timeout": U32,
    },
    "commandLine",
    name="Process",
)
_RUNTIME_CONFIG = obj({"networkProxy": STR}, name="RuntimeConfig")
_UI = obj(
    {"clipboard": Enum(("none", "read", "write", "all")), "disable": BOOL, "injection": BOOL},
    name="Ui",
)
_TELEMETRY = obj({"enabled": BOOL}, name="Telemetry")
_PORT_MAPPING = obj(
    {"containerPort": U16_NONZERO, "protocol": Enum(("tcp",)), "windowsPort": U16_NONZERO},
    "containerPort",
    "windowsPort",
    name="PortMapping",
)
_CAPABILITY = Str(
    pattern=r"^[^,]*$",
    hint="one capability name without commas (use separate array entries)",
    forbidden=("learningModeLogging", "permissiveLearningMode"),
)


def _process_container(version: str) -> Obj:
    settings: Shape = Enum(("none", "parameters", "display", "all")) if version == V11 else STR
    return obj(
        {
            "capabilities": Arr(_CAPABILITY),
            "captureDenials": obj(
                {"mode": Enum(("block", "allow")), "outputPath": STR, "retainEtl": BOOL}
            ),
            "filesystem": obj({"enumeratePaths": STR_LIST}),
            "learningMode": BOOL,
            "leastPrivilege": BOOL,
            "network": obj({"allowedProxyPeer": STR}),
            "ui": obj(
                {
                    "desktopSystemControl": BOOL,
                    "ime": BOOL,
                    "isolation": Enum(("container", "desktop", "handles", "atoms")),
                    "systemSettings": settings,
                }
            ),
        }
    )


_SEATBELT = obj(
    {
        "extraMachLookups": STR_LIST,
        "guiAccess": BOOL,
        "keychainAccess": BOOL,
        "nestedPty": BOOL,
        "profileOverride": STR,
    }
)
_ONE_SHOT_WSLC = obj(
    {
        "cpuCount": U32,
        "gpu": BOOL,
        "image": STR,
        "imageTarPath": STR,
        "memoryMb": U64,
        "portMappings": Arr(_PORT_MAPPING),
        "storagePath": STR,
        "targetOs": STR,
    }
)
_ENVELOPE: dict[str, Shape] = {"$schema": STR, "_comment": AnyJson()}


def _version(version: str) -> Enum:
    return Enum((version,))


@cache
def one_shot_shape(version: str) -> Obj:
    fields: dict[str, Shape] = {
        **_ENVELOPE,
        "version": _version(version),
        "containerId": STR,
        "containment": Enum(ONE_SHOT_CONTAINMENTS[version], "unsupported_containment"),
        "fallback": obj({"allowDaclMutation": BOOL}),
        "filesystem": _FILESYSTEM,
        "lifecycle": obj({"destroyOnExit": BOOL, "preservePolicy": BOOL}),
        "lxc": obj({"distribution": STR, "release": STR}, "distribution", "release"),
        "network": NETWORK,
        "process": _PROCESS,
        "processContainer": _process_container(version),
        "runtimeConfig": _RUNTIME_CONFIG,
        "seatbelt": _SEATBELT,
        "telemetry": _TELEMETRY,
        "ui": _UI,
        "wslc": _ONE_SHOT_WSLC,
        "corral": CORRAL_SHAPE,
    }
    if version == V09:
        fields["appContainer"] = fields["processContainer"]
        fields["macos_sandbox"] = fields["seatbelt"]
    if version == V11:
        fields["hyperlight"] = obj(
            {"runtime": Enum(("agent", "python", "python-shell", "node", "bash", "dotnet-jit"))}
        )
        fields["test"] = obj({"message": STR})
        fields["windowsSandbox"] = obj(
            {"daemonPipeName": STR, "idleTimeout": U32, "idleTimeoutMs": U32}
        )
    return obj(fields, "version", "process")


def _lifecycle_base(version: str, phase: str) -> Obj:
    return obj(
        {
            **_ENVELOPE,
            "version": _version(version),
            "phase": Enum((phase,)),
            "sandboxId": STR,
            "telemetry": _TELEMETRY,
        },
        "version",
        "phase",
        "sandboxId",
    )


@cache
def phase_shape(version: str, phase: str) -> Obj:
    """The shape of a start, exec, stop or deprovision request."""
    base = _lifecycle_base(version, phase)
    if phase != "exec":
        return base
    return with_fields(
        base,
        {
            "network": NETWORK,
            "process": _PROCESS,
            "runtimeConfig": _RUNTIME_CONFIG,
            "corral": CORRAL_EXEC_SHAPE,
        },
        "process",
    )


@cache
def provision_shape(version: str, containment: str) -> Obj | None:
    """The shape of a provision request for ``containment``; None if it cannot be provisioned."""
    base = without_fields(_lifecycle_base(version, "provision"), "sandboxId")
    base = with_fields(
        base,
        {"containment": Enum((containment,)), "corral": CORRAL_SHAPE},
        "containment",
    )
    if containment == "wslc":
        wslc_fields: dict[str, Shape] = {"image": STR, "imageTarPath": STR}
        if version == V11:
            wslc_fields["portMappings"] = Arr(_PORT_MAPPING)
        return with_fields(
            base,
            {
                "filesystem": _FILESYSTEM,
                "network": NETWORK,
                "wslc": obj({"provision": obj(wslc_fields)}),
            },
        )
    if containment == "isolation_session":
        # MXC demands the all-allow posture here; Corral also accepts a restricted network
        # (its session backend can enforce one), so the shape is the general NETWORK. `ui`
        # is a Corral extension here too: a private display for the long-lived session.
        return with_fields(
            base,
            {
                "network": NETWORK,
                "isolationSession": obj({"provision": obj({"appId": STR})}),
                "ui": _UI,
            },
            "network",
        )
    if containment == "windows_sandbox" and version == V11:
        return with_fields(base, {"filesystem": _FILESYSTEM})
    if containment in CORRAL_PROVISION_CONTAINMENTS[version]:
        return with_fields(
            base,
            {
                "filesystem": _FILESYSTEM,
                "network": NETWORK,
                "runtimeConfig": _RUNTIME_CONFIG,
                "ui": _UI,
            },
        )
    return None


def provision_containments(version: str) -> tuple[str, ...]:
    return MXC_PROVISION_CONTAINMENTS[version] + CORRAL_PROVISION_CONTAINMENTS[version]
