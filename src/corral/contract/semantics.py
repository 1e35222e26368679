"""MXC's rules that need more than the shape: run after the shape check, in MXC's order
(backend sections, filesystem paths, network rules, proxy URL), then Corral's own."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NoReturn

from corral.contract.extensions import corral_problems
from corral.contract.proxy_url import proxy_url_problem
from corral.contract.validate import fail, join
from corral.contract.wire import BACKEND_SECTIONS, CONTAINMENT_ALIASES, SECTION_ALIASES

if TYPE_CHECKING:
    from ipaddress import IPv4Network, IPv6Network

# Every rule this module enforces; the JSON Schema expresses none of them (docs/conformance.md).
SEMANTIC_RULES = frozenset(
    {
        "backend_section",
        "filesystem_path",
        "cidr",
        "except_outside_cidr",
        "icmp_ports",
        "end_port",
        "network_proxy",
        "proxy_peer",
        "proxy_ingress",
        "section_alias",
        "nul_character",
        "absolute_path",
        "isolation_session_network",
        "publish_duplicate",
        "host_length",
    }
)


def check_semantics(data: Mapping[str, Any], *, one_shot: bool, containment: str | None) -> None:
    containment = CONTAINMENT_ALIASES.get(containment or "", containment)
    if one_shot:
        _check_section_aliases(data)
        _check_backend_sections(data, containment)
    process = data.get("process")
    if process is not None:
        _check_process(process)
    _check_filesystem(data.get("filesystem", {}))
    network = data.get("network")
    if network is not None:
        _check_network(network)
    proxy = data.get("runtimeConfig", {}).get("networkProxy")
    if proxy is not None:
        problem = proxy_url_problem(proxy)
        if problem is not None:
            fail("runtimeConfig.networkProxy", problem, "network_proxy")
    if containment == "processcontainer":
        _check_process_container(data, proxy)
    if containment == "isolation_session" and network is None:
        fail(
            "network",
            "the isolation_session containment requires an explicit network policy "
            "(MXC's posture is egress.default, ingress.default and ingress.hostLoopback "
            "all 'allow'; Corral also enforces a restricted one)",
            "isolation_session_network",
        )
    section = data.get("corral")
    if section is not None:
        for rule, path, message in corral_problems(section):
            fail(join("corral", path), message, rule)


def _check_section_aliases(data: Mapping[str, Any]) -> None:
    for alias, canonical in SECTION_ALIASES.items():
        if alias in data and canonical in data:
            fail(
                canonical,
                f"'{alias}' is 0.9.0-alpha's spelling of '{canonical}'; give only one of them",
                "section_alias",
            )


def _check_process(process: Mapping[str, Any]) -> None:
    # MXC refuses NUL in commandLine; Corral also in cwd and env, which exec would truncate.
    if "\x00" in process["commandLine"]:
        fail("process.commandLine", "must not contain NUL characters", "nul_character")
    if "\x00" in process.get("cwd", ""):
        fail("process.cwd", "must not contain NUL characters", "nul_character")
    for index, entry in enumerate(process.get("env", ())):
        if "\x00" in entry:
            fail(f"process.env[{index}]", "must not contain NUL characters", "nul_character")


def _check_process_container(data: Mapping[str, Any], proxy: str | None) -> None:
    section = data.get("processContainer", data.get("appContainer", {}))
    prefix = "processContainer"
    for index, path in enumerate(section.get("filesystem", {}).get("enumeratePaths", ())):
        _check_path(f"{prefix}.filesystem.enumeratePaths[{index}]", path)
    output = section.get("captureDenials", {}).get("outputPath")
    if output is not None and not output.startswith("/"):
        fail(
            f"{prefix}.captureDenials.outputPath",
            f"must be an absolute path: {output!r}",
            "absolute_path",
        )
    has_peer = "allowedProxyPeer" in section.get("network", {})
    if has_peer and proxy is None:
        fail(
            f"{prefix}.network.allowedProxyPeer",
            "requires runtimeConfig.networkProxy; set the proxy or remove the peer",
            "proxy_peer",
        )
    if proxy is None:
        return
    ingress = data.get("network", {}).get("ingress", {})
    if ingress.get("default") != "allow":
        fail(
            "network.ingress.default",
            "a processcontainer proxy (runtimeConfig.networkProxy) requires "
            "network.ingress.default='allow'",
            "proxy_ingress",
        )
    if not has_peer and ingress.get("hostLoopback") != "allow":
        fail(
            "network.ingress.hostLoopback",
            "a processcontainer proxy without processContainer.network.allowedProxyPeer "
            "requires network.ingress.hostLoopback='allow'",
            "proxy_ingress",
        )


def _check_backend_sections(data: Mapping[str, Any], containment: str | None) -> None:
    present = sorted(
        {SECTION_ALIASES.get(key, key) for key in data} & set(BACKEND_SECTIONS.values())
    )
    allowed = BACKEND_SECTIONS.get(containment or "")
    unrelated = [name for name in present if name != allowed]
    if not unrelated:
        return
    shown = containment or "omitted (the host default)"
    fail(
        unrelated[0],
        f"Multiple containment backends configured: 'containment' is {shown}, which "
        + (f"allows only the '{allowed}' section" if allowed else "has no backend section")
        + f", but the request also includes: {', '.join(unrelated)}. "
        "Only one backend section is allowed; remove the unused section(s)",
        "backend_section",
    )


def _check_filesystem(filesystem: Mapping[str, Any]) -> None:
    for key in ("readwritePaths", "readonlyPaths", "deniedPaths"):
        for index, path in enumerate(filesystem.get(key, ())):
            _check_path(f"filesystem.{key}[{index}]", path)


def _check_path(where: str, path: str) -> None:
    if not path:
        fail(where, "a filesystem path must not be empty", "filesystem_path")
    if "\x00" in path:
        fail(where, "a filesystem path must not contain a NUL character", "filesystem_path")


def _check_network(network: Mapping[str, Any]) -> None:
    egress = network.get("egress", {})
    for action in ("allow", "deny"):
        for index, rule in enumerate(egress.get(action, ())):
            _check_rule(rule, f"network.egress.{action}[{index}]")


def _check_rule(rule: Mapping[str, Any], path: str) -> None:
    for index, peer in enumerate(rule.get("to", ())):
        where = f"{path}.to[{index}]"
        network = parse_cidr(peer["cidr"], f"{where}.cidr")
        for number, text in enumerate(peer.get("except", ())):
            excluded = parse_cidr(text, f"{where}.except[{number}]")
            if excluded.version != network.version or not excluded.subnet_of(network):  # type: ignore[arg-type]
                fail(
                    f"{where}.except[{number}]",
                    f"{text!r} must be contained within {where}.cidr ({peer['cidr']}); "
                    "an exception can only carve a range out of its own CIDR",
                    "except_outside_cidr",
                )
    for index, port in enumerate(rule.get("ports", ())):
        where = f"{path}.ports[{index}]"
        has_port = "port" in port
        if "endPort" in port and not has_port:
            fail(f"{where}.endPort", "endPort requires port (the start of the range)", "end_port")
        if port.get("protocol") == "icmp" and (has_port or "endPort" in port):
            fail(
                where,
                "cannot specify port or endPort for protocol='icmp'; ICMP has no ports",
                "icmp_ports",
            )
        if has_port and port.get("endPort", port["port"]) < port["port"]:
            fail(f"{where}.endPort", "endPort must be greater than or equal to port", "end_port")


def parse_cidr(text: str, path: str) -> IPv4Network | IPv6Network:
    """A CIDR as MXC reads it: an address with an optional decimal prefix length, host bits zero."""
    import ipaddress  # only requests with network rules pay for it

    address_text, slash, length_text = text.partition("/")
    if "%" in address_text:
        _bad_cidr(path, text, "an address with a zone index is not a network")
    try:
        address = ipaddress.ip_address(address_text)
    except ValueError:
        _bad_cidr(path, text, "invalid IP address syntax")
    digits = length_text[1:] if length_text.startswith("+") else length_text  # as Rust's parse
    if slash and not (digits.isascii() and digits.isdigit()):
        _bad_cidr(path, text, "the prefix length must be a decimal number")
    length = int(digits) if slash else address.max_prefixlen
    if length > address.max_prefixlen:
        _bad_cidr(
            path, text, f"prefix length {length} is too long (maximum {address.max_prefixlen})"
        )
    network = ipaddress.ip_network(f"{address}/{length}", strict=False)
    if network.network_address != address:
        _bad_cidr(path, text, f"host part of address was not zero (did you mean {network}?)")
    return network


def _bad_cidr(path: str, text: str, reason: str) -> NoReturn:
    fail(path, f"{text!r} must be a valid network CIDR: {reason}", "cidr")
