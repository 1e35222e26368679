"""The proposed policy: the request as written plus the least grants the denials call for,
as an MXC-shaped JSON document, and the unified diff a person reviews."""

from __future__ import annotations

import copy
import difflib
import ipaddress
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from corral.learn.analyse import Denial
from corral.learn.observe import NetAccess
from corral.policy.filesystem import is_within


@dataclass(frozen=True)
class Grants:
    readonly: tuple[str, ...]
    readwrite: tuple[str, ...]
    host_loopback: bool
    egress: tuple[tuple[str, str, int], ...]  # (cidr, protocol, port)


def minimal_grants(denials: Iterable[Denial]) -> Grants:
    """Proposed grants without redundancy: nothing inside a read-write grant, nothing
    read-only inside another read-only grant."""
    ro: set[str] = set()
    rw: set[str] = set()
    loopback = False
    egress: set[tuple[str, str, int]] = set()
    for d in denials:
        if d.verdict != "propose":
            continue
        if isinstance(d.access, NetAccess):
            if d.note == "host loopback":
                loopback = True
            else:
                ip = ipaddress.ip_address(d.access.address)
                egress.add((f"{ip}/{ip.max_prefixlen}", d.access.protocol, d.access.port))
        elif d.grant is not None:
            (rw if d.grant_access == "rw" else ro).add(d.grant)
    rw_kept = {p for p in rw if not any(q != p and is_within(p, q) for q in rw)}
    ro_kept = {
        p
        for p in ro
        if not any(is_within(p, q) for q in rw_kept)
        and not any(q != p and is_within(p, q) for q in ro)
    }
    return Grants(tuple(sorted(ro_kept)), tuple(sorted(rw_kept)), loopback, tuple(sorted(egress)))


def propose(raw: Mapping[str, Any], grants: Grants, *, cwd: str | None = None) -> dict[str, Any]:
    """``raw`` (the wire request) with ``grants`` added; ``cwd`` pins the working directory
    the learning run used when the grants would otherwise change Corral's choice."""
    doc = copy.deepcopy(dict(raw))
    if grants.readonly or grants.readwrite:
        fs = doc.setdefault("filesystem", {})
        rw_real = {os.path.realpath(p) for p in grants.readwrite}
        if rw_real and "readonlyPaths" in fs:  # a path read-only and read-write stays read-only
            fs["readonlyPaths"] = [
                p for p in fs["readonlyPaths"] if os.path.realpath(p) not in rw_real
            ]
        _extend(fs, "readonlyPaths", grants.readonly)
        _extend(fs, "readwritePaths", grants.readwrite)
    if grants.host_loopback or grants.egress:
        net = doc.setdefault("network", {})
        if grants.host_loopback:
            net.setdefault("ingress", {})["hostLoopback"] = "allow"
        if grants.egress:
            allow = net.setdefault("egress", {}).setdefault("allow", [])
            for cidr, protocol, port in grants.egress:
                ports = (
                    [{"protocol": protocol, "port": port}]
                    if protocol != "any"
                    else [{"port": port}]
                )
                allow.append({"to": [{"cidr": cidr}], "ports": ports})
    if cwd is not None:
        doc.setdefault("process", {})["cwd"] = cwd
    return doc


def _extend(section: dict[str, Any], key: str, paths: Iterable[str]) -> None:
    current = section.setdefault(key, [])
    known = {os.path.realpath(p) for p in current}
    current.extend(p for p in paths if os.path.realpath(p) not in known)
    if not current:
        del section[key]


def to_json(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, indent=2) + "\n"


def unified_diff(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    old_name: str = "requested",
    new_name: str = "proposed",
) -> str:
    """A reviewable diff of two policies, both rendered the same way."""
    return "".join(
        difflib.unified_diff(
            to_json(old).splitlines(keepends=True),
            to_json(new).splitlines(keepends=True),
            old_name,
            new_name,
        )
    )
