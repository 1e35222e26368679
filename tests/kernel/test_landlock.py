"""Landlock enforcement, attacked for real from a forked child.

Every test first shows the action succeeds without the restriction, then that the restricted
child is refused.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from corral.errors import CorralError, ErrorCode
from corral.kernel import landlock, privileges
from corral.kernel.landlock import PathRule

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(landlock.host_abi() < 6, reason="needs Landlock ABI 6 (Linux 6.12)"),
]

Runner = Callable[..., Any]


def _restricted(rules: list[PathRule], **options: bool) -> Callable[[], None]:
    prepared = landlock.prepare(rules, **options)

    def apply() -> None:
        privileges.set_no_new_privs()
        prepared.apply()

    return apply


def _read(path: Path) -> Callable[[], None]:
    def read() -> None:
        path.read_bytes()

    return read


def _write(path: Path) -> Callable[[], None]:
    def write() -> None:
        path.write_text("x")

    return write


@pytest.fixture
def regions(tmp_path: Path) -> dict[str, Path]:
    """A read-only region, a writable region and an area outside both, each with a file."""
    result = {}
    for name in ("readonly", "writable", "outside"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "file").write_text(name)
        result[name] = folder
    return result


def _rules(regions: dict[str, Path]) -> list[PathRule]:
    return [PathRule(str(regions["readonly"]), "read"), PathRule(str(regions["writable"]), "write")]


def test_read_outside_every_rule_is_denied(in_child: Runner, regions: dict[str, Path]) -> None:
    target = regions["outside"] / "file"
    assert in_child(_read(target)) == "ok"
    assert in_child(_read(target), _restricted(_rules(regions))) == "EACCES"
    assert in_child(_read(regions["readonly"] / "file"), _restricted(_rules(regions))) == "ok"


def test_write_inside_read_rule_is_denied(in_child: Runner, regions: dict[str, Path]) -> None:
    target = regions["readonly"] / "file"
    assert in_child(_write(target)) == "ok"
    assert in_child(_write(target), _restricted(_rules(regions))) == "EACCES"
    new_file = regions["readonly"] / "new"
    assert in_child(_write(new_file), _restricted(_rules(regions))) == "EACCES"
    assert not new_file.exists()


def test_write_inside_write_rule_is_allowed(in_child: Runner, regions: dict[str, Path]) -> None:
    target = regions["writable"] / "created"
    assert in_child(_write(target), _restricted(_rules(regions))) == "ok"
    assert target.read_text() == "x"
    sub = regions["writable"] / "sub"
    assert in_child(lambda: sub.mkdir(), _restricted(_rules(regions))) == "ok"


def test_rule_on_a_file_covers_only_that_file(in_child: Runner, regions: dict[str, Path]) -> None:
    allowed = regions["outside"] / "file"
    rules = [PathRule(str(allowed), "write")]
    assert in_child(_write(allowed), _restricted(rules)) == "ok"
    sibling = regions["outside"] / "sibling"
    assert in_child(_write(sibling)) == "ok"
    assert in_child(_write(sibling), _restricted(rules)) == "EACCES"


def test_moving_from_read_region_into_write_region_is_denied(
    in_child: Runner, regions: dict[str, Path]
) -> None:
    source = regions["readonly"] / "file"
    rename = lambda: os.rename(source, regions["writable"] / "moved")  # noqa: E731
    link = lambda: os.link(source, regions["writable"] / "linked")  # noqa: E731
    assert in_child(link, _restricted(_rules(regions))) in ("EXDEV", "EACCES")
    assert in_child(rename, _restricted(_rules(regions))) in ("EXDEV", "EACCES")
    assert source.exists()
    assert not (regions["writable"] / "moved").exists()
    assert in_child(rename) == "ok"
    assert (regions["writable"] / "moved").exists()


def test_signalling_the_parent_is_denied(in_child: Runner) -> None:
    signal_parent = lambda: os.kill(os.getppid(), 0)  # noqa: E731
    assert in_child(signal_parent) == "ok"
    assert in_child(signal_parent, _restricted([])) == "EPERM"
    allowed = _restricted([], scope_signals=False)
    assert in_child(signal_parent, allowed) == "ok"


def test_abstract_unix_socket_of_the_parent_is_unreachable(in_child: Runner) -> None:
    address = f"\0corral-test-landlock-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(address)
        server.listen(8)

        def connect() -> None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.connect(address)

        assert in_child(connect) == "ok"
        assert in_child(connect, _restricted([])) == "EPERM"


def test_deny_tcp_blocks_connect(in_child: Runner) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]

        def connect() -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass

        assert in_child(connect) == "ok"
        assert in_child(connect, _restricted([], deny_tcp=True)) == "EACCES"


def test_enforced_names_every_mechanism() -> None:
    prepared = landlock.prepare([], deny_tcp=True)
    try:
        assert prepared.enforced["abi"] == [str(landlock.host_abi())]
        assert {"read_file", "write_file", "refer", "truncate"} <= set(prepared.enforced["fs"])
        assert prepared.enforced["net"] == ["bind_tcp", "connect_tcp"]
        assert set(prepared.enforced["scopes"]) == {"abstract_unix_socket", "signal"}
    finally:
        prepared.close()


def test_too_old_abi_fails_closed() -> None:
    with pytest.raises(CorralError) as info:
        landlock.prepare([], min_abi=landlock.host_abi() + 1)
    assert info.value.code == ErrorCode.BACKEND_UNAVAILABLE
    assert "Landlock" in info.value.message
    assert info.value.remediation and "kernel" in info.value.remediation.lower()


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CorralError) as info:
        landlock.prepare([PathRule(str(tmp_path / "absent"), "read")])
    assert info.value.code == ErrorCode.POLICY_VALIDATION
    assert "absent" in info.value.message


def test_malformed_rules_are_clear_errors() -> None:
    for rule in (PathRule("/tmp\0x", "read"), PathRule("/tmp", "execute")):  # type: ignore[arg-type]
        with pytest.raises(CorralError) as info:
            landlock.prepare([rule])
        assert info.value.code == ErrorCode.POLICY_VALIDATION
