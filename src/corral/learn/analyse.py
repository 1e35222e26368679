"""Which observed accesses the requested policy would have refused, and the least grant that
would have allowed each. Pure apart from looking at the host's files (existence, type).

Grants are as narrow as the access: a file read grants that file (never its directory,
where a neighbouring secret may live); a directory listed grants that directory; a file
written in place grants that file read-write; creating, removing or renaming a name grants
its directory read-write (the nearest one that exists on the host).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from corral.contract.model import NetworkRule, NetworkSpec
from corral.learn.observe import Access, FsAccess, NetAccess
from corral.net import addresses
from corral.policy.filesystem import FilesystemPolicy, PathEntry, is_within

# What stops a refused access from being proposed: ``propose`` (nothing, it is proposed),
# ``request`` (the request denies it explicitly), ``admin`` (the admin policy forbids it),
# ``protected`` (a file the host later executes), ``proxy`` (the request routes all traffic
# through its proxy).
Verdict = Literal["propose", "request", "admin", "protected", "proxy"]
ALWAYS_PROVIDED = ("/proc", "/dev")  # the sandbox's own /proc and device nodes
PRIVATE_TMP = "/tmp"


@dataclass(frozen=True)
class Denial:
    """One access the requested policy would have refused."""

    access: Access
    verdict: Verdict
    grant: str | None = None  # for filesystem: the path to grant
    grant_access: Literal["ro", "rw"] | None = None
    note: str = ""


@dataclass(frozen=True)
class Enforced:
    """What the requested policy enforces, as the analysis needs it."""

    filesystem: FilesystemPolicy
    network: NetworkSpec
    private_tmp: bool
    network_proxy: str | None = None
    never_grant: tuple[str, ...] = ()  # admin neverGrantPaths, resolved
    never_allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    admin_denied: tuple[str, ...] = ()  # paths the admin policy denied, resolved
    secrets: tuple[str, ...] = ()  # credentials hidden while learning, never proposed


def analyse(accesses: Iterable[Access], enforced: Enforced) -> list[Denial]:
    """The distinct refused accesses, in the order first seen."""
    seen: set[tuple[object, ...]] = set()
    out: list[Denial] = []
    for access in accesses:
        denial = (
            _filesystem(access, enforced)
            if isinstance(access, FsAccess)
            else _network(access, enforced)
        )
        if denial is None:
            continue
        key = (
            (denial.verdict, denial.grant, denial.grant_access)
            if denial.grant
            else (denial.verdict, denial.access)
        )
        if key not in seen:
            seen.add(key)
            out.append(denial)
    return out


# --- filesystem ----------------------------------------------------------------------------


def _filesystem(access: FsAccess, enforced: Enforced) -> Denial | None:
    if access.op == "entry":  # the name itself, never what a symlink of that name points to
        path = os.path.join(
            os.path.realpath(os.path.dirname(access.path)), os.path.basename(access.path)
        )
    else:
        path = os.path.realpath(access.path)
    if any(is_within(path, p) for p in ALWAYS_PROVIDED):
        return None
    exists = os.path.lexists(path)
    if access.op == "entry" or (access.op == "write" and access.creates and not exists):
        return _entry(access, path, enforced)
    if not exists:
        return None  # fails the same way under enforcement: nothing to grant
    entry = _covering(enforced.filesystem, path)  # a host file under /tmp needs one too
    if access.op == "write":
        if entry is not None and entry.access == "rw":
            return None
        return _propose(access, path, "rw", entry, enforced)
    if entry is not None and entry.access in ("ro", "rw"):
        return None
    return _propose(access, path, "ro", entry, enforced)


def _entry(access: FsAccess, path: str, enforced: Enforced) -> Denial | None:
    """A name created, removed or renamed: needs its directory read-write."""
    parent = os.path.dirname(path)
    directory = parent
    while not os.path.isdir(directory):
        directory = os.path.dirname(directory)
    entry = _covering(enforced.filesystem, directory)
    if entry is None and enforced.private_tmp and is_within(directory, PRIVATE_TMP):
        return None  # the sandbox's private /tmp takes it
    target = _covering(enforced.filesystem, path)
    if entry is not None and entry.access == "rw" and target is not None and target.access == "rw":
        return None
    note = (
        "" if directory == parent else f"{parent} is missing; {directory} is granted to create it"
    )
    return _propose(access, directory, "rw", target, enforced, note)


def _propose(
    access: FsAccess,
    grant: str,
    wanted: Literal["ro", "rw"],
    entry: PathEntry | None,
    enforced: Enforced,
    note: str = "",
) -> Denial | None:
    if entry is not None and entry.access == "deny":
        verdict: Verdict = "admin" if entry.path in enforced.admin_denied else "request"
        who = (
            "needs admin: denied by the admin policy"
            if verdict == "admin"
            else "the request denies it"
        )
        return Denial(access, verdict, entry.path, wanted, who)
    if entry is not None and entry.origin in ("protected", "protected-placeholder"):
        return Denial(access, "protected", grant, wanted, "protected persistence file")
    if any(grant == s or grant.startswith(s.rstrip("/") + "/") for s in enforced.secrets):
        note = "a credential: never proposed; grant it explicitly if the workload needs it"
        return Denial(access, "protected", grant, wanted, note)
    forbidden = next((f for f in enforced.never_grant if _overlaps(grant, f)), None)
    if forbidden is not None:
        return Denial(access, "admin", grant, wanted, f"needs admin: neverGrantPaths {forbidden}")
    if not os.access(grant, os.R_OK | (os.W_OK if wanted == "rw" else 0)):
        return None  # the host refuses the calling user too: no grant can help
    return Denial(access, "propose", grant, wanted, note)


def _overlaps(grant: str, forbidden: str) -> bool:
    return is_within(grant, forbidden) or is_within(forbidden, grant)


def _covering(fs: FilesystemPolicy, path: str) -> PathEntry | None:
    best: PathEntry | None = None
    for entry in fs.entries:
        if is_within(path, entry.path) and (best is None or len(entry.path) > len(best.path)):
            best = entry
    return best


# --- network -------------------------------------------------------------------------------

_HOST_LOOPBACK = {addresses.HOST_LOOPBACK_V4, addresses.HOST_LOOPBACK_V6}


def _network(access: NetAccess, enforced: Enforced) -> Denial | None:
    ip = ipaddress.ip_address(access.address)
    if ip.is_loopback or ip.is_unspecified:
        return None  # the sandbox's own loopback
    if enforced.network_proxy is not None:
        return Denial(access, "proxy", note="the request sends all traffic through its proxy")
    spec = enforced.network
    if str(ip) in _HOST_LOOPBACK:
        if spec.ingress.host_loopback == "allow":
            return None
        return Denial(access, "propose", note="host loopback")
    if any(ip in net for net in enforced.never_allow):
        return Denial(access, "admin", note="needs admin: neverAllowCidrs")
    if any(_matches(rule, ip, access) for rule in spec.egress.deny):
        return Denial(access, "request", note="denied by the request's egress.deny")
    if spec.egress.default == "allow" or any(_matches(r, ip, access) for r in spec.egress.allow):
        return None
    return Denial(access, "propose")


def _matches(
    rule: NetworkRule, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, access: NetAccess
) -> bool:
    if rule.to is not None and not any(
        ip in ipaddress.ip_network(peer.cidr)
        and not any(ip in ipaddress.ip_network(x) for x in peer.except_cidrs)
        for peer in rule.to
        if ipaddress.ip_network(peer.cidr).version == ip.version
    ):
        return False
    if rule.ports is None:
        return True
    return any(
        p.protocol in ("any", access.protocol)
        and (p.port is None or p.port <= access.port <= (p.end_port or p.port))
        for p in rule.ports
    )
