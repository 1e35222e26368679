"""The agent runs under an ephemeral identity of its own: what it creates is its own, the
human's files stay protected by ordinary permissions, and release leaves nothing behind."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import pytest
from tests.session.support import session_request

import corral
from corral.backends.session import SessionBackend, allocate, list_leftover_identities, release
from corral.backends.session.identity import ID_RANGE, SESSIONS_ROOT

LIVE = """
echo "uid=$(id -u) gid=$(id -g) home=$HOME user=$USER pwd=$(pwd)"
awk -v me=$$ '{print "session-leader=" ($6==me) " tty=" $7}' /proc/$$/stat
touch "$HOME/made-by-agent"
mkdir -p "$HOME/sub" && echo data > "$HOME/sub/file"
grep ' _ses' /proc/keys | awk '{print "session-keyring-uid=" $6}'
sleep 60 &
echo ready
wait
"""


def _uid_of_processes(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    if any(line.startswith("Uid:") and str(uid) in line.split() for line in f):
                        pids.append(int(entry))
            except FileNotFoundError:
                pass
    return pids


@pytest.mark.timeout(60)
def test_agent_identity_owns_its_processes_and_files_and_vanishes_on_release() -> None:
    with corral.spawn(session_request(LIVE)) as proc:
        assert proc.stdout is not None
        lines = []
        while (line := proc.stdout.readline().decode()) and line != "ready\n":
            lines.append(line.strip())
        facts = dict(item.split("=", 1) for line in lines for item in line.split())
        uid = int(facts["uid"])
        name, home = facts["user"], facts["home"]
        assert uid in ID_RANGE and uid != os.getuid()
        assert pwd.getpwnam(name).pw_uid == uid
        assert facts["gid"] == str(uid)
        assert home == facts["pwd"] == os.path.join(SESSIONS_ROOT, name)
        # Its own login session: session leader, no controlling terminal, own keyring.
        assert facts["session-leader"] == "1" and facts["tty"] == "0"
        assert facts["session-keyring-uid"] == str(uid)
        # Seen from the host: its processes and files carry its uid, its home is 0700.
        assert len(_uid_of_processes(uid)) >= 2  # the shell and `sleep`
        for path in (f"{home}/made-by-agent", f"{home}/sub/file", home):
            assert os.stat(path).st_uid == uid
        assert os.stat(home).st_mode & 0o777 == 0o700
    # Released with the handle: account, group, files and processes are gone.
    done = subprocess.run(["getent", "passwd", name], capture_output=True)
    assert done.returncode == 2
    assert subprocess.run(["getent", "group", name], capture_output=True).returncode == 2
    assert not os.path.exists(home)
    assert _uid_of_processes(uid) == []
    assert name not in {i.name for i in list_leftover_identities()}


@pytest.fixture
def human_dir() -> Iterator[str]:
    """A directory of the human's (root here), not writable by anybody else."""
    path = tempfile.mkdtemp(prefix="corral-human-", dir="/var/tmp")
    os.chmod(path, 0o755)
    with open(f"{path}/notes.txt", "w") as f:
        f.write("the human's notes\n")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_read_write_grant_of_human_files_needs_consent(human_dir: str) -> None:
    with pytest.raises(corral.CorralError) as caught:
        corral.run(session_request("true", filesystem={"readwritePaths": [human_dir]}))
    assert caught.value.code == corral.ErrorCode.POLICY_VALIDATION
    assert human_dir in caught.value.message
    assert "allowDaclMutation" in (caught.value.remediation or "")


@pytest.mark.timeout(60)
def test_consented_grant_uses_acls_removed_on_release(human_dir: str) -> None:
    # Baseline: a process under a distinct uid cannot write there.
    identity = allocate()
    try:
        denied = subprocess.run(
            ["setpriv", f"--reuid={identity.uid}", f"--regid={identity.gid}", "--clear-groups",
             "touch", f"{human_dir}/x"], capture_output=True,
        )  # fmt: skip
        assert denied.returncode != 0
    finally:
        release(identity)
    request = session_request(
        f"id -u; echo edited >> {human_dir}/notes.txt && touch {human_dir}/new && echo wrote",
        filesystem={"readwritePaths": [human_dir]},
        fallback={"allowDaclMutation": True},
    )
    result = corral.run(request)
    assert result.exit_code == 0, result.stderr
    uid = int(result.stdout.split()[0])
    assert "wrote" in result.stdout
    with open(f"{human_dir}/notes.txt") as notes:
        assert "edited" in notes.read()
    # What it created there is handed to the directory's owner when the identity goes.
    assert os.stat(f"{human_dir}/new").st_uid == os.stat(human_dir).st_uid
    acls = subprocess.run(["getfacl", "-R", "-n", "-p", human_dir], capture_output=True, text=True)
    assert f"user:{uid}:" not in acls.stdout, acls.stdout


def test_leftover_identities_are_listed_for_gc() -> None:
    identity = allocate()
    try:
        child = subprocess.Popen(
            ["setpriv", f"--reuid={identity.uid}", f"--regid={identity.gid}", "--clear-groups",
             "sleep", "60"]
        )  # fmt: skip
        assert identity in list_leftover_identities()
        assert identity not in list_leftover_identities(in_use={identity.name})
    finally:
        release(identity)  # also kills what still runs under that uid
    assert child.wait(timeout=5) == -9
    assert identity not in list_leftover_identities()


def test_unprivileged_callers_are_sent_to_the_service(user_src: str) -> None:
    code = (
        "import corral.backends.session as s\n"
        "print(s.SessionBackend().probe().reason)\n"
        "try:\n s.allocate()\nexcept s.identity.BackendUnavailableError as e:\n print(e)\n"
    )
    done = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", code],
        capture_output=True, text=True, env={"PYTHONPATH": user_src}, timeout=30,
    )  # fmt: skip
    assert "corral serve" in done.stdout, done.stderr
    assert "backend_unavailable" in done.stdout


def test_provision_metadata_names_the_identity() -> None:
    identity = allocate()
    try:
        meta = SessionBackend.provision_metadata(identity)
    finally:
        release(identity)
    assert meta == {
        "agentUserName": identity.name,
        "agentUserSid": f"uid:{identity.uid}",
        "ephemeralWorkspacePath": identity.workspace,
    }


@pytest.mark.timeout(60)
def test_pty_session_runs_as_the_agent() -> None:
    with corral.spawn_with_pty(session_request("test -t 0 && echo on-a-terminal; id -un")) as proc:
        out, _ = proc.communicate()
        assert proc.wait() == 0
    assert b"on-a-terminal" in out
    assert b"corral-agent-" in out
