"""The synchronous SDK end to end: real sandboxes, real processes."""

from __future__ import annotations

import os
import time

import pytest

import corral
from corral.contract.model import ProcessSpec, Request


def test_run_collects_output_and_exit_code() -> None:
    result = corral.run({"process": {"commandLine": "echo out; echo err >&2; exit 3"}})
    assert (result.stdout, result.stderr, result.exit_code, result.timed_out) == (
        "out\n",
        "err\n",
        3,
        False,
    )


def test_version_is_filled_and_typed_model_accepted() -> None:
    typed = Request(version="1.0.0", process=ProcessSpec(command_line="echo typed"))
    assert corral.run(typed).stdout == "typed\n"
    assert corral.run('{"process": {"commandLine": "echo json"}}').stdout == "json\n"


def test_stdin_is_passed() -> None:
    assert corral.run({"process": {"commandLine": "tr a-z A-Z"}}, input=b"hello").stdout == "HELLO"


def test_default_environment_is_mxc_default() -> None:
    env = dict(
        line.split("=", 1)
        for line in corral.run({"process": {"commandLine": "env"}}).stdout.splitlines()
        if "=" in line
    )
    assert env["PATH"].startswith("/usr/local/sbin")
    assert env["TERM"] == "xterm-256color"
    assert "HOME" not in env and "CORRAL_SECRET" not in env


def test_env_verbatim_and_inherit_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_SECRET", "leak")
    out = corral.run({"process": {"commandLine": "/usr/bin/env", "env": ["A=1"]}})
    names = {line.split("=", 1)[0] for line in out.stdout.splitlines()}
    assert "A=1" in out.stdout.splitlines() and names <= {"A", "PWD"}
    layered = corral.run(
        {"process": {"commandLine": "echo $A:$TERM", "env": ["A=1"], "inheritDefaultEnv": True}}
    )
    assert layered.stdout == "1:xterm-256color\n"


def test_cwd_defaults_to_first_readwrite_grant(tmp_path: os.PathLike[str]) -> None:
    ro, rw = os.path.join(tmp_path, "ro"), os.path.join(tmp_path, "rw")
    os.mkdir(ro)
    os.mkdir(rw)
    fs = {"readonlyPaths": [ro], "readwritePaths": [rw]}
    assert corral.run({"process": {"commandLine": "pwd"}, "filesystem": fs}).stdout == f"{rw}\n"
    fs = {"readonlyPaths": [ro]}
    assert corral.run({"process": {"commandLine": "pwd"}, "filesystem": fs}).stdout == f"{ro}\n"
    assert corral.run({"process": {"commandLine": "pwd"}}).stdout == "/\n"


def test_cwd_outside_grants_is_refused() -> None:
    with pytest.raises(corral.CorralError) as err:
        corral.run({"process": {"commandLine": "pwd", "cwd": "/root"}})
    assert err.value.code == "policy_validation"


def test_missing_path_is_a_warning(tmp_path: os.PathLike[str]) -> None:
    missing = os.path.join(tmp_path, "nope")
    result = corral.run(
        {"process": {"commandLine": "true"}, "filesystem": {"readonlyPaths": [missing]}}
    )
    assert result.exit_code == 0
    assert any("does not exist" in w for w in result.warnings)


@pytest.mark.timeout(30)
def test_timeout_reports_timed_out() -> None:
    started = time.monotonic()
    result = corral.run({"process": {"commandLine": "sleep 30", "timeout": 300}})
    assert result.timed_out and result.exit_code == 137
    assert time.monotonic() - started < 10


def test_spawn_streams_and_kill() -> None:
    with corral.spawn({"process": {"commandLine": "cat"}}) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"ping\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"ping\n"
        proc.kill()
        assert proc.wait(timeout=10) == 137


def test_spawn_with_pty_and_resize() -> None:
    with corral.spawn_with_pty(
        {"process": {"commandLine": "stty size; sleep 0.3; stty size"}}, rows=30, columns=100
    ) as proc:
        time.sleep(0.1)
        proc.resize(40, 120)
        out, _ = proc.communicate()
    assert out.replace(b"\r", b"").split(b"\n")[:2] == [b"30 100", b"40 120"]


def test_validate_never_raises() -> None:
    ok = corral.validate({"process": {"commandLine": "true"}})
    assert ok.valid and ok.plan is not None
    bad = corral.validate({"process": {"commandLine": ""}})
    assert not bad.valid and bad.error is not None and bad.error["code"] == "malformed_request"
    assert not corral.validate("{not json").valid


def test_platform_support_and_backends() -> None:
    support = corral.get_platform_support()
    assert support["supported"] and "process" in support["containments"]
    names = {b["name"] for b in corral.get_available_backends()}
    assert "process" in names


def test_foreign_containment_refused() -> None:
    with pytest.raises(corral.CorralError) as err:
        corral.run({"containment": "processcontainer", "process": {"commandLine": "true"}})
    assert err.value.code == "unsupported_containment"


def test_many_runs_leak_no_descriptor() -> None:
    """An agent makes thousands of calls from one process: each run's resources (audit log,
    pipes, kernel-denial watch) are released."""
    request = {"process": {"commandLine": "true"}}

    def both() -> None:
        corral.run(request)
        with corral.spawn(request) as proc:
            proc.communicate()

    both()  # what is opened once and kept (caches) is opened by now
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        both()
    assert len(os.listdir("/proc/self/fd")) <= before
