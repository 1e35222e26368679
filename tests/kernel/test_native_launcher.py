"""The native launcher's own contract: failures are reported, never mistaken for success."""

from __future__ import annotations

import os
import subprocess

import pytest

from corral.native import launcher_path
from corral.native.records import decode, exec_request, record


def _launch(spec: bytes) -> tuple[int, str]:
    """Run the launcher on ``spec``; its exit status and what it reported on the error pipe."""
    spec_fd = os.memfd_create("spec")
    os.write(spec_fd, spec)
    os.lseek(spec_fd, 0, os.SEEK_SET)
    error_r, error_w = os.pipe()
    proc = subprocess.Popen(
        [launcher_path(), str(spec_fd), str(error_w)], pass_fds=(spec_fd, error_w)
    )
    os.close(spec_fd)
    os.close(error_w)
    with os.fdopen(error_r, "rb") as f:
        message = f.read().decode()
    return proc.wait(timeout=30), message


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (b"A\x09\x00\x00\x00/bin", "truncated record"),
        (record("?", "x"), "unknown record"),
        (record("S", b"\x00" * 7), "not a seccomp BPF program"),
        (record("L", "x", "1", "1"), "is not a number"),
    ],
)
def test_malformed_specs_are_reported(spec: bytes, reason: str) -> None:
    code, message = _launch(spec)
    assert code == 127 and reason in message, message


@pytest.mark.timeout(60)
def test_a_failing_step_is_reported_with_its_path() -> None:
    spec = b"".join(
        [
            record("A", "/bin/true"),
            record("C", "/"),
            record("I", -1, -1, -1),
            record("M", "b", "rd", "/no/such/dir-for-corral", ""),
        ]
    )
    code, message = _launch(spec)
    assert code == 127 and "/no/such/dir-for-corral" in message, message


def test_exec_requests_round_trip() -> None:
    data = exec_request(["sh", "-c", "x"], {"A": "1=2"}, "/w", timeout_ms=5, pty=True)
    assert decode(data) == [
        ("A", ["sh"]), ("A", ["-c"]), ("A", ["x"]), ("E", ["A=1=2"]), ("C", ["/w"]),
        ("t", ["5"]), ("p", [""]),
    ]  # fmt: skip


def test_fields_cannot_smuggle_separators() -> None:
    with pytest.raises(ValueError, match="NUL"):
        record("M", "b", "r\0d", "/x", "")


@pytest.mark.parametrize("data", [b"A", b"A\x05\x00\x00\x00abc", b"A\x01\x00\x00\x00\xff"])
def test_decoding_refuses_what_is_not_a_record_stream(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode(data)
