"""Kernel denials reach the audit trail: Landlock and seccomp refusals read from kernel audit
records, attributed to one sandbox by its PID namespace, each naming the actor.

The lower layers are tested with processes restricted here, inside a PID namespace of their
own (``unshare --pid --fork``, whose pid plays the sandbox's supervisor); they also prove the
flags the launcher must pass: without them the kernel writes no record after ``execve``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import fields

import pytest
from audit_support import AGENT

from corral.audit import Actor, AuditLog, verify
from corral.audit.kernel_denials import KernelDenialWatcher
from corral.audit.recorder import Recorder
from corral.backends.base import LaunchOptions
from corral.kernel import audit_netlink

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="reading kernel audit needs root")

LANDLOCK_LOG_NEW_EXEC_ON = 2  # landlock_restrict_self flag
SECCOMP_CTL_LOG = 1  # libseccomp attribute: load with SECCOMP_FILTER_FLAG_LOG (kernel value 2)

# Restricts itself like a sandbox's workload would, then does the forbidden things.
CHILD = r"""
import ctypes, os, sys
import landlockpy, pyseccomp
from landlockpy import AccessFS
secret, restrict_flags, seccomp_log, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
libc = ctypes.CDLL(None, use_errno=True)
ruleset = landlockpy.Ruleset(handled_fs=AccessFS.READ_FILE)
for path in ("/usr", "/lib", "/lib64", "/etc"):
    if os.path.exists(path):
        ruleset.allow_path(path, AccessFS.READ_FILE)
rules = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
for name in ("unshare", "keyctl"):
    rules.add_rule(pyseccomp.ERRNO(1), name)
rules.set_attr(pyseccomp.Attr.CTL_LOG, seccomp_log)
libc.prctl(38, 1, 0, 0, 0)  # no_new_privs
assert libc.syscall(446, ruleset.fileno(), restrict_flags) == 0, ctypes.get_errno()
rules.load()
if mode == "direct":
    try:
        open(secret).read()
        sys.exit("read the secret")
    except PermissionError:
        pass
    assert libc.unshare(0x10000000) == -1  # CLONE_NEWUSER
elif mode == "exec":
    os.execv("/bin/sh", ["sh", "-c", f"cat {secret}; unshare -U true; exit 0"])
else:
    os.execv("/bin/sh", ["sh", "-c", "cat /etc/hostname >/dev/null"])
"""


@pytest.fixture(scope="module", autouse=True)
def kernel_audit_on() -> Iterator[None]:
    """Kernel audit on for these tests, as it was afterwards (never touching an auditd's)."""
    status = audit_netlink.get_status()
    if status.enabled == 0 and status.daemon_pid:
        pytest.skip("kernel audit is off and owned by an audit daemon")
    if status.enabled == 0:
        audit_netlink.set_enabled(True)
    yield
    if status.enabled == 0:
        audit_netlink.set_enabled(False)


@pytest.fixture
def secret(tmp_path: os.PathLike[str]) -> str:
    path = os.path.join(tmp_path, "secret.txt")
    with open(path, "w") as f:
        f.write("token\n")
    return path


def watch(
    log: str, secret: str, *, restrict_flags: int = 0, seccomp_log: int = 1, mode: str = "direct"
) -> list[dict[str, object]]:
    """Run CHILD in its own PID namespace under a watcher; the events it wrote to ``log``.
    CHILD starts once the watcher knows the namespace, as with Corral's launcher."""
    argv = [*IN_OWN_NAMESPACE, sys.executable, "-c", CHILD]
    argv += [secret, str(restrict_flags), str(seccomp_log), mode]
    with KernelDenialWatcher.open() as watcher:
        assert watcher.listening
        child = subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for_own_namespace(child)
        watcher.attach(child.pid)
        _, err = child.communicate(b"go\n", timeout=30)
        assert child.returncode == 0, err
        watcher.finish(Recorder(AuditLog(log), Actor.from_process(AGENT), sandbox="sb-test"))
    return read_log(log)


def read_log(path: str) -> list[dict[str, object]]:
    """The events in ``path`` (none when nothing was written), chain verified."""
    if not os.path.exists(path):
        return []
    assert verify(path).ok
    with open(path) as f:
        return [json.loads(line) for line in f]


# The supervisor takes an audit session of its own, as the launcher must (so records of
# processes that exited before they were read are still attributed), makes a PID namespace
# and waits for a line on stdin before running its command.
IN_OWN_NAMESPACE = [
    "sh", "-c", 'echo 0 >/proc/self/loginuid && exec "$@"', "sh",
    "unshare", "--pid", "--fork", "--kill-child", "sh", "-c", 'read go; exec "$0" "$@"',
]  # fmt: skip


def wait_for_own_namespace(child: subprocess.Popen[bytes]) -> None:
    own = os.stat("/proc/self/ns/pid").st_ino
    deadline = time.monotonic() + 10
    while True:
        try:
            if os.stat(f"/proc/{child.pid}/ns/pid_for_children").st_ino != own:
                return
        except FileNotFoundError:  # briefly while it execs; for good once it exited
            if child.poll() is not None:
                _, err = child.communicate(timeout=10)
                raise AssertionError(f"the child exited {child.returncode}: {err!r}") from None
        assert time.monotonic() < deadline, "unshare never made its PID namespace"
        time.sleep(0.001)


def denials(events: list[dict[str, object]]) -> list[dict[str, object]]:
    return [e for e in events if e["decision"] == "deny"]


def test_parse_record_decodes_quoted_and_hex_strings() -> None:
    text = 'audit(1795935032.787:553): pid=3218 comm="py thon" path=2F746D702F6120622E747874 x=?'
    record = audit_netlink.parse_record(audit_netlink.AUDIT_LANDLOCK_ACCESS, text)
    assert record is not None
    assert (record.serial, record.time) == (553, 1795935032.787)
    assert record.fields == {"pid": "3218", "comm": "py thon", "path": "/tmp/a b.txt", "x": "?"}
    assert record.number("pid") == 3218 and record.number("comm") is None
    assert audit_netlink.parse_record(1300, "no stamp here") is None


@pytest.mark.timeout(60)
def test_landlock_and_seccomp_denials_become_events_with_actor(tmp_path: str, secret: str) -> None:
    log = os.path.join(tmp_path, "audit.jsonl")
    events = denials(watch(log, secret))
    fs = [e for e in events if e["type"] == "fs_denial"]
    assert [(e["data"]["path"], e["data"]["access"]) for e in fs] == [(secret, "read")]  # type: ignore[index]
    sc = [e for e in events if e["type"] == "seccomp_denial"]
    assert [e["data"]["syscall"] for e in sc] == ["unshare"]  # type: ignore[index]
    for e in events:
        assert e["sandbox"] == "sb-test" and isinstance(e["pid"], int)
        assert e["actor"]["kind"] == "agent" and e["actor"]["name"] == "coder"  # type: ignore[index]


@pytest.mark.timeout(60)
def test_after_execve_records_need_the_launcher_flags(tmp_path: str, secret: str) -> None:
    """Denials of the exec'd workload are recorded only with LOG_NEW_EXEC_ON and FLAG_LOG."""
    quiet = denials(watch(os.path.join(tmp_path, "a.jsonl"), secret, seccomp_log=0, mode="exec"))
    assert quiet == []  # the attack still failed (the child exits 0 only if cat was refused)
    logged = watch(
        os.path.join(tmp_path, "b.jsonl"),
        secret,
        restrict_flags=LANDLOCK_LOG_NEW_EXEC_ON,
        seccomp_log=SECCOMP_CTL_LOG,
        mode="exec",
    )
    found = {
        (e["type"], e["data"].get("path") or e["data"].get("syscall")) for e in denials(logged)
    }  # type: ignore[union-attr]
    assert ("fs_denial", secret) in found and ("seccomp_denial", "unshare") in found


@pytest.mark.timeout(60)
def test_a_workload_that_does_nothing_forbidden_has_no_denials(tmp_path: str, secret: str) -> None:
    log = os.path.join(tmp_path, "audit.jsonl")
    assert watch(log, secret, restrict_flags=LANDLOCK_LOG_NEW_EXEC_ON, mode="clean") == []


@pytest.mark.timeout(60)
def test_denials_outside_the_sandbox_are_not_attributed(tmp_path: str, secret: str) -> None:
    """A restricted process on the host (not in the sandbox's namespace) is someone else's."""
    log = os.path.join(tmp_path, "audit.jsonl")
    stranger = [sys.executable, "-c", CHILD, secret, "0", "1", "direct"]
    with KernelDenialWatcher.open() as watcher:
        sandbox = subprocess.Popen(
            [*IN_OWN_NAMESPACE, "true"], stdin=subprocess.PIPE, stderr=subprocess.PIPE
        )
        wait_for_own_namespace(sandbox)
        watcher.attach(sandbox.pid)
        subprocess.run(stranger, check=True, timeout=30)
        sandbox.communicate(b"go\n", timeout=30)
        watcher.finish(Recorder(AuditLog(log), Actor.from_process(AGENT)))
    assert denials(read_log(log)) == []


@pytest.mark.timeout(60)
def test_unprivileged_caller_runs_and_the_trail_says_why_denials_are_missing(
    request: pytest.FixtureRequest,
) -> None:
    from tests.conftest import ensure_test_user

    user = ensure_test_user()
    log = os.path.join("/tmp", f"corral-kd-{os.getpid()}.jsonl")  # one the user can write
    request.addfinalizer(lambda: os.path.exists(log) and os.unlink(log))
    code = (
        "from corral.audit import Actor, AuditLog\n"
        "from corral.audit.kernel_denials import KernelDenialWatcher\n"
        "from corral.audit.recorder import Recorder\n"
        "with KernelDenialWatcher.open() as w:\n"
        f"    w.finish(Recorder(AuditLog({log!r}), Actor.from_process()))\n"
    )
    subprocess.run(
        ["runuser", "-u", user.pw_name, "--", "/opt/corral/venv/bin/python", "-c", code],
        check=True,
        timeout=30,
    )
    (note,) = read_log(log)
    assert note["type"] == "kernel_audit" and note["data"]["available"] is False
    assert "CAP_AUDIT_READ" in note["reason"] or "CAP_AUDIT_CONTROL" in note["reason"]


def launcher_asks_for_denial_records() -> bool:
    return "log_denials" in {f.name for f in fields(LaunchOptions)}


@pytest.mark.timeout(120)
@pytest.mark.skipif(
    not launcher_asks_for_denial_records(),
    reason="the process backend does not yet pass LaunchOptions.log_denials to the launcher",
)
def test_sdk_run_records_the_workloads_kernel_denials(
    tmp_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import corral

    log = os.path.join(tmp_path, "audit.jsonl")
    monkeypatch.setenv("CORRAL_AUDIT_LOG", log)
    actor = {"kind": "agent", "name": "coder-9", "session": "s-1"}
    # deniedPaths are enforced by the mount namespace (the file is not there), which the kernel
    # does not audit; the Landlock path is covered with self-restricted processes above.
    request = {
        "process": {"commandLine": "unshare -U true; exit 0"},
        "corral": {"actor": actor},
    }
    assert corral.run(request).exit_code == 0
    events = read_log(log)
    found = [(e["type"], e["data"]["syscall"]) for e in denials(events)]  # type: ignore[index]
    assert found == [("seccomp_denial", "unshare")]
    assert denials(events)[0]["actor"]["name"] == "coder-9"  # type: ignore[index]
    assert [e["type"] for e in events][-1] == "exit"
