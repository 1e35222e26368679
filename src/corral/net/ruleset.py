"""Render a sandbox's network policy as one nftables table (``inet``: IPv4 and IPv6 at once).

Pure: policy in, nft text out. The table lives in the sandbox's own network namespace, so
its rules see exactly the sandbox's traffic. Order of the egress chain (first match wins):

1. the sandbox's own loopback, replies to accepted connections, IPv6 neighbour discovery;
2. the host-loopback ports Corral's proxies listen on (proxy mode, policy proxy);
3. ``ingress.hostLoopback``: the user-mode gateway address that reaches the host's loopback;
4. ``egress.deny`` rules (reject), so deny beats any allow;
5. the user-mode DNS forwarder, which follows ``egress.default`` (no side door for DNS);
6. ``egress.allow`` rules (accept), then ``egress.default``.

Every address and port is re-parsed here, so nothing a request carries reaches the nft
parser as text it did not produce.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from corral.contract.model import NetworkRule, NetworkSpec, PeerSpec, PortSpec, PublishSpec
from corral.errors import PolicyError
from corral.net import addresses

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
REJECT = "reject with icmpx admin-prohibited"  # fails fast with EACCES/EHOSTUNREACH
_ND = (
    "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, "
    "nd-router-advert } accept"
)


@dataclass(frozen=True)
class RuleLine:
    """One nft statement and what it means to a person reading the plan."""

    nft: str
    meaning: str


@dataclass(frozen=True)
class RulesetInputs:
    spec: NetworkSpec
    publish: tuple[PublishSpec, ...] = ()
    # Host-loopback TCP/UDP ports always reachable (a proxy, Corral's DNS stub): (proto, port).
    service_ports: tuple[tuple[str, int], ...] = ()
    only_services: bool = False  # proxy mode: the services are the only way out
    dns_stub_port: int | None = None  # redirect every DNS query to Corral's stub


def render(inputs: RulesetInputs) -> tuple[RuleLine, ...]:
    """The egress and ingress statements, in order, with their meanings."""
    return tuple(_output_chain(inputs)) + tuple(_input_chain(inputs))


def render_table(inputs: RulesetInputs) -> str:
    """A complete nft script that (re)creates the table atomically, in one transaction."""
    lines = render(inputs)
    out = [f"table inet {addresses.TABLE}", f"delete table inet {addresses.TABLE}"]
    out.append(f"table inet {addresses.TABLE} {{")
    out.append("  chain output {")
    out.append("    type filter hook output priority 0; policy drop;")
    out += [f"    {r.nft}" for r in lines if r.meaning.startswith("egress")]
    out.append("  }")
    out.append("  chain input {")
    out.append("    type filter hook input priority 0; policy drop;")
    out += [f"    {r.nft}" for r in lines if r.meaning.startswith("ingress")]
    out.append("  }")
    if inputs.dns_stub_port is not None:
        out.append("  chain dns {")
        out.append("    type nat hook output priority -100; policy accept;")
        out.append(
            f"    meta nfproto ipv4 meta l4proto {{ tcp, udp }} th dport 53 "
            f"dnat ip to {addresses.HOST_LOOPBACK_V4}:{inputs.dns_stub_port}"
        )
        out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"


def _output_chain(inputs: RulesetInputs) -> Iterable[RuleLine]:
    spec = inputs.spec
    yield RuleLine('oif "lo" accept', "egress: the sandbox's own loopback")
    yield RuleLine("ct state established,related accept", "egress: replies and related")
    yield RuleLine(_ND, "egress: IPv6 neighbour discovery")
    for proto, port in inputs.service_ports:
        yield RuleLine(
            f"ip daddr {addresses.HOST_LOOPBACK_V4} {_proto(proto)} dport {int(port)} accept",
            f"egress: Corral service on host loopback {proto}/{int(port)}",
        )
    if inputs.dns_stub_port is not None:
        yield RuleLine(
            f"meta nfproto ipv6 meta l4proto {{ tcp, udp }} th dport 53 {REJECT}",
            "egress: DNS over IPv6: reject (Corral's DNS stub answers every IPv4 query)",
        )
    if inputs.only_services:
        yield RuleLine(REJECT, "egress: everything except the proxy: reject")
        return
    loop = "accept" if spec.ingress.host_loopback == "allow" else REJECT
    for addr, family in ((addresses.HOST_LOOPBACK_V4, "ip"), (addresses.HOST_LOOPBACK_V6, "ip6")):
        yield RuleLine(
            f"{family} daddr {addr} {loop}",
            f"egress: host loopback via {addr}: {spec.ingress.host_loopback}",
        )
    for rule in spec.egress.deny:
        yield from _rule_lines(rule, REJECT, "deny")
    default = "accept" if spec.egress.default == "allow" else REJECT
    for addr, family in ((addresses.DNS_FORWARDER_V4, "ip"), (addresses.DNS_FORWARDER_V6, "ip6")):
        yield RuleLine(
            f"{family} daddr {addr} {default}",
            f"egress: user-mode DNS forwarder {addr}: {spec.egress.default} (egress default)",
        )
    for rule in spec.egress.allow:
        yield from _rule_lines(rule, "accept", "allow")
    yield RuleLine(default, f"egress: default {spec.egress.default}")


def _input_chain(inputs: RulesetInputs) -> Iterable[RuleLine]:
    yield RuleLine('iif "lo" accept', "ingress: the sandbox's own loopback")
    yield RuleLine("ct state established,related accept", "ingress: replies and related")
    yield RuleLine(_ND, "ingress: IPv6 neighbour discovery")
    for p in inputs.publish:
        yield RuleLine(
            f"{_proto(p.protocol)} dport {int(p.sandbox_port)} accept",
            f"ingress: published host port {int(p.host_port)} -> sandbox "
            f"{p.protocol}/{int(p.sandbox_port)}",
        )
    verdict = "accept" if inputs.spec.ingress.default == "allow" else "drop"
    yield RuleLine(verdict, f"ingress: default {inputs.spec.ingress.default}")


def _rule_lines(rule: NetworkRule, verdict: str, action: str) -> Iterable[RuleLine]:
    peers: tuple[PeerSpec | None, ...] = rule.to if rule.to is not None else (None,)
    ports: tuple[PortSpec | None, ...] = rule.ports if rule.ports is not None else (None,)
    for peer in peers:
        dest, family = _peer_match(peer)
        for port in ports:
            match = " ".join(part for part in (dest, _port_match(port, family)) if part)
            yield RuleLine(
                f"{match} {verdict}" if match else verdict,
                f"egress: {action} {_describe_peer(peer)} {_describe_port(port)}",
            )


def _peer_match(peer: PeerSpec | None) -> tuple[str, int | None]:
    if peer is None:
        return "", None
    net = _network(peer.cidr)
    key = "ip daddr" if net.version == 4 else "ip6 daddr"
    text = f"{key} {net}"
    excepts = [_network(c) for c in peer.except_cidrs]
    for e in excepts:
        if e.version != net.version or not e.subnet_of(net):  # type: ignore[arg-type]
            raise PolicyError(f"except {e} does not lie inside {net}")
    if excepts:
        text += f" {key} != {{ {', '.join(str(e) for e in excepts)} }}"
    return text, net.version


def _port_match(port: PortSpec | None, family: int | None) -> str:
    if port is None:
        return ""
    if port.protocol == "icmp":
        return {
            4: "meta l4proto icmp",
            6: "meta l4proto ipv6-icmp",
            None: "meta l4proto { icmp, ipv6-icmp }",
        }[family]
    protos = {"tcp": "tcp", "udp": "udp", "any": "{ tcp, udp }"}[port.protocol]
    if port.port is None:
        return "" if port.protocol == "any" else f"meta l4proto {protos}"
    span = str(int(port.port))
    if port.end_port is not None and port.end_port != port.port:
        span += f"-{int(port.end_port)}"
    return f"meta l4proto {protos} th dport {span}"


def _describe_peer(peer: PeerSpec | None) -> str:
    if peer is None:
        return "to any"
    text = f"to {_network(peer.cidr)}"
    if peer.except_cidrs:
        text += " except " + ",".join(str(_network(c)) for c in peer.except_cidrs)
    return text


def _describe_port(port: PortSpec | None) -> str:
    if port is None or (port.protocol == "any" and port.port is None):
        return "any protocol"
    if port.port is None:
        return f"{port.protocol}/any port"
    end = f"-{port.end_port}" if port.end_port not in (None, port.port) else ""
    return f"{port.protocol}/{port.port}{end}"


def _proto(protocol: str) -> str:
    if protocol not in ("tcp", "udp"):
        raise PolicyError(f"protocol {protocol!r} cannot be published or proxied")
    return protocol


def _network(cidr: str) -> IpNetwork:
    try:
        return ipaddress.ip_network(cidr, strict=True)
    except ValueError as exc:
        raise PolicyError(f"{cidr!r} is not a CIDR without host bits: {exc}") from exc
