"""The admin policy: strict loading from a trusted file, and clamps no request can loosen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from corral.contract.model import Request
from corral.contract.parse import parse_request
from corral.errors import CorralError, ErrorCode, PolicyError
from corral.policy import admin as admin_module
from corral.policy.admin import AdminPolicy

NOBODY = 65534


def request(**fields: Any) -> Request:
    return parse_request({"version": "1.0.0", "process": {"commandLine": "true"}, **fields})


def policy(narrow: bool = False, **fields: Any) -> AdminPolicy:
    doc = {"version": 1, **fields}
    if narrow:
        doc["onViolation"] = "narrow"
    return AdminPolicy.from_dict(doc, source="/etc/corral/admin.json")


def write_policy(path: Path, **fields: Any) -> str:
    path.write_text(json.dumps({"version": 1, **fields}))
    path.chmod(0o644)
    return str(path)


@pytest.fixture
def no_system_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    system = tmp_path / "etc-corral" / "admin.json"
    monkeypatch.setattr(admin_module, "SYSTEM_PATH", str(system))
    monkeypatch.delenv("CORRAL_ADMIN_POLICY", raising=False)
    return system


# --- loading -------------------------------------------------------------------------------


def test_no_file_means_no_policy(no_system_file: Path) -> None:
    assert AdminPolicy.load() is None


def test_system_file_is_loaded(no_system_file: Path) -> None:
    no_system_file.parent.mkdir(mode=0o755)
    write_policy(no_system_file, maxTimeoutMs=5000)
    loaded = AdminPolicy.load()
    assert loaded is not None and loaded.max_timeout_ms == 5000
    assert loaded.source == str(no_system_file) and not loaded.source_from_env


def test_env_var_is_used_and_flagged(
    no_system_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "test-admin.json"
    write_policy(other, learningMode="deny")
    other.chmod(0o666)  # no trust checks for the test variable...
    monkeypatch.setenv("CORRAL_ADMIN_POLICY", str(other))
    loaded = AdminPolicy.load()
    assert loaded is not None and loaded.source_from_env and loaded.learning_mode == "deny"


def test_env_var_cannot_replace_an_installed_policy(
    no_system_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_system_file.parent.mkdir(mode=0o755)
    write_policy(no_system_file, maxTimeoutMs=1000)
    permissive = tmp_path / "permissive.json"
    write_policy(permissive)
    monkeypatch.setenv("CORRAL_ADMIN_POLICY", str(permissive))  # an agent's attempt
    loaded = AdminPolicy.load()
    assert loaded is not None and loaded.max_timeout_ms == 1000 and not loaded.source_from_env


def test_env_var_naming_a_missing_file_fails_closed(
    no_system_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_ADMIN_POLICY", str(tmp_path / "absent.json"))
    with pytest.raises(PolicyError, match="cannot read the admin policy"):
        AdminPolicy.load()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: os.chown(f, NOBODY, -1), "owned by uid 65534"),
        (lambda f: f.chmod(0o664), "group- or world-writable"),
        (lambda f: f.chmod(0o646), "group- or world-writable"),
        (lambda f: f.parent.chmod(0o777), "writable by a user other than root"),
        (lambda f: os.chown(f.parent, NOBODY, -1), "writable by a user other than root"),
    ],
)
def test_an_untrusted_file_is_refused(tmp_path: Path, damage: Any, message: str) -> None:
    directory = tmp_path / "etc"
    directory.mkdir(mode=0o755)
    path = directory / "admin.json"
    write_policy(path)
    assert AdminPolicy.load(str(path)) is not None  # trusted as written
    damage(path)
    with pytest.raises(PolicyError, match=message):
        AdminPolicy.load(str(path))


def test_a_symlinked_policy_file_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    write_policy(real)
    link = tmp_path / "admin.json"
    link.symlink_to(real)
    with pytest.raises(PolicyError, match="cannot read"):
        AdminPolicy.load(str(link))


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"version": 2}, "version"),
        ({}, "version"),
        ({"version": 1, "neverGrantPath": []}, "neverGrantPath"),
        ({"version": 1, "neverGrantPaths": "/root"}, "neverGrantPaths"),
        ({"version": 1, "neverGrantPaths": ["relative"]}, "neverGrantPaths[0]"),
        ({"version": 1, "neverAllowCidrs": ["10.0.0.1/8"]}, "neverAllowCidrs[0]"),
        ({"version": 1, "maxTimeoutMs": True}, "maxTimeoutMs"),
        ({"version": 1, "maxTimeoutMs": -1}, "maxTimeoutMs"),
        ({"version": 1, "maxResources": {"memory": 5}}, "maxResources.memory"),
        ({"version": 1, "maxResources": {"pids": "10"}}, "maxResources.pids"),
        ({"version": 1, "allowedContainments": ["dockr"]}, "allowedContainments[0]"),
        ({"version": 1, "learningMode": "maybe"}, "learningMode"),
        ({"version": 1, "mandatoryAudit": 1}, "mandatoryAudit"),
        ({"version": 1, "onViolation": "warn"}, "onViolation"),
        ([], ""),
    ],
)
def test_strict_parsing_names_the_field(doc: Any, field: str) -> None:
    with pytest.raises(PolicyError) as caught:
        AdminPolicy.from_dict(doc)
    assert caught.value.code == ErrorCode.POLICY_VALIDATION
    assert caught.value.details["field"] == field


def test_invalid_json_is_a_policy_error(tmp_path: Path) -> None:
    path = tmp_path / "admin.json"
    path.write_text("{not json")
    with pytest.raises(PolicyError, match="not valid JSON"):
        AdminPolicy.load(str(path))


# --- filesystem ----------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path) -> Path:
    (tmp_path / "home" / "alice" / ".ssh").mkdir(parents=True)
    (tmp_path / "home" / "alice" / ".ssh" / "id_ed25519").write_text("secret")
    (tmp_path / "home" / "alice" / "src").mkdir()
    return tmp_path / "home"


def test_never_grant_refuses_at_under_and_above(home: Path) -> None:
    ssh = str(home / "alice" / ".ssh")
    admin = policy(neverGrantPaths=[ssh])
    for grant in (ssh, f"{ssh}/id_ed25519", str(home)):
        for key in ("readonlyPaths", "readwritePaths"):
            with pytest.raises(PolicyError, match="neverGrantPaths") as caught:
                admin.clamp(request(filesystem={key: [grant]}))
            assert caught.value.details == {
                "clause": "neverGrantPaths",
                "adminPolicy": "/etc/corral/admin.json",
            }
    unrelated = request(filesystem={"readwritePaths": [str(home / "alice" / "src")]})
    assert admin.clamp(unrelated).request == unrelated


def test_never_grant_sees_through_symlinks(home: Path, tmp_path: Path) -> None:
    link = tmp_path / "innocent"
    link.symlink_to(home / "alice" / ".ssh")
    admin = policy(neverGrantPaths=[str(home / "alice" / ".ssh")])
    with pytest.raises(PolicyError):
        admin.clamp(request(filesystem={"readonlyPaths": [str(link)]}))


def test_never_grant_narrows_when_told(home: Path) -> None:
    ssh = str(home / "alice" / ".ssh")
    admin = policy(narrow=True, neverGrantPaths=[ssh])
    result = admin.clamp(
        request(filesystem={"readonlyPaths": [f"{ssh}/id_ed25519"], "readwritePaths": [str(home)]})
    )
    fs = result.request.filesystem
    assert fs.readonly_paths == () and fs.readwrite_paths == (str(home),)
    assert fs.denied_paths == (ssh,)
    assert [(a.clause, a.action) for a in result.applied] == [("neverGrantPaths", "narrowed")] * 2


def test_a_grant_above_that_already_denies_is_fine(home: Path) -> None:
    ssh = str(home / "alice" / ".ssh")
    asked = request(filesystem={"readwritePaths": [str(home)], "deniedPaths": [ssh]})
    assert policy(neverGrantPaths=[ssh]).clamp(asked).request == asked


def test_always_deny_is_added(home: Path) -> None:
    secret = str(home / "alice" / ".ssh")
    result = policy(alwaysDenyPaths=[secret]).clamp(request())
    assert result.request.filesystem.denied_paths == (secret,)
    assert result.applied[0].clause == "alwaysDenyPaths" and result.applied[0].action == "added"


_BIND_ATTACK = r"""
import json, subprocess, sys
from corral.contract.parse import parse_request
from corral.policy.admin import AdminPolicy
home, view, key = sys.argv[1:4]
subprocess.run(["mount", "--bind", home, view], check=True)
print(open(view + "/alice/.ssh/id_ed25519").read() == "secret")  # the alias really exposes it
req = parse_request({"version": "1.0.0", "process": {"commandLine": "true"},
                     "filesystem": {key: [view]}})
ssh = home + "/alice/.ssh"
for mode in ("refuse", "narrow"):
    admin = AdminPolicy.from_dict({"version": 1, "neverGrantPaths": [ssh], "onViolation": mode})
    try:
        print(list(admin.clamp(req).request.filesystem.denied_paths))
    except Exception as exc:
        print(type(exc).__name__)
always = AdminPolicy.from_dict({"version": 1, "alwaysDenyPaths": [ssh]})
print(list(always.clamp(req).request.filesystem.denied_paths))
"""


@pytest.mark.timeout(30)
@pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")
def test_a_bind_mounted_alias_of_a_parent_is_caught(home: Path, tmp_path: Path) -> None:
    view = tmp_path / "view"
    view.mkdir()
    command = ["unshare", "--mount", "--propagation", "private", sys.executable, "-c"]
    out = subprocess.run(
        [*command, _BIND_ATTACK, str(home), str(view), "readonlyPaths"],
        capture_output=True,
        text=True,
        check=True,
        timeout=25,
    ).stdout.splitlines()
    ssh = str(home / "alice" / ".ssh")
    assert out[0] == "True"
    assert out[1] == "PolicyError"
    assert json.loads(out[2].replace("'", '"')) == [f"{view}/alice/.ssh"]
    assert json.loads(out[3].replace("'", '"')) == [ssh, f"{view}/alice/.ssh"]


# --- network -------------------------------------------------------------------------------


def egress(**fields: Any) -> dict[str, Any]:
    return {"egress": {"default": "deny", **fields}}


@pytest.mark.parametrize(
    "net",
    [
        {"egress": {"default": "allow"}},
        egress(allow=[{}]),  # every destination
        egress(allow=[{"to": [{"cidr": "10.0.0.0/8"}]}]),  # a supernet
        egress(allow=[{"to": [{"cidr": "10.1.2.0/24"}], "ports": [{"port": 443}]}]),  # inside
        egress(allow=[{"to": [{"cidr": "0.0.0.0/0", "except": ["10.0.0.0/9"]}]}]),
        egress(allow=[{"to": [{"cidr": "::ffff:0:0/96"}]}]),  # IPv4-mapped IPv6
    ],
)
def test_never_allow_cidrs_refuses_overlapping_egress(net: dict[str, Any]) -> None:
    admin = policy(neverAllowCidrs=["10.0.0.0/8", "fd00::/8"])
    with pytest.raises(PolicyError, match="neverAllowCidrs"):
        admin.clamp(request(network=net))
    narrowed = policy(narrow=True, neverAllowCidrs=["10.0.0.0/8", "fd00::/8"]).clamp(
        request(network=net)
    )
    denied = {p.cidr for rule in narrowed.request.network.egress.deny for p in rule.to or ()}
    assert denied & {"10.0.0.0/8", "::ffff:a00:0/104", "fd00::/8"}
    assert all(a.clause == "neverAllowCidrs" for a in narrowed.applied)


@pytest.mark.parametrize(
    "net",
    [
        egress(),
        egress(allow=[{"to": [{"cidr": "192.168.0.0/16"}]}]),
        egress(allow=[{"to": [{"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}]}]),
        {"egress": {"default": "allow", "deny": [{"to": [{"cidr": "10.0.0.0/7"}]}]}},
    ],
)
def test_egress_that_cannot_reach_the_cidr_is_untouched(net: dict[str, Any]) -> None:
    asked = request(network=net)
    assert policy(neverAllowCidrs=["10.0.0.0/8"]).clamp(asked).request == asked


def test_ipv6_cidrs(tmp_path: Path) -> None:
    admin = policy(neverAllowCidrs=["fd00::/8"])
    with pytest.raises(PolicyError):
        admin.clamp(request(network=egress(allow=[{"to": [{"cidr": "::/0"}]}])))
    ok = request(network=egress(allow=[{"to": [{"cidr": "2001:db8::/32"}]}]))
    assert admin.clamp(ok).request == ok


# --- timeout, resources, containment -------------------------------------------------------


def test_timeout_is_added_refused_or_narrowed() -> None:
    added = policy(maxTimeoutMs=5000).clamp(request())
    assert added.request.process is not None and added.request.process.timeout_ms == 5000
    assert added.applied[0].action == "added"
    long = {"commandLine": "true", "timeout": 60000}
    with pytest.raises(PolicyError, match="maxTimeoutMs"):
        policy(maxTimeoutMs=5000).clamp(request(process=long))
    narrowed = policy(narrow=True, maxTimeoutMs=5000).clamp(request(process=long))
    assert narrowed.request.process is not None and narrowed.request.process.timeout_ms == 5000
    short = request(process={"commandLine": "true", "timeout": 100})
    assert policy(maxTimeoutMs=5000).clamp(short).request == short


def test_resources_are_added_refused_or_narrowed() -> None:
    limits = {"memoryMb": 512, "pids": 64, "cpuPercent": 100}
    added = policy(maxResources=limits).clamp(request())
    res = added.request.corral.resources
    assert (res.memory_mb, res.pids, res.cpu_percent) == (512, 64, 100)
    greedy = {"resources": {"memoryMb": 4096, "pids": 10}}
    with pytest.raises(PolicyError, match=r"maxResources\.memoryMb"):
        policy(maxResources=limits).clamp(request(corral=greedy))
    narrowed = policy(narrow=True, maxResources=limits).clamp(request(corral=greedy))
    res = narrowed.request.corral.resources
    assert (res.memory_mb, res.pids, res.cpu_percent) == (512, 10, 100)


def test_containment_outside_the_allowed_list_is_refused() -> None:
    admin = policy(narrow=True, allowedContainments=["microvm"])
    with pytest.raises(PolicyError, match="allowedContainments"):
        admin.clamp(request())  # no containment means 'process'
    with pytest.raises(PolicyError, match="allowedContainments"):
        admin.clamp(request(containment="bubblewrap"))


def test_learning_and_audit_switches() -> None:
    with pytest.raises(PolicyError, match="learningMode"):
        policy(learningMode="deny").check_learning()
    policy().check_learning()
    with pytest.raises(PolicyError, match="mandatoryAudit"):
        policy(mandatoryAudit=True).check_audit(enabled=False)
    policy(mandatoryAudit=True).check_audit(enabled=True)


# --- protected paths and the request's own fields ------------------------------------------


def test_relaxing_protected_paths_needs_the_admin() -> None:
    relaxing = request(corral={"protectedPaths": {"relax": ["/work/repo/.venv/bin"]}})
    with pytest.raises(PolicyError, match="allowRelaxProtectedPaths"):
        policy().clamp(relaxing)
    ignored = policy(narrow=True).clamp(relaxing)
    assert ignored.request.corral.protected_paths.relax == ()
    allowed = policy(allowRelaxProtectedPaths=True).clamp(relaxing)
    assert allowed.request.corral.protected_paths.relax == ("/work/repo/.venv/bin",)


def test_admin_protected_paths_are_added() -> None:
    asked = request(corral={"protectedPaths": {"add": ["/work/repo/tools"]}})
    result = policy(protectedPaths=[".tool-versions"]).clamp(asked)
    assert result.request.corral.protected_paths.add == ("/work/repo/tools", ".tool-versions")


@pytest.mark.parametrize(
    "corral",
    [
        {"adminPolicy": "/tmp/permissive.json"},
        {"admin": {"maxTimeoutMs": 10**9}},
        {"protectedPaths": {"allowRelax": True}},
        {"onViolation": "narrow"},
    ],
)
def test_a_request_cannot_name_or_loosen_the_admin_policy(corral: dict[str, Any]) -> None:
    with pytest.raises(CorralError):
        request(corral=corral)


def test_clamp_is_idempotent(home: Path) -> None:
    admin = policy(
        narrow=True,
        neverGrantPaths=[str(home / "alice" / ".ssh")],
        alwaysDenyPaths=["/etc/shadow"],
        neverAllowCidrs=["10.0.0.0/8"],
        maxTimeoutMs=1000,
        maxResources={"pids": 5},
    )
    once = admin.clamp(
        request(
            filesystem={"readwritePaths": [str(home)]}, network={"egress": {"default": "allow"}}
        )
    )
    twice = admin.clamp(once.request)
    assert twice.request == once.request
    assert all(a.action != "narrowed" for a in twice.applied)
