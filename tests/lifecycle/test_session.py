"""isolation_session through the lifecycle: an agent identity held from provision to
deprovision, workloads run as its uid, only root (the service) creates and removes it."""

from __future__ import annotations

import os
import pwd

import pytest
from lifecycle_support import needs_lifecycle

from corral.errors import CorralError, ErrorCode

pytestmark = [needs_lifecycle, pytest.mark.timeout(120)]
pytestmark.append(pytest.mark.skipif(os.geteuid() != 0, reason="creates host accounts: root"))

# A Corral strengthening of MXC's shape (which wants the all-allow network posture).
PROVISION = {"version": "1.0.0", "phase": "provision", "containment": "isolation_session",
             "network": {"egress": {"default": "deny"}}}  # fmt: skip


def _exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def test_identity_from_provision_to_deprovision(run_dir: str) -> None:
    from corral.lifecycle import api

    result = api.provision_container(PROVISION)
    sid, meta = result.container_id, result.metadata
    assert sid.startswith("corral-session:")
    agent = pwd.getpwnam(meta["agentUserName"])
    assert meta["agentUserSid"] == f"uid:{agent.pw_uid}" and agent.pw_uid != os.getuid()
    assert meta["ephemeralWorkspacePath"] == agent.pw_dir and os.path.isdir(agent.pw_dir)
    api.start_container(sid)
    ran = api.run_in_container(sid, "id -u; echo $HOME $USER; pwd; touch mine; stat -c %u mine")
    uid = str(agent.pw_uid)
    assert ran.stdout.split("\n")[:4] == [uid, f"{agent.pw_dir} {agent.pw_name}", agent.pw_dir, uid]
    # The agent cannot read what only the caller (root here) may read.
    attack = api.run_in_container(sid, "cat /etc/shadow > /dev/null 2>&1 && echo read || echo no")
    assert attack.stdout == "no\n"
    api.stop_container(sid)
    assert not any(_uid_of(p) == agent.pw_uid for p in _pids()), "stop left agent processes"
    api.start_container(sid)  # same identity again
    assert api.run_in_container(sid, "id -u").stdout.strip() == uid
    api.deprovision_container(sid)
    assert not _exists(agent.pw_name) and not os.path.exists(agent.pw_dir)
    assert not any(_uid_of(p) == agent.pw_uid for p in _pids())


def test_a_forged_state_cannot_pick_another_identity(run_dir: str) -> None:
    """The owner writes the state file; root uses only its own binding."""
    import json

    from corral.lifecycle import api, store

    first = api.provision_container(PROVISION)
    second = api.provision_container(PROVISION)
    path = os.path.join(store.find_sandbox(first.container_id, 0), store.STATE_FILE)
    with open(path) as f:
        state = json.load(f)
    state["session"] = second.metadata
    with open(path, "w") as f:
        json.dump(state, f)
    api.deprovision_container(first.container_id)
    assert _exists(second.metadata["agentUserName"])
    assert not _exists(first.metadata["agentUserName"])
    api.deprovision_container(second.container_id)


def test_unprivileged_callers_need_the_service(run_dir: str) -> None:
    from corral.lifecycle import api, privsep

    nobody = pwd.getpwnam("nobody")
    with pytest.raises(CorralError) as info:
        privsep.run_as(nobody.pw_uid, nobody.pw_gid, lambda: api.provision_container(PROVISION))
    assert info.value.code == ErrorCode.BACKEND_UNAVAILABLE
    assert "corral serve" in str(info.value.remediation)


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _uid_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def test_through_the_root_service_for_a_user(service: str) -> None:
    import subprocess

    from test_users import EXEC, _as, _ok, _user

    alice, bob = _user("corral-alice"), _user("corral-bob")
    meta = _ok(_as(alice, service, "provision", {"request": PROVISION}))
    sid, agent = meta["sandboxId"], pwd.getpwnam(meta["agentUserName"])
    assert meta["agentUserSid"] == f"uid:{agent.pw_uid}"
    _ok(_as(alice, service, "start", {"sandboxId": sid}))
    for op in ("start", "stop", "deprovision"):  # bob sees nothing of alice's
        assert _as(bob, service, op, {"sandboxId": sid})["error"]["code"] == "stale_id"  # type: ignore[index]
    control = os.path.join(
        os.path.dirname(service), str(alice.pw_uid), sid.rpartition(":")[2], "control.sock"
    )
    src = os.path.dirname(os.path.dirname(os.path.abspath(__import__("corral").__file__)))
    ran = subprocess.run(
        ["/usr/bin/python3", "-c", EXEC, control, "id -u"], user=alice.pw_uid,
        group=alice.pw_gid, extra_groups=[], capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": src},
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == str(agent.pw_uid)  # alice's exec runs as the agent, not alice
    _ok(_as(alice, service, "deprovision", {"sandboxId": sid}))
    assert not _exists(agent.pw_name)


def test_pty_exec_runs_as_the_agent_on_its_own_terminal(run_dir: str) -> None:
    from corral.lifecycle import api

    result = api.provision_container(PROVISION)
    sid, agent = result.container_id, pwd.getpwnam(result.metadata["agentUserName"])
    try:
        api.start_container(sid)
        command = "test -t 0 && echo on-a-terminal; stty size; id -u"
        with api.spawn_in_container_with_pty(sid, command, rows=33, columns=101) as proc:
            assert proc.pty_fd is not None
            out = b""
            while chunk := _read_pty(proc.pty_fd):
                out += chunk
            assert proc.wait() == 0
        assert out.split() == [b"on-a-terminal", b"33", b"101", str(agent.pw_uid).encode()]
    finally:
        api.deprovision_container(sid)


def _read_pty(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # EIO: the terminal's last process is gone
        return b""
