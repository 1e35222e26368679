"""Corral's DNS stub: only names the host rules allow, answered from the proxy's pins, and
every port-53 query of the sandbox redirected to it. No real name is ever resolved: the
proxy gets a static test resolver."""

from __future__ import annotations

import subprocess
from typing import Any

import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest
from nettestbed import PYTHON, Sandbox, World
from test_net_rules import plan

from corral import net
from corral.contract.extensions import build_corral_section
from corral.net.policy_proxy import PolicyProxy, not_local

pytestmark = pytest.mark.timeout(30)
HOSTS = {"allow": [{"host": "api.test"}, {"host": "*.cdn.test"}, {"host": "rebind.test"}]}


def make_proxy(answers: dict[str, list[str]], events: list[dict[str, Any]]) -> PolicyProxy:
    proxy = PolicyProxy(
        build_corral_section({"network": {"hosts": HOSTS}}).network,
        audit=events.append,
        resolver=lambda host, port: answers[host],
        address_ok=not_local,
    )
    proxy.start()
    return proxy


def ask(port: int, name: str, rdtype: str = "A", tcp: bool = False) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    if tcp:
        return dns.query.tcp(query, "127.0.0.1", port=port, timeout=3)
    return dns.query.udp(query, "127.0.0.1", port=port, timeout=3)


def addresses(reply: dns.message.Message) -> list[str]:
    return sorted(r.to_text() for rrset in reply.answer for r in rrset)


def test_only_allowed_names_are_answered_from_the_pins() -> None:
    answers = {"api.test": ["192.0.2.10", "2001:db8::10"], "a.cdn.test": ["192.0.2.20"]}
    answers["rebind.test"] = ["127.0.0.1"]
    events: list[dict[str, Any]] = []
    proxy = make_proxy(answers, events)
    try:
        assert addresses(ask(proxy.dns_port, "api.test")) == ["192.0.2.10"]
        assert addresses(ask(proxy.dns_port, "API.test.", "AAAA", tcp=True)) == ["2001:db8::10"]
        assert addresses(ask(proxy.dns_port, "a.cdn.test")) == ["192.0.2.20"]
        for denied in ("cdn.test", "evil.test", "api.test.evil.test"):
            assert ask(proxy.dns_port, denied).rcode() == dns.rcode.REFUSED
        assert ask(proxy.dns_port, "rebind.test").rcode() == dns.rcode.REFUSED  # loopback
        mx = ask(proxy.dns_port, "api.test", "MX")
        assert mx.rcode() == dns.rcode.NOERROR and not mx.answer
        answers["api.test"] = ["198.51.100.66"]  # a later, different answer is never used
        assert addresses(ask(proxy.dns_port, "api.test")) == ["192.0.2.10"]
        assert not ask(proxy.dns_port, "api.test").flags & dns.flags.RA
        proxy.replace_rules(build_corral_section({"network": {"hosts": {}}}).network)
        assert ask(proxy.dns_port, "api.test").rcode() == dns.rcode.REFUSED  # hot reload
    finally:
        proxy.stop()
    assert {e["decision"] for e in events if e["event"] == "network.dns"} == {"allow", "deny"}


_SANDBOX_QUERY = """
import sys, dns.message, dns.query, dns.rcode
server, name, tcp = sys.argv[1], sys.argv[2], sys.argv[3] == "tcp"
query = dns.message.make_query(name, "A")
ask = dns.query.tcp if tcp else dns.query.udp
reply = ask(query, server, timeout=3)
print(dns.rcode.to_text(reply.rcode()), *sorted(r.to_text() for s in reply.answer for r in s))
"""


def test_every_sandbox_query_reaches_corrals_stub(sandbox: Sandbox, world: World) -> None:
    """The world's port 53 answers anything that is not DNS; slirp's forwarder would ask
    the host's resolvers. Both are replaced by the stub: the policy decides every answer."""
    corral = {"hosts": {"allow": [{"host": "api.test"}]}}
    options = {"resolver": lambda host, port: {"api.test": ["10.200.0.2"]}[host]}
    with net.attach(plan(corral=corral), pid=sandbox.pid, proxy_options=options):
        for server in ("10.0.2.3", "10.200.0.2"):
            for proto in ("udp", "tcp"):
                for name, expected in (("api.test", "NOERROR 10.200.0.2"), ("x.test", "REFUSED")):
                    cmd = sandbox.enter(PYTHON, "-c", _SANDBOX_QUERY, server, name, proto)
                    out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
                    assert out.stdout.strip() == expected, (server, proto, name, out.stderr)
        assert not sandbox.reach("udp", "fd00:200::2", 53)  # no DNS side door over IPv6
