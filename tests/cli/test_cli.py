"""`corral` the command: exit codes and outputs as the reference CLI."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import pytest
from tests.conftest import SRC


def corral_cli(
    *args: str, config: object | None = None, tmp: str = "/tmp"
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "corral", *args]
    if config is not None:
        path = os.path.join(tmp, "request.json")
        with open(path, "w") as f:
            f.write(config if isinstance(config, str) else json.dumps(config))
        argv.append(path)
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": SRC}
    )


@pytest.fixture
def tmp(tmp_path: os.PathLike[str]) -> str:
    return str(tmp_path)


def test_exit_code_is_the_workloads(tmp: str) -> None:
    r = corral_cli(
        "exec", config={"version": "1.0.0", "process": {"commandLine": "echo hi; exit 7"}}, tmp=tmp
    )
    assert (r.returncode, r.stdout) == (7, "hi\n")


def test_unparseable_request_exits_1(tmp: str) -> None:
    assert corral_cli("exec", config="{nope", tmp=tmp).returncode == 1
    r = corral_cli(
        "exec", config={"version": "1.0.0", "process": {"commandLine": "x", "foo": 1}}, tmp=tmp
    )
    assert r.returncode == 1 and "process.foo" in r.stderr


def test_policy_failure_exits_255_with_envelope(tmp: str) -> None:
    r = corral_cli(
        "exec",
        config={"version": "1.0.0", "containment": "wslc", "process": {"commandLine": "true"}},
        tmp=tmp,
    )
    assert r.returncode == 255
    assert (
        json.loads(r.stderr.strip().splitlines()[-1])["error"]["code"] == "unsupported_containment"
    )


def test_timeout_exits_255(tmp: str) -> None:
    r = corral_cli(
        "exec",
        config={"version": "1.0.0", "process": {"commandLine": "sleep 20", "timeout": 200}},
        tmp=tmp,
    )
    assert r.returncode == 255
    assert json.loads(r.stderr.strip().splitlines()[-1])["error"]["details"]["timedOut"] is True


def test_dry_run_prints_plan_table_and_json(tmp: str) -> None:
    config = {
        "version": "1.0.0",
        "process": {"commandLine": "true"},
        "filesystem": {"readonlyPaths": [tmp]},
    }
    table = corral_cli("exec", "--dry-run", config=config, tmp=tmp)
    assert table.returncode == 0 and "read-only" in table.stdout and "ENFORCED BY" in table.stdout
    js = corral_cli("exec", "--dry-run", "--json", config=config, tmp=tmp)
    plan = json.loads(js.stdout)
    assert any(
        c["subject"] == tmp and "mount-namespace" in c["mechanisms"] for c in plan["clauses"]
    )


def test_config_flag_and_base64() -> None:
    request = json.dumps({"version": "1.0.0", "process": {"commandLine": "echo b64"}})
    r = corral_cli("exec", "--config-base64", base64.b64encode(request.encode()).decode())
    assert (r.returncode, r.stdout) == (0, "b64\n")
    assert corral_cli("exec", "--config-base64", "%%%").returncode == 1


def test_experimental_gate(tmp: str) -> None:
    config = {
        "version": "1.1.0-alpha",
        "containment": "microvm",
        "process": {"commandLine": "true"},
    }
    r = corral_cli("exec", "--dry-run", config=config, tmp=tmp)
    assert r.returncode == 1 and "experimental" in r.stderr


def test_backends_lists_json() -> None:
    r = corral_cli("backends")
    assert r.returncode == 0
    assert any(b["name"] == "process" and b["available"] for b in json.loads(r.stdout))
