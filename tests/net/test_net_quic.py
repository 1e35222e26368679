"""UDP (and so QUIC) is never carried by the policy proxy: a hostname rule does not open
it; only a CIDR rule that names UDP does."""

from __future__ import annotations

import pytest
from nettestbed import Sandbox, World
from test_net_rules import plan, rule

from corral import net
from corral.contract.model import PortSpec

pytestmark = pytest.mark.timeout(60)
QUIC_HOST = {"hosts": {"allow": [{"host": "quic.test", "ports": [443]}]}}
ANSWERS = {"resolver": lambda host, port: {"quic.test": ["10.200.0.2"]}[host]}


def test_quic_to_an_allowed_host_needs_a_udp_cidr_rule(sandbox: Sandbox, world: World) -> None:
    assert sandbox.reach("udp", "10.200.0.2", 443)  # the attack works without rules
    with net.attach(plan(corral=QUIC_HOST), pid=sandbox.pid, proxy_options=ANSWERS):
        assert not sandbox.reach("udp", "10.200.0.2", 443)
        assert not sandbox.reach("udp", "fd00:200::2", 443)
    udp443 = rule("10.200.0.0/24", ports=(PortSpec("udp", 443, None),))
    with net.attach(
        plan(allow=(udp443,), corral=QUIC_HOST), pid=sandbox.pid, proxy_options=ANSWERS
    ):
        assert sandbox.reach("udp", "10.200.0.2", 443)
        assert not sandbox.reach("tcp", "10.200.0.2", 443)  # TCP still only via the proxy
