"""Decisions for ``corral.network.hosts``: hostname, port, HTTP method and path (pure).

Deny rules before allow rules; nothing allowed unless a rule says so. Without TLS
interception a CONNECT tunnel is opaque, so a rule that depends on methods or paths cannot
allow it and any deny rule for the host and port refuses it: fail closed. With interception,
a tunnel to a host that such rules name is opened and each decrypted request is decided.
"""

from __future__ import annotations

from dataclasses import dataclass

from corral.contract.model import HostRule, HostRulesSpec


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str  # which rule decided, as a person would name it
    inspect: bool = False  # a tunnel whose every request must be decrypted and decided


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
    needs_interception: str | None = None
    for index, rule in enumerate(rules.allow):
        if not _applies(rule, host, port):
            continue
        if method is None and _has_http_rules(rule):
            needs_interception = needs_interception or f"hosts.allow[{index}] {describe(rule)}"
            continue  # cannot check methods or paths inside an opaque tunnel
        if method is None or _http_matches(rule, method, path or "/"):
            return Decision(True, f"hosts.allow[{index}] {describe(rule)}")
    if needs_interception is not None:
        return Decision(
            False,
            f"{needs_interception} limits methods or paths, which an opaque CONNECT tunnel "
            "cannot show: it needs TLS interception (corral.network.tlsInterception: true)",
        )
    return Decision(False, f"no hosts.allow rule matches {host}:{port}")


def decide_tunnel(rules: HostRulesSpec, host: str, port: int, *, intercept: bool) -> Decision:
    """A CONNECT tunnel: opaque unless ``intercept`` and a method/path rule names the host,
    in which case it opens (``inspect``) when some request could be allowed."""
    named = [r for r in (*rules.deny, *rules.allow) if _applies(r, host, port)]
    if not intercept or not any(_has_http_rules(r) for r in named):
        return decide(rules, host, port, None, None)
    for index, rule in enumerate(rules.deny):
        if _applies(rule, host, port) and not _has_http_rules(rule):
            return Decision(False, f"hosts.deny[{index}] {describe(rule)}")
    for index, rule in enumerate(rules.allow):
        if _applies(rule, host, port):
            return Decision(True, f"hosts.allow[{index}] {describe(rule)}", inspect=True)
    return Decision(False, f"no hosts.allow rule matches {host}:{port}")


def name_allowed(rules: HostRulesSpec, host: str) -> bool:
    """Whether DNS may answer ``host``: some allow rule names it (ports are the proxy's job)."""
    return any(host_matches(rule.host, host) for rule in rules.allow)


def describe(rule: HostRule) -> str:
    text = f"{rule.host} ports {','.join(map(str, rule.ports))}"
    if rule.methods is not None:
        text += f" methods {','.join(rule.methods)}"
    if rule.paths is not None:
        text += f" paths {','.join(rule.paths)}"
    return text


def _applies(rule: HostRule, host: str, port: int) -> bool:
    return host_matches(rule.host, host) and port in rule.ports


def _has_http_rules(rule: HostRule) -> bool:
    return rule.methods is not None or rule.paths is not None


def _http_matches(rule: HostRule, method: str, path: str) -> bool:
    if rule.methods is not None and method.upper() not in rule.methods:
        return False
    return rule.paths is None or any(path.startswith(p) for p in rule.paths)
