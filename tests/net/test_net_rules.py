"""nftables rules from the MXC directional policy, attacked from inside a real sandbox."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
from nettestbed import Sandbox, World

from corral import net
from corral.contract.model import (
    EgressSpec,
    IngressSpec,
    NetworkRule,
    NetworkSpec,
    PeerSpec,
    PortSpec,
)
from corral.plan import NetworkPlan

pytestmark = pytest.mark.timeout(60)


def rule(
    *cidrs: str, ports: tuple[PortSpec, ...] | None = None, exc: tuple[str, ...] = ()
) -> NetworkRule:
    to = tuple(PeerSpec(c, exc) for c in cidrs) if cidrs else None
    return NetworkRule(to=to, ports=ports)


def plan(
    allow: tuple[NetworkRule, ...] = (),
    deny: tuple[NetworkRule, ...] = (),
    default: Any = "deny",
    corral: dict[str, Any] | None = None,
    host_loopback: Any = "deny",
) -> NetworkPlan:
    spec = NetworkSpec(
        egress=EgressSpec(default=default, allow=allow, deny=deny),
        ingress=IngressSpec(host_loopback=host_loopback),
    )
    return NetworkPlan("rules", spec, None, corral or {})


def tcp(port: int, end: int | None = None) -> PortSpec:
    return PortSpec("tcp", port, end)


def test_world_is_reachable_without_rules(sandbox: Sandbox, world: World) -> None:
    assert sandbox.reach("tcp", "10.200.0.2", 80)
    assert sandbox.reach("tcp", "fd00:200::3", 81)
    assert sandbox.reach("udp", "10.200.0.2", 53)
    assert sandbox.ping("10.200.0.2")


def test_allowed_port_reachable_neighbour_port_blocked(sandbox: Sandbox, world: World) -> None:
    with net.attach(plan(allow=(rule("10.200.0.0/24", ports=(tcp(80),)),)), pid=sandbox.pid):
        assert sandbox.reach("tcp", "10.200.0.2", 80)
        assert not sandbox.reach("tcp", "10.200.0.2", 81)
        assert not sandbox.reach("udp", "10.200.0.2", 80)


def test_port_range(sandbox: Sandbox, world: World) -> None:
    with net.attach(plan(allow=(rule("10.200.0.2/32", ports=(tcp(80, 81),)),)), pid=sandbox.pid):
        assert sandbox.reach("tcp", "10.200.0.2", 80)
        assert sandbox.reach("tcp", "10.200.0.2", 81)
        assert not sandbox.reach("tcp", "10.200.0.2", 443)


def test_except_carve_out_is_blocked(sandbox: Sandbox, world: World) -> None:
    allow = (rule("10.200.0.0/24", exc=("10.200.0.128/25",)),)
    with net.attach(plan(allow=allow), pid=sandbox.pid):
        assert sandbox.reach("tcp", "10.200.0.2", 80)
        assert not sandbox.reach("tcp", "10.200.0.200", 80)


def test_deny_beats_broader_allow(sandbox: Sandbox, world: World) -> None:
    p = plan(allow=(rule("10.200.0.0/16"),), deny=(rule("10.200.0.200/32", ports=(tcp(80),)),))
    with net.attach(p, pid=sandbox.pid):
        assert sandbox.reach("tcp", "10.200.0.200", 81)
        assert not sandbox.reach("tcp", "10.200.0.200", 80)


def test_ipv6_allow_and_deny(sandbox: Sandbox, world: World) -> None:
    p = plan(allow=(rule("fd00:200::/64"),), deny=(rule("fd00:200::3/128"),))
    with net.attach(p, pid=sandbox.pid):
        assert sandbox.reach("tcp", "fd00:200::2", 80)
        assert not sandbox.reach("tcp", "fd00:200::3", 80)
        assert not sandbox.reach("tcp", "10.200.0.2", 80)  # an IPv6 rule grants no IPv4


def test_udp_rule(sandbox: Sandbox, world: World) -> None:
    p = plan(allow=(rule("10.200.0.2/32", ports=(PortSpec("udp", 8080),)),))
    with net.attach(p, pid=sandbox.pid):
        assert sandbox.reach("udp", "10.200.0.2", 8080)
        assert not sandbox.reach("tcp", "10.200.0.2", 8080)
        assert not sandbox.reach("udp", "10.200.0.2", 53)


def test_icmp_rule(sandbox: Sandbox, world: World) -> None:
    with net.attach(
        plan(allow=(rule("10.200.0.2/32", ports=(PortSpec("icmp"),)),)), pid=sandbox.pid
    ):
        assert sandbox.ping("10.200.0.2")
        assert not sandbox.ping("10.200.0.200")
        assert not sandbox.reach("tcp", "10.200.0.2", 80)


def test_default_deny_blocks_everything_including_dns(sandbox: Sandbox, world: World) -> None:
    with net.attach(plan(), pid=sandbox.pid):
        for proto, host, port in (
            ("udp", "10.200.0.2", 53),
            ("tcp", "10.200.0.2", 53),
            ("udp", "10.0.2.3", 53),
            ("tcp", "fd00:200::2", 80),
        ):
            assert not sandbox.reach(proto, host, port), (proto, host, port)
        assert not sandbox.ping("10.200.0.2")


def test_default_allow_with_deny(sandbox: Sandbox, world: World) -> None:
    with net.attach(
        plan(default="allow", deny=(rule(ports=(PortSpec("udp", 53),)),)), pid=sandbox.pid
    ):
        assert sandbox.reach("tcp", "10.200.0.2", 53)
        assert not sandbox.reach("udp", "10.200.0.2", 53)


def test_hot_reload_takes_effect_on_next_connection(sandbox: Sandbox, world: World) -> None:
    with net.attach(plan(allow=(rule("10.200.0.2/32"),)), pid=sandbox.pid) as attachment:
        assert sandbox.reach("tcp", "10.200.0.2", 80)
        attachment.replace_rules(NetworkSpec(), {})
        assert not sandbox.reach("tcp", "10.200.0.2", 80)
        attachment.replace_rules(plan(allow=(rule("10.200.0.2/32", ports=(tcp(81),)),)).spec, {})
        assert sandbox.reach("tcp", "10.200.0.2", 81)
        assert not sandbox.reach("tcp", "10.200.0.2", 80)


def test_process_without_cap_net_admin_cannot_flush(sandbox: Sandbox, world: World) -> None:
    with net.attach(plan(allow=(rule("10.200.0.2/32", ports=(tcp(80),)),)), pid=sandbox.pid):
        drop = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all"]
        flush = subprocess.run(sandbox.enter(*drop, "nft", "flush", "ruleset"), capture_output=True)
        assert flush.returncode != 0
        assert not sandbox.reach("tcp", "10.200.0.2", 81)
        # The same attack with CAP_NET_ADMIN works, so the assertion above can fail.
        subprocess.run(sandbox.enter("nft", "flush", "ruleset"), check=True, capture_output=True)
        assert sandbox.reach("tcp", "10.200.0.2", 81)


def test_describe_names_mechanisms(sandbox: Sandbox) -> None:
    with net.attach(plan(allow=(rule("10.200.0.0/24", ports=(tcp(80),)),)), pid=sandbox.pid) as a:
        text = "\n".join(a.describe())
    assert "nftables: egress: allow to 10.200.0.0/24 tcp/80" in text
    assert "user-mode-networking: slirp4netns" in text
