"""Learning mode under the trust layer: the admin can forbid it, it never proposes what the
admin or the request denies, and every learned denial is an audit event."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from tests.learn.support import Workspace, http_server

import corral.api
from corral.errors import CorralError, ErrorCode
from corral.learn import cli, learn_request

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def ws() -> Iterator[Workspace]:
    workspace = Workspace.create(0, 0)
    yield workspace
    workspace.remove()


@pytest.fixture
def audit_log(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    path = str(tmp_path / "audit.jsonl")
    monkeypatch.setenv("CORRAL_AUDIT_LOG", path)
    return path


def _admin(tmp_path: Any, monkeypatch: pytest.MonkeyPatch, **policy: Any) -> None:
    path = tmp_path / "admin.json"
    path.write_text(json.dumps({"version": 1, **policy}))
    monkeypatch.setenv("CORRAL_ADMIN_POLICY", str(path))


def _records(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_admin_forbidding_learning_mode_refuses_it(
    ws: Workspace, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, audit_log: str
) -> None:
    _admin(tmp_path, monkeypatch, learningMode="deny")
    marker = f"{ws.root}/ran"
    request = corral.api.parse(ws.request(f"touch {marker}", readwritePaths=[ws.root]))
    with pytest.raises(CorralError) as caught:
        learn_request(request)
    assert caught.value.code == ErrorCode.POLICY_VALIDATION
    assert "learning mode is forbidden" in caught.value.message
    assert not os.path.exists(marker)  # nothing ran
    refusal = [r for r in _records(audit_log) if r["type"] == "refusal"]
    assert refusal and "learning mode is forbidden" in refusal[-1]["reason"]


def test_admin_never_grant_paths_are_marked_needs_admin(
    ws: Workspace, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _admin(tmp_path, monkeypatch, neverGrantPaths=[os.path.dirname(ws.config)])
    result = learn_request(corral.api.parse(ws.request(f"cat {ws.config}")), audit=False)
    assert result.exit_code != 0  # hidden during learning too
    assert "colour" not in result.stdout
    assert "filesystem" in result.proposed
    assert result.proposed["filesystem"] == {"readonlyPaths": [ws.work]}  # nothing added
    assert result.needs_admin and os.path.dirname(ws.config) in result.needs_admin[0]
    assert [d.verdict for d in result.denials] == ["admin"]


def test_paths_the_request_denies_stay_denied_and_are_not_proposed(ws: Workspace) -> None:
    raw = ws.request(f"cat {ws.config}; cat {ws.secret}", deniedPaths=[ws.secret])
    result = learn_request(corral.api.parse(raw), audit=False)
    assert "colour" in result.stdout
    assert "s3cr3t" not in result.stdout  # the denial held during learning
    assert result.proposed["filesystem"]["readonlyPaths"] == [ws.work, ws.config]
    assert result.proposed["filesystem"]["deniedPaths"] == [ws.secret]
    verdicts = {d.access.path: d.verdict for d in result.denials}  # type: ignore[union-attr]
    assert verdicts == {ws.config: "propose", ws.secret: "request"}


def test_learned_denials_are_audit_events(ws: Workspace, audit_log: str) -> None:
    with http_server() as port:
        raw = ws.request(
            f'cat {ws.config}; python3 -c "import socket; '
            f"socket.create_connection(('10.0.2.2', {port}), timeout=3)\""
        )
        raw["corral"] = {"actor": {"kind": "agent", "name": "learner-test"}}
        result = learn_request(corral.api.parse(raw))
    assert result.exit_code == 0, result.stderr
    records = _records(audit_log)
    assert all(r["actor"] for r in records)
    fs = [r for r in records if r["type"] == "fs_denial"]
    net = [r for r in records if r["type"] == "network_decision"]
    assert [(r["decision"], r["data"]["learned"], r["data"]["path"]) for r in fs] == [
        ("deny", True, ws.config)
    ]
    assert [(r["decision"], r["data"]["learned"], r["data"]["port"]) for r in net] == [
        ("deny", True, port)
    ]
    assert {r["actor"]["name"] for r in records} == {"learner-test"}
    assert {"request", "plan", "launch", "exit"} <= {r["type"] for r in records}


def test_connections_elsewhere_are_recorded_but_never_let_out(ws: Workspace) -> None:
    # 192.0.2.1 (TEST-NET-1) stands for any outside address: refused as the request says.
    raw = ws.request(
        "python3 -c \"import socket\ntry:\n socket.create_connection(('192.0.2.1', 443), timeout=3)"
        "\nexcept OSError as e:\n print('refused', e.errno)\""
    )
    result = learn_request(corral.api.parse(raw), audit=False)
    assert "refused" in result.stdout
    assert result.proposed["network"] == {
        "egress": {
            "allow": [
                {"to": [{"cidr": "192.0.2.1/32"}], "ports": [{"protocol": "tcp", "port": 443}]}
            ]
        }
    }
    assert corral.api.parse(result.proposed).network.egress.allow  # a valid request


def test_system_locations_written_during_learning_stay_untouched(ws: Workspace) -> None:
    probe = f"/usr/local/corral-learn-probe-{os.path.basename(ws.root)}"
    assert not os.path.exists(probe)
    raw = ws.request(f"echo planted > {probe} && cat {probe} && rm -rf /usr/local/bin && echo gone")
    result = learn_request(corral.api.parse(raw), audit=False)
    assert result.stdout.split() == ["planted", "gone"], result.stderr  # it worked inside
    assert not os.path.exists(probe)
    assert os.path.isdir("/usr/local/bin")
    grants = result.proposed["filesystem"]["readwritePaths"]
    assert grants == ["/usr/local"]  # the proposal shows what it tried


def test_exec_learn_command_writes_the_proposal_and_prints_the_diff(
    ws: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    config = f"{ws.root}/request.json"
    with open(config, "w") as f:
        json.dump(ws.request(f"cat {ws.config}"), f)
    args = argparse.Namespace(config_path=config, config_flag=None, learn_output=None)
    assert cli.run_exec(args, corral.api.parse(ws.request(f"cat {ws.config}"))) == 0
    out, err = capsys.readouterr()
    assert "colour" in out
    with open(f"{ws.root}/request.proposed.json") as f:
        proposed = json.load(f)
    assert proposed["filesystem"]["readonlyPaths"] == [ws.work, ws.config]
    assert f'+      "{ws.config}"' in err and "request.proposed.json" in err


def test_credentials_stay_hidden_while_learning(tmp_path: os.PathLike[str]) -> None:
    """The permissive learning view still hides the caller's keys and the system's secrets."""
    import corral.api

    home = os.path.expanduser("~")
    ssh = os.path.join(home, ".ssh")
    created = not os.path.exists(ssh)
    os.makedirs(ssh, exist_ok=True)
    key = os.path.join(ssh, "corral_learn_probe")
    with open(key, "w") as f:
        f.write("KEY")
    try:
        result = corral.api.learn(
            {"version": "1.0.0", "process": {"commandLine": f"cat {key} /etc/shadow; true"}},
            audit=False,
        )
        assert "KEY" not in result.stdout
        assert "root:" not in result.stdout
        proposed = json.dumps(result.proposed.get("filesystem", {}))
        assert key not in proposed and "/etc/shadow" not in proposed
    finally:
        os.unlink(key)
        if created:
            os.rmdir(ssh)
