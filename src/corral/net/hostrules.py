"""Decisions for ``corral.network.hosts``: hostname, port, HTTP method and path (pure).

Deny rules before allow rules; nothing allowed unless a rule says so. A CONNECT tunnel is
opaque (no TLS interception), so a rule that depends on methods or paths cannot allow it
and any deny rule for the host and port refuses it: fail closed.
"""

from __future__ import annotations

from dataclasses import dataclass

from corral.contract.model import HostRule, HostRulesSpec


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str  # which rule decided, as a person would name it


def host_matches(pattern: str, host: str) -> bool:
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


def decide(
    rules: HostRulesSpec, host: str, port: int, method: str | None, path: str | None
) -> Decision:
    """``method``/``path`` are None for an opaque tunnel."""
    for index, rule in enumerate(rules.deny):
        if _applies(rule, host, port) and (
            method is None or _http_matches(rule, method, path or "/")
        ):
            return Decision(False, f"hosts.deny[{index}] {describe(rule)}")
    for index, rule in enumerate(rules.allow):
        if not _applies(rule, host, port):
            continue
        if method is None and (rule.methods is not None or rule.paths is not None):
            continue  # cannot check methods or paths inside an opaque tunnel
        if method is None or _http_matches(rule, method, path or "/"):
            return Decision(True, f"hosts.allow[{index}] {describe(rule)}")
    return Decision(False, f"no hosts.allow rule matches {host}:{port}")


def describe(rule: HostRule) -> str:
    text = f"{rule.host} ports {','.join(map(str, rule.ports))}"
    if rule.methods is not None:
        text += f" methods {','.join(rule.methods)}"
    if rule.paths is not None:
        text += f" paths {','.join(rule.paths)}"
    return text


def _applies(rule: HostRule, host: str, port: int) -> bool:
    return host_matches(rule.host, host) and port in rule.ports


def _http_matches(rule: HostRule, method: str, path: str) -> bool:
    if rule.methods is not None and method.upper() not in rule.methods:
        return False
    return rule.paths is None or any(path.startswith(p) for p in rule.paths)
