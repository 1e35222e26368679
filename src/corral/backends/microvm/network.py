"""The guest's network: what a micro-VM can enforce of the plan, and through which mechanism.

The guest's NIC is QEMU's user-mode network (qemu.py), so each guest connection is a socket
that QEMU opens in its own network namespace; corral.net installs the plan's nftables table
there and links the namespace to the host with slirp4netns, exactly as for a process sandbox.
Address chain, from the guest: the guest is 10.0.3.15 behind QEMU (10.0.3.2); QEMU is 10.0.2.100
behind slirp4netns, whose 10.0.2.2 is the host's loopback and 10.0.2.3 its DNS forwarder. A guest
connection to 10.0.2.2:P becomes QEMU's connect(10.0.2.2:P), judged by `ingress.hostLoopback`,
then slirp4netns's connect(127.0.0.1:P) on the host. A published port goes the other way:
host 127.0.0.1:H -> slirp4netns -> QEMU's namespace port S (the nftables input chain admits it)
-> QEMU's `hostfwd` listener -> guest port S.
"""

from __future__ import annotations

from collections.abc import Mapping

from corral.contract.extensions import build_corral_section
from corral.errors import BackendUnavailableError, PolicyError
from corral.plan import NetworkPlan

UNPRIVILEGED_PORTS = 1024
# corral.net's mechanisms the plan names for network clauses, and what they mean in a VM.
_FROM_HOST = {
    "nftables": "nftables table in QEMU's network namespace: judges every connection the "
    "guest makes (QEMU's user-mode network turns each into a socket of QEMU)",
    "user-mode-networking": "guest NIC on QEMU's user-mode network (10.0.3.15), QEMU's "
    "namespace linked to the host by slirp4netns (10.0.2.2 = host loopback)",
    "proxy-only-network": "nftables in QEMU's namespace: only the proxy's port on the host "
    "loopback",
    "policy-proxy": "Corral's HTTP(S) proxy on the host loopback, reached through 10.0.2.2",
}


def mechanisms() -> dict[str, str]:
    """The network mechanisms this host offers a micro-VM (corral.net's probe, re-described)."""
    try:
        from corral import net
    except ImportError:
        return {}
    offered = net.probe()
    return {name: detail for name, detail in _FROM_HOST.items() if name in offered}


def check(plan: NetworkPlan, offered: Mapping[str, str]) -> None:
    """Refuse what a VM cannot enforce (fail closed, before anything starts)."""
    if plan.mode == "none":
        return
    missing = [m for m in ("nftables", "user-mode-networking") if m not in offered]
    if missing:
        raise BackendUnavailableError(
            f"network rules in a micro-VM need {' and '.join(missing)}, unusable on this host",
            details={"mechanism": missing[0]},
            remediation="apt-get install nftables slirp4netns; make /dev/net/tun usable "
            "(scripts/setup.sh)",
        )
    low = [p for _, p in forwards(plan) if p < UNPRIVILEGED_PORTS]
    if low:
        raise PolicyError(
            f"a micro-VM cannot publish guest port {low[0]}: QEMU runs unprivileged and cannot "
            f"listen below {UNPRIVILEGED_PORTS}",
            remediation=f"use sandboxPort {UNPRIVILEGED_PORTS} or above for microvm",
        )


def forwards(plan: NetworkPlan) -> tuple[tuple[str, int], ...]:
    """(protocol, guest port) of each published port: slirp4netns forwards the host's port to
    that port of QEMU's namespace, where QEMU listens and forwards it to the guest."""
    if plan.mode == "none" or not plan.corral.get("publish"):
        return ()
    section = build_corral_section({"network": plan.corral}).network
    return tuple((p.protocol, p.sandbox_port) for p in section.publish)
