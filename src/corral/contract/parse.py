"""``parse_request``: wire JSON (any accepted MXC version, one-shot or state-aware) to a Request.

Order of checks, as MXC's reference: decode; ``version``; ``phase``; (provision) which
containment; the shape, in document order; semantic rules; the experimental gate.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, NoReturn, cast

from corral.contract.extensions import build_corral_section
from corral.contract.model import (
    DEFAULT_VERSION,
    SUPPORTED_VERSIONS,
    EgressSpec,
    FilesystemSpec,
    IngressSpec,
    NetworkRule,
    NetworkSpec,
    PeerSpec,
    Phase,
    PortSpec,
    ProcessSpec,
    Request,
    UiSpec,
    Version,
)
from corral.contract.semantics import check_semantics, parse_cidr
from corral.contract.validate import JsonObject, check, describe, fail
from corral.contract.wire import (
    CONTAINMENT_ALIASES,
    EXPERIMENTAL_CONTAINMENTS,
    PHASES,
    one_shot_shape,
    phase_shape,
    provision_containments,
    provision_shape,
)
from corral.errors import ErrorCode, RequestParseError

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LONG_INTEGER = 40  # digits; longer integers are read as floats, as serde_json does


def parse_request(
    data: str | bytes | Mapping[str, Any],
    *,
    experimental: bool = False,
    fill_version: bool = False,
) -> Request:
    """Parse and validate one request; raise RequestParseError or ValidationError.

    ``experimental`` allows 1.1.0-alpha's experimental containments (vm, microvm,
    hyperlight, windows_sandbox); ``fill_version`` supplies "1.0.0" when ``version`` is absent.
    """
    request = _decode(data)
    version = _version(request, fill_version)
    if "version" not in request:
        request = {"version": version, **request}
    phase = _phase(request)
    if phase is None:
        shape = one_shot_shape(version)
    elif phase == "provision":
        provisioned = provision_shape(version, _provision_containment(request, version))
        assert provisioned is not None  # _provision_containment admits provisionable ones only
        shape = provisioned
    else:
        shape = phase_shape(version, phase)
    check(request, shape, "")
    containment = request.get("containment")
    check_semantics(request, one_shot=phase is None, containment=containment)
    if containment in EXPERIMENTAL_CONTAINMENTS and not experimental:
        fail(
            "containment",
            f"the '{containment}' backend is experimental; enable experimental features to "
            "use it (experimental=True, or --experimental on the command line)",
            "experimental",
            ErrorCode.UNSUPPORTED_CONTAINMENT,
        )
    return _build(request, cast(Version, version), phase)


def _decode(data: str | bytes | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(data, Mapping):
        return data
    if isinstance(data, bytes | bytearray | memoryview):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            _unreadable(f"the request is not valid UTF-8 ({exc.reason} at byte {exc.start})")
    elif isinstance(data, str):
        text = data
    else:
        _unreadable(
            f"a request is JSON text (str or bytes) or a mapping, not {type(data).__name__}"
        )
    if text.startswith("\ufeff"):
        _unreadable("the request starts with a byte-order mark; save it as UTF-8 without BOM")
    try:
        value = json.loads(
            text,
            object_pairs_hook=_object,
            parse_int=_integer,
            parse_constant=_no_constant,
        )
    except (ValueError, RecursionError) as exc:
        _unreadable(f"the request is not valid JSON: {exc}")
    if _SURROGATE_ESCAPE.search(text) or not text.isascii():
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            _unreadable(
                "the request contains an unpaired UTF-16 surrogate escape (\\ud800-\\udfff)"
            )
    if not isinstance(value, dict):
        _unreadable(f"the request must be a JSON object, got {describe(value)}")
    return value


def _unreadable(message: str) -> NoReturn:
    raise RequestParseError(message, details={"path": ""})


def _object(pairs: list[tuple[str, Any]]) -> JsonObject:
    value = JsonObject(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                value.duplicate = key
                break
            seen.add(key)
    return value


def _integer(text: str) -> int | float:
    # serde_json reads "-0" and integers beyond 64 bits as floats; so does this parser.
    if text == "-0" or len(text) > _LONG_INTEGER:
        return float(text)
    return int(text)


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _version(request: Mapping[str, Any], fill: bool) -> str:
    if getattr(request, "duplicate", None) == "version":
        fail("version", "the field 'version' appears more than once; keep one", "duplicate_key")
    if "version" not in request:
        if fill:
            return DEFAULT_VERSION
        fail(
            "version",
            f'the required field \'version\' is missing; add "version": "{DEFAULT_VERSION}" '
            f"(supported: {', '.join(SUPPORTED_VERSIONS)})",
            "required",
        )
    version = request["version"]
    if not isinstance(version, str):
        fail("version", f"expected a version string, got {describe(version)}", "type")
    if version not in SUPPORTED_VERSIONS:
        fail(
            "version",
            f"unsupported contract version {version!r}; registered versions are "
            f"{', '.join(SUPPORTED_VERSIONS)}",
            "enum",
        )
    return version


def _phase(request: Mapping[str, Any]) -> Phase | None:
    if "phase" not in request:
        return None
    phase = request["phase"]
    if not isinstance(phase, str):
        fail("phase", f"expected a phase name, got {describe(phase)}", "type")
    if phase not in PHASES:
        fail(
            "phase",
            f"unsupported phase {phase!r}; expected one of {', '.join(PHASES)}, "
            "or no phase for a one-shot request",
            "enum",
            ErrorCode.UNSUPPORTED_PHASE,
        )
    return cast(Phase, phase)


def _provision_containment(request: Mapping[str, Any], version: str) -> str:
    allowed = provision_containments(version)
    if "containment" not in request:
        fail(
            "containment",
            f"a provision request must name its containment (one of {', '.join(allowed)})",
            "required",
        )
    containment = request["containment"]
    if not isinstance(containment, str):
        fail("containment", f"expected a containment name, got {describe(containment)}", "type")
    if containment not in allowed:
        fail(
            "containment",
            f"the {containment!r} containment cannot be provisioned with version {version}; "
            f"provisionable: {', '.join(allowed)}",
            "enum",
            ErrorCode.UNSUPPORTED_CONTAINMENT,
        )
    return containment


def _build(request: Mapping[str, Any], version: Version, phase: Phase | None) -> Request:
    containment = request.get("containment")
    process = request.get("process")
    filesystem = request.get("filesystem", {})
    network = request.get("network")
    corral = request.get("corral")
    return Request(
        version=version,
        phase=phase,
        containment=CONTAINMENT_ALIASES.get(containment, containment) if containment else None,
        sandbox_id=request.get("sandboxId"),
        container_id=request.get("containerId"),
        process=None if process is None else _process(process),
        filesystem=FilesystemSpec(
            readonly_paths=tuple(filesystem.get("readonlyPaths", ())),
            readwrite_paths=tuple(filesystem.get("readwritePaths", ())),
            denied_paths=tuple(filesystem.get("deniedPaths", ())),
        ),
        network=NetworkSpec() if network is None else _network(network),
        network_given=network is not None,
        network_proxy=request.get("runtimeConfig", {}).get("networkProxy"),
        ui=_ui(request.get("ui", {})),
        **({} if corral is None else {"corral": build_corral_section(corral)}),
        raw=dict(request),
    )


def _process(process: Mapping[str, Any]) -> ProcessSpec:
    env = process.get("env")
    return ProcessSpec(
        command_line=process["commandLine"],
        cwd=process.get("cwd"),
        env=None if env is None else tuple(env),
        inherit_default_env=process.get("inheritDefaultEnv", False),
        timeout_ms=process.get("timeout", 0),
    )


def _network(network: Mapping[str, Any]) -> NetworkSpec:
    egress = network.get("egress", {})
    ingress = network.get("ingress", {})
    return NetworkSpec(
        egress=EgressSpec(
            default=egress.get("default", "deny"),
            allow=tuple(_rule(r) for r in egress.get("allow", ())),
            deny=tuple(_rule(r) for r in egress.get("deny", ())),
        ),
        ingress=IngressSpec(
            default=ingress.get("default", "deny"),
            host_loopback=ingress.get("hostLoopback", "deny"),
        ),
    )


def _rule(rule: Mapping[str, Any]) -> NetworkRule:
    to = rule.get("to")
    ports = rule.get("ports")
    return NetworkRule(
        to=None
        if to is None
        else tuple(
            PeerSpec(
                cidr=str(parse_cidr(peer["cidr"], "")),  # canonical: "10.0.0.5" -> "10.0.0.5/32"
                except_cidrs=tuple(str(parse_cidr(e, "")) for e in peer.get("except", ())),
            )
            for peer in to
        ),
        ports=None
        if ports is None
        else tuple(
            PortSpec(
                protocol=p.get("protocol", "any"), port=p.get("port"), end_port=p.get("endPort")
            )
            for p in ports
        ),
    )


def _ui(ui: Mapping[str, Any]) -> UiSpec:
    return UiSpec(
        disable=ui.get("disable", True),
        clipboard=ui.get("clipboard", "none"),
        injection=ui.get("injection", False),
    )
