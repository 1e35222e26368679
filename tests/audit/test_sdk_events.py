"""The SDK writes an audit event for every request, refusal, plan, launch, exit and timeout,
each naming its actor (declared by the caller vs observed from the OS)."""

from __future__ import annotations

import json
import os

import pytest

import corral
from corral.audit import verify


@pytest.fixture
def log(tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> str:
    path = os.path.join(tmp_path, "audit.jsonl")
    monkeypatch.setenv("CORRAL_AUDIT_LOG", path)
    return path


def records(path: str) -> list[dict[str, object]]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_run_emits_request_plan_launch_exit_with_agent_actor(log: str) -> None:
    actor = {"kind": "agent", "name": "coder-7", "session": "s-42"}
    corral.run({"process": {"commandLine": "true"}, "corral": {"actor": actor}})
    events = records(log)
    # Between launch and exit: the kernel denial watch's own state (tests/audit/
    # test_kernel_denials.py), whatever this host's kernel audit is.
    types = [e["type"] for e in events if e["type"] != "kernel_audit"]
    assert types == ["request", "plan", "launch", "exit"]
    for e in events:
        assert e["actor"]["kind"] == "agent" and e["actor"]["name"] == "coder-7"
        assert e["actor"]["declared"] is True
        assert e["actor"]["observed"]["uid"] == os.getuid()
    assert verify(log).ok


def test_undeclared_actor_is_unknown_not_human(log: str) -> None:
    corral.run({"process": {"commandLine": "true"}})
    assert {e["actor"]["kind"] for e in records(log)} == {"unknown"}


def test_refusal_and_timeout_are_recorded(log: str) -> None:
    with pytest.raises(corral.CorralError):
        corral.run({"containment": "wslc", "process": {"commandLine": "true"}})
    corral.run({"process": {"commandLine": "sleep 10", "timeout": 100}})
    types = [e["type"] for e in records(log)]
    assert types[0] == "refusal" and types[-1] == "timeout"
    assert records(log)[0]["decision"] == "deny"


def test_audit_can_be_turned_off(log: str) -> None:
    corral.run({"process": {"commandLine": "true"}}, audit=False)
    assert not os.path.exists(log)
