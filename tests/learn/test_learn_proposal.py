"""The analysis and the proposal without a sandbox: accesses in, least grants out; the diff
and the CLI that shows it."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from corral.contract import parse_request
from corral.contract.model import EgressSpec, NetworkRule, NetworkSpec, PeerSpec, PortSpec
from corral.learn import cli
from corral.learn.analyse import Enforced, analyse
from corral.learn.observe import FsAccess, NetAccess
from corral.learn.proposal import minimal_grants, propose, unified_diff
from corral.policy.filesystem import FilesystemPolicy, PathEntry

ORACLE = "/work/shared/mxc/oracle"


@pytest.fixture
def tree(tmp_path: Any) -> Iterator[str]:
    root = str(tmp_path)
    for d in ("proj/src", "home/.config/tool", "home/.cache"):
        os.makedirs(f"{root}/{d}")
    for f in (
        "proj/src/a.py",
        "proj/src/b.py",
        "home/.config/tool/c.toml",
        "home/.config/tool/key",
    ):
        with open(f"{root}/{f}", "w") as fh:
            fh.write("x")
    yield root


def _enforced(*entries: PathEntry, network: NetworkSpec | None = None, **kw: Any) -> Enforced:
    return Enforced(
        FilesystemPolicy(entries, ()), network or NetworkSpec(), private_tmp=False, **kw
    )


def test_a_file_read_grants_that_file_not_its_neighbours(tree: str) -> None:
    config = f"{tree}/home/.config/tool/c.toml"
    denials = analyse([FsAccess(config, "read", "openat")], _enforced())
    grants = minimal_grants(denials)
    assert grants.readonly == (config,) and grants.readwrite == ()


def test_reads_inside_a_written_directory_fold_into_its_grant(tree: str) -> None:
    src = f"{tree}/proj/src"
    accesses = [
        FsAccess(f"{src}/a.py", "read", "openat"),
        FsAccess(src, "list", "openat"),
        FsAccess(f"{src}/new.py", "write", "openat", creates=True),
        FsAccess(f"{src}/b.py", "exec", "execve"),
    ]
    grants = minimal_grants(analyse(accesses, _enforced()))
    assert grants.readwrite == (src,) and grants.readonly == ()


def test_accesses_the_request_already_allows_are_not_denials(tree: str) -> None:
    src = f"{tree}/proj/src"
    enforced = _enforced(PathEntry(src, "ro", src, True))
    assert analyse([FsAccess(f"{src}/a.py", "read", "openat")], enforced) == []
    [denial] = analyse([FsAccess(f"{src}/a.py", "write", "openat")], enforced)
    assert (denial.grant, denial.grant_access) == (f"{src}/a.py", "rw")


def test_missing_paths_read_need_nothing_but_creating_them_needs_the_nearest_dir(tree: str) -> None:
    assert analyse([FsAccess(f"{tree}/home/nope.toml", "read", "openat")], _enforced()) == []
    [denial] = analyse(
        [FsAccess(f"{tree}/home/.cache/tool/sub/f", "write", "openat", creates=True)], _enforced()
    )
    assert denial.grant == f"{tree}/home/.cache" and "missing" in denial.note


def test_protected_and_admin_forbidden_paths_are_never_proposed(tree: str) -> None:
    hooks = f"{tree}/proj/.git/hooks"
    os.makedirs(hooks)
    enforced = _enforced(
        PathEntry(f"{tree}/proj", "rw", f"{tree}/proj", True),
        PathEntry(hooks, "ro", hooks, True, "protected"),
        never_grant=(f"{tree}/home/.config",),
    )
    denials = analyse(
        [
            FsAccess(f"{hooks}/pre-commit", "write", "openat", creates=True),
            FsAccess(f"{tree}/home/.config/tool/key", "read", "openat"),
        ],
        enforced,
    )
    assert [d.verdict for d in denials] == ["protected", "admin"]
    assert minimal_grants(denials).readonly == minimal_grants(denials).readwrite == ()


def test_network_denials_follow_the_requested_rules() -> None:
    allow_dns = NetworkRule(
        to=(PeerSpec("198.51.100.0/24", ("198.51.100.7/32",)),), ports=(PortSpec("udp", 53),)
    )
    spec = NetworkSpec(EgressSpec("deny", allow=(allow_dns,)))
    accesses = [
        NetAccess("127.0.0.1", 8080, "tcp"),  # the sandbox's own loopback
        NetAccess("198.51.100.9", 53, "udp"),  # allowed
        NetAccess("198.51.100.7", 53, "udp"),  # in the except
        NetAccess("10.0.2.2", 8000, "tcp"),  # the host's loopback
        NetAccess("2001:db8::1", 443, "tcp"),
    ]
    denials = analyse(accesses, _enforced(network=spec))
    assert [d.access.address for d in denials] == ["198.51.100.7", "10.0.2.2", "2001:db8::1"]  # type: ignore[union-attr]
    grants = minimal_grants(denials)
    assert grants.host_loopback
    assert grants.egress == (("198.51.100.7/32", "udp", 53), ("2001:db8::1/128", "tcp", 443))


def test_a_rw_grant_replaces_the_same_path_read_only(tree: str) -> None:
    src = f"{tree}/proj/src"
    raw = {"version": "1.0.0", "process": {"commandLine": "true"},
           "filesystem": {"readonlyPaths": [src]}}  # fmt: skip
    grants = minimal_grants(
        analyse(
            [FsAccess(f"{src}/n", "write", "openat", creates=True)],
            _enforced(PathEntry(src, "ro", src, True)),
        )
    )
    doc = propose(raw, grants)
    assert doc["filesystem"] == {"readwritePaths": [src]}
    parse_request(doc)


def test_the_proposal_is_an_mxc_request_the_reference_accepts(tree: str, tmp_path: Any) -> None:
    raw = {"version": "1.0.0", "process": {"commandLine": "true"}}
    grants = minimal_grants(
        analyse(
            [
                FsAccess(f"{tree}/home/.config/tool/c.toml", "read", "openat"),
                FsAccess(f"{tree}/proj/src/z", "write", "openat", creates=True),
                NetAccess("192.0.2.1", 443, "tcp"),
            ],
            _enforced(),
        )
    )
    doc = propose(raw, grants)
    parse_request(doc)
    # (hostLoopback: allow is valid MXC too, but MXC's Linux backend refuses to run it.)
    if not (os.path.exists(ORACLE) and shutil.which("node")):
        pytest.skip("the MXC reference (oracle) is not installed here")
    path = tmp_path / "proposed.json"
    path.write_text(json.dumps(doc))
    done = subprocess.run(
        [ORACLE, "--dry-run", str(path)], capture_output=True, text=True, timeout=60
    )
    # 1 is a contract rejection; 255 a backend-level failure (here: no iptables for the
    # egress rule), which means the contract accepted the proposal.
    assert done.returncode in (0, 255), done.stdout + done.stderr
    assert "iptables" in done.stdout + done.stderr or done.returncode == 0


def _diff_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    return parser.parse_args(list(argv))


def test_learn_diff_command(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    old = {"version": "1.0.0", "process": {"commandLine": "true"}}
    new = propose(old, minimal_grants([]), cwd="/srv")
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    (tmp_path / "bad.json").write_text("[1,")
    args = _diff_args("learn", "diff", str(tmp_path / "old.json"), str(tmp_path / "new.json"))
    assert args.handler(args) == cli.DIFF_DIFFERENT
    out = capsys.readouterr().out
    assert out == unified_diff(old, new, args.old, args.new) and '+    "cwd": "/srv"' in out
    args = _diff_args("learn", "diff", str(tmp_path / "old.json"), str(tmp_path / "old.json"))
    assert args.handler(args) == cli.DIFF_SAME
    args = _diff_args("learn", "diff", str(tmp_path / "old.json"), str(tmp_path / "bad.json"))
    assert args.handler(args) == cli.DIFF_TROUBLE
    assert "not JSON" in capsys.readouterr().err


def test_the_cwd_is_pinned_only_when_new_grants_would_move_it(tree: str) -> None:
    from corral.api import parse
    from corral.learn.proposal import Grants
    from corral.learn.run import _pinned_cwd

    request = parse({"version": "1.0.0", "process": {"commandLine": "true"}})
    rw = Grants((), (f"{tree}/proj",), False, ())
    assert _pinned_cwd(request, "/", rw) == "/"  # Corral would pick the new rw grant
    assert _pinned_cwd(request, "/", Grants((), (), True, ())) is None
    given = parse({"version": "1.0.0", "process": {"commandLine": "true", "cwd": "/"}})
    assert _pinned_cwd(given, "/", rw) is None
