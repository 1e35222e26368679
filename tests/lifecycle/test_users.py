"""Two users and the root service: each sees and controls only their own sandboxes."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
from lifecycle_support import needs_lifecycle

from corral.lifecycle import store

pytestmark = [needs_lifecycle, pytest.mark.timeout(120)]
pytestmark.append(pytest.mark.skipif(os.geteuid() != 0, reason="creates users; needs root"))

# Runs as the test user with Debian's python (the venv lives under /root, closed to others);
# stdlib only: talks HTTP to the service socket, as any client could.
CLIENT = r"""
import http.client, json, socket, sys
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX); self.sock.connect(sys.argv[1])
c = C("localhost"); c.request("POST", "/v1/" + sys.argv[2], sys.argv[3])
print(c.getresponse().read().decode())
"""


def _user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-m", "-K", "HOME_MODE=0700", name], check=True)
        return pwd.getpwnam(name)


@pytest.fixture
def service(run_dir: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    # The test users must reach the socket: a run directory outside root's private tmp.
    base = tempfile.mkdtemp(prefix="corral-users-")
    os.chmod(base, 0o755)
    monkeypatch.setenv("CORRAL_RUN_DIR", os.path.join(base, "corral"))
    env = dict(os.environ)
    env.pop("CORRAL_NO_SERVICE")
    proc = subprocess.Popen([sys.executable, "-m", "corral", "serve"], env=env)
    sock = os.path.join(base, "corral", "service.sock")
    for _ in range(200):
        if os.path.exists(sock):
            break
        time.sleep(0.05)
    yield sock
    proc.terminate()
    proc.wait()
    from corral.lifecycle import gc

    gc.collect()
    shutil.rmtree(base, ignore_errors=True)


def _ok(reply: dict[str, object]) -> Any:
    assert "result" in reply, reply
    return reply["result"]


def _as(
    user: pwd.struct_passwd, sock: str, op: str, params: dict[str, object]
) -> dict[str, object]:
    out = subprocess.run(
        ["/usr/bin/python3", "-c", CLIENT, sock, op, json.dumps(params)],
        user=user.pw_uid, group=user.pw_gid, extra_groups=[], capture_output=True, text=True,
        check=True, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    reply: dict[str, object] = json.loads(out.stdout)
    return reply


def test_users_cannot_see_or_touch_each_other(service: str) -> None:
    alice, bob = _user("corral-alice"), _user("corral-bob")
    request = {"version": "1.0.0", "phase": "provision", "containment": "process"}
    sid = _ok(_as(alice, service, "provision", {"request": request}))["sandboxId"]
    started = _as(alice, service, "start", {"sandboxId": sid})
    assert "result" in started, started
    assert [s["sandboxId"] for s in _ok(_as(alice, service, "ps", {}))] == [sid]
    assert _ok(_as(bob, service, "ps", {})) == []
    for op in ("start", "stop", "deprovision", "logs"):
        reply = _as(bob, service, op, {"sandboxId": sid})
        assert reply["error"]["code"] == "stale_id", reply  # type: ignore[index]
    ps = subprocess.run(["ps", "-o", "user=", "-C", "corral-sup"], capture_output=True, text=True)
    assert "corral-alice" in ps.stdout  # the sandbox runs as its owner, not as root
    assert _ok(_as(alice, service, "deprovision", {"sandboxId": sid}))


CONNECT = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
try:
    s.connect(sys.argv[1]); print("connected")
except OSError as exc:
    print(type(exc).__name__)
"""


def test_control_socket_is_closed_to_other_users(service: str) -> None:
    alice, bob = _user("corral-alice"), _user("corral-bob")
    request = {"version": "1.0.0", "phase": "provision", "containment": "process"}
    sid = _ok(_as(alice, service, "provision", {"request": request}))["sandboxId"]
    _as(alice, service, "start", {"sandboxId": sid})
    base = os.path.dirname(service)
    control = os.path.join(base, str(alice.pw_uid), sid.rpartition(":")[2], "control.sock")

    def connect(user: pwd.struct_passwd) -> str:
        return subprocess.run(
            ["/usr/bin/python3", "-c", CONNECT, control], user=user.pw_uid, group=user.pw_gid,
            extra_groups=[], capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip

    assert connect(alice) == "connected"  # the owner reaches her sandbox's init ...
    assert connect(bob) == "PermissionError"  # ... nobody else does
    _as(alice, service, "deprovision", {"sandboxId": sid})


# Alice's own exec client (stdlib + Corral's client module), straight to her control socket.
EXEC = r"""
import sys
from corral.backends.process.handle import communicate
from corral.lifecycle.client import start_exec
proc = start_exec(sys.argv[1], command=("/bin/sh", "-c", sys.argv[2]),
                  env={"PATH": "/usr/bin:/bin"}, cwd="/", timeout_ms=10000, stdin_devnull=True)
out, err = communicate(proc)
print(out.decode(), end="")
"""


def test_unprivileged_workload_cannot_read_its_init(service: str) -> None:
    alice = _user("corral-alice")
    request = {"version": "1.0.0", "phase": "provision", "containment": "process"}
    sid = _ok(_as(alice, service, "provision", {"request": request}))["sandboxId"]
    _as(alice, service, "start", {"sandboxId": sid})
    control = os.path.join(
        os.path.dirname(service), str(alice.pw_uid), sid.rpartition(":")[2], "control.sock"
    )
    src = os.path.dirname(os.path.dirname(os.path.abspath(__import__("corral").__file__)))

    def run(command: str) -> str:
        return subprocess.run(
            ["/usr/bin/python3", "-c", EXEC, control, command], user=alice.pw_uid,
            group=alice.pw_gid, extra_groups=[], capture_output=True, text=True, check=True,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": src},
        ).stdout  # fmt: skip

    probe = "cat /proc/{}/environ > /dev/null 2>&1 && echo readable || echo denied"
    assert run(probe.format("self")) == "readable\n"  # same uid, dumpable: the read works ...
    assert run(probe.format("1")) == "denied\n"  # ... but the sandbox's init is not dumpable
    _as(alice, service, "deprovision", {"sandboxId": sid})


def test_a_forged_state_file_cannot_steer_root(service: str, tmp_path: object) -> None:
    """A state file is its owner's to write. Root's clean-up must not kill, chown or run as
    anything the file names: pid, cgroup, owner and group come from elsewhere or are checked."""
    alice = _user("corral-alice")
    request = {"version": "1.0.0", "phase": "provision", "containment": "process"}
    sid = _ok(_as(alice, service, "provision", {"request": request}))["sandboxId"]
    _ok(_as(alice, service, "start", {"sandboxId": sid}))
    box = os.path.join(os.path.dirname(service), str(alice.pw_uid), sid.rpartition(":")[2])
    victim = subprocess.Popen(["sleep", "60"])  # a root process alice would like dead
    grouped = subprocess.Popen(["sleep", "60"])  # ... and a cgroup of root's she would empty
    group = f"/sys/fs/cgroup/unified/corral-lifecycle-test-{os.getpid()}"
    os.mkdir(group)
    with open(os.path.join(group, "cgroup.procs"), "w") as f:
        f.write(str(grouped.pid))
    secret = os.path.join(str(tmp_path), "root-only")
    with open(secret, "w") as f:
        f.write("root's")
    os.chmod(secret, 0o600)
    try:
        state_path = os.path.join(box, "state.json")
        with open(state_path) as f:
            forged = json.load(f)
        real_supervisor = forged["supervisor_pid"]
        forged.update(
            phase="deprovisioning", owner_uid=0, owner_gid=0, supervisor_pid=victim.pid,
            supervisor_start=store.process_start_time(victim.pid),
            cgroup=group,
        )  # fmt: skip
        with open(state_path, "w") as f:
            json.dump(forged, f)
        os.chown(state_path, alice.pw_uid, alice.pw_gid)
        from corral.lifecycle import gc

        gc.collect()  # root, for everyone: removes the sandbox "being deprovisioned"
        assert victim.poll() is None, "root's clean-up killed the pid a state file named"
        assert grouped.poll() is None and os.path.isdir(group), "root emptied a named cgroup"
        # The real supervisor is orphaned now (no state claims it) and is alice's: gc kills it.
        assert store.process_start_time(real_supervisor) is None

        other = _ok(_as(alice, service, "provision", {"request": request}))["sandboxId"]
        lock = os.path.join(os.path.dirname(box), other.rpartition(":")[2], "lock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.symlink(secret, lock)
        os.lchown(lock, alice.pw_uid, alice.pw_gid)
        gc.collect()
        assert os.stat(secret).st_uid == 0, "root's locking chowned a symlinked file"
    finally:
        for proc in (victim, grouped):
            proc.kill()
            proc.wait()
        os.rmdir(group)
