"""Long-lived sandboxes in the audit trail: every phase, refusal, policy change and exec, each
naming the request's actor and the sandbox, in the owner's chained log."""

from __future__ import annotations

import json
import os

import pytest

from corral.audit import verify
from corral.contract.model import ProcessSpec
from corral.errors import CorralError
from corral.lifecycle import api

ACTOR = {"kind": "agent", "name": "coder-5", "session": "s-9"}
PROVISION = {"version": "1.0.0", "phase": "provision", "containment": "process",
             "corral": {"actor": ACTOR}}  # fmt: skip


@pytest.fixture
def log(run_dir: str, tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> str:
    path = os.path.join(tmp_path, "audit.jsonl")
    monkeypatch.setenv("CORRAL_AUDIT_LOG", path)
    return path


def events(path: str) -> list[dict[str, object]]:
    assert verify(path).ok
    with open(path) as f:
        return [json.loads(line) for line in f]


def summary(event: dict[str, object]) -> tuple[object, ...]:
    data = event["data"]
    assert isinstance(data, dict)
    return event["type"], event["decision"], data.get("phase")


@pytest.mark.timeout(60)
def test_every_phase_and_exec_is_recorded_with_the_actor(log: str) -> None:
    sid = api.provision_container(PROVISION).container_id
    api.start_container(sid)
    assert api.run_in_container(sid, "exit 3").exit_code == 3
    assert api.run_in_container(sid, ProcessSpec("sleep 5", timeout_ms=100)).timed_out
    with api.spawn_in_container(sid, "true") as proc:
        assert proc.wait() == 0
    api.stop_container(sid)
    api.deprovision_container(sid)
    trail = events(log)
    assert [summary(e) for e in trail] == [
        ("lifecycle", "allow", "provision"),
        ("lifecycle", "allow", "start"),
        ("launch", None, "exec"), ("exit", None, None),
        ("launch", None, "exec"), ("timeout", None, None),
        ("launch", None, "exec"), ("exit", None, None),
        ("lifecycle", "allow", "stop"),
        ("lifecycle", "allow", "deprovision"),
    ]  # fmt: skip
    assert [e["data"]["exitCode"] for e in trail if e["type"] == "exit"] == [3, 0]  # type: ignore[index]
    for e in trail:
        assert e["sandbox"] == sid
        assert e["actor"]["name"] == "coder-5" and e["actor"]["declared"] is True  # type: ignore[index]
        assert e["actor"]["observed"]["uid"] == os.getuid()  # type: ignore[index]


@pytest.mark.timeout(60)
def test_refused_phases_and_policy_changes_are_recorded(log: str) -> None:
    sid = api.provision_container(PROVISION).container_id
    with pytest.raises(CorralError):
        api.stop_container(sid)  # never started
    api.start_container(sid)
    with pytest.raises(CorralError):
        api.start_container(sid)  # already started
    api.set_container_network_policy(sid, {"network": {"egress": {"default": "deny"}}})
    api.deprovision_container(sid)
    with pytest.raises(CorralError):
        api.provision_container({**PROVISION, "containment": "wslc"})
    trail = events(log)
    assert [summary(e) for e in trail] == [
        ("lifecycle", "allow", "provision"),
        ("refusal", "deny", "stop"),
        ("lifecycle", "allow", "start"),
        ("refusal", "deny", "start"),
        ("policy_change", "allow", "policy"),
        ("lifecycle", "allow", "deprovision"),
        ("refusal", "deny", "provision"),
    ]
    refusals = [e for e in trail if e["type"] == "refusal"]
    assert [e["data"]["code"] for e in refusals] == [  # type: ignore[index]
        "not_started", "already_started", "unsupported_containment",
    ]  # fmt: skip
    assert all(e["actor"]["name"] == "coder-5" for e in trail)  # type: ignore[index]
