"""The ``audit`` subcommands through argparse, as the ``corral`` command wires them."""

from __future__ import annotations

import argparse
import json
import os

import pytest
from audit_support import fill

from corral.audit.cli import register


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="corral")
    register(parser.add_subparsers())
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


def test_verify_ok_then_tampered(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    path = os.path.join(str(tmp_path), "audit.jsonl")
    fill(path, 4)
    assert _run(["audit", "verify", "--log", path]) == 0
    assert "OK, 4 records" in capsys.readouterr().out
    with open(path, "rb") as f:
        lines = f.readlines()
    del lines[1]
    with open(path, "wb") as f:
        f.writelines(lines)
    assert _run(["audit", "verify", "--log", path]) == 1
    assert "line 2" in capsys.readouterr().err


def test_verify_uses_the_environment_variable(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = os.path.join(str(tmp_path), "audit.jsonl")
    fill(path, 1)
    monkeypatch.setenv("CORRAL_AUDIT_LOG", path)
    assert _run(["audit", "verify"]) == 0
    assert path in capsys.readouterr().out


def test_tail_query_export(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    path = os.path.join(str(tmp_path), "audit.jsonl")
    fill(path, 6)
    capsys.readouterr()
    assert _run(["audit", "tail", "-n", "2", "--log", path]) == 0
    assert [json.loads(x)["seq"] for x in capsys.readouterr().out.splitlines()] == [5, 6]
    assert _run(["audit", "query", "--sandbox", "sb-1", "--type", "launch", "--log", path]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert _run(["audit", "export", "--format", "otel", "--log", path]) == 0
    assert "resourceLogs" in json.loads(capsys.readouterr().out)
    assert _run(["audit", "export", "--format", "ocsf", "--log", path]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 6


def test_errors_are_messages_not_tracebacks(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = os.path.join(str(tmp_path), "absent.jsonl")
    assert _run(["audit", "verify", "--log", missing]) == 2
    assert "cannot read the audit log" in capsys.readouterr().err
    assert _run(["audit", "query", "--since", "yesterday", "--log", missing]) == 2
