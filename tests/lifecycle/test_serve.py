"""The sandbox init as an exec server, driven through the launcher directly (no planner):
one long-lived sandbox, many execs, each in the same namespaces and root."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest

from corral.backends.process.handle import communicate
from corral.backends.process.launcher import ChildSpec, fork_sandbox, read_launch_error
from corral.backends.process.rootfs import MountStep
from corral.errors import CorralError, ErrorCode
from corral.lifecycle import store
from corral.lifecycle.client import start_exec
from corral.lifecycle.launch import SUPERVISOR_NAME, kill_supervisor

ROOT = [
    MountStep("bind", "/usr"),
    MountStep("symlink", "/bin", target="usr/bin"),
    MountStep("symlink", "/lib", target="usr/lib"),
    MountStep("symlink", "/lib64", target="usr/lib64"),
    MountStep("tmpfs", "/tmp", readonly=False),
]
ENV = {"PATH": "/usr/bin:/bin"}


def _start(control: str) -> int:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    listener.bind(control)
    listener.listen(8)
    spec = ChildSpec(
        command=("true",), env={}, cwd="/", mount_steps=list(ROOT),
        unprivileged=os.geteuid() != 0, uid=os.getuid(), gid=os.getgid(),
        control_fd=listener.fileno(), detach=True, process_name=SUPERVISOR_NAME,
    )  # fmt: skip
    launched = fork_sandbox(spec)
    listener.close()
    os.close(launched.lifeline_w)
    assert read_launch_error(launched.error_r) == ""
    return launched.pid


@pytest.fixture
def sandbox(tmp_path: object) -> Iterator[str]:
    control = os.path.join(str(tmp_path), "control.sock")
    pid = _start(control)
    yield control
    kill_supervisor(pid)


def run(control: str, command: str, timeout_ms: int = 0) -> tuple[int, bool, str]:
    proc = start_exec(control, command=("/bin/sh", "-c", command), env=ENV, cwd="/",
                      timeout_ms=timeout_ms, stdin_devnull=True)  # fmt: skip
    with proc:
        out, _ = communicate(proc)
        return proc.wait(), proc.timed_out, out.decode()


@pytest.mark.timeout(30)
def test_exec_shares_the_sandbox_filesystem_and_hides_the_host(
    sandbox: str, tmp_path: object
) -> None:
    host_secret = os.path.join(str(tmp_path), "secret")
    with open(host_secret, "w") as f:
        f.write("host only")
    assert run(sandbox, "echo kept > /tmp/note")[0] == 0
    assert run(sandbox, "cat /tmp/note")[2] == "kept\n"
    code, _, out = run(sandbox, f"cat {host_secret}; ls /")
    assert code != 0 or "host only" not in out
    assert "host only" not in out
    assert sorted(out.split()) == sorted(["bin", "dev", "lib", "lib64", "proc", "tmp", "usr"])


@pytest.mark.timeout(30)
def test_exec_sees_only_the_sandbox_processes(sandbox: str) -> None:
    code, _, out = run(sandbox, "ls /proc | grep -E '^[0-9]+$' | sort -n | head -1")
    assert (code, out) == (0, "1\n")  # the sandbox's own init, not the host's
    assert str(os.getpid()) not in run(sandbox, "ls /proc")[2].split()


@pytest.mark.timeout(30)
def test_exit_codes_and_timeout(sandbox: str) -> None:
    assert run(sandbox, "exit 7")[:2] == (7, False)
    started = time.monotonic()
    code, timed_out, _ = run(sandbox, "sleep 30", timeout_ms=300)
    assert (code, timed_out) == (137, True)
    assert time.monotonic() - started < 5


@pytest.mark.timeout(30)
def test_hanging_up_kills_the_workload(sandbox: str) -> None:
    proc = start_exec(sandbox, command=("/bin/sh", "-c", "echo $$; sleep 60"), env=ENV, cwd="/",
                      timeout_ms=0, stdin_devnull=True)  # fmt: skip
    assert proc.stdout is not None
    pid = proc.stdout.readline().strip().decode()
    proc.close()
    for _ in range(100):
        if run(sandbox, f"test -e /proc/{pid} && echo alive")[2] == "":
            break
        time.sleep(0.05)
    else:
        pytest.fail("the workload survived its caller hanging up")


@pytest.mark.timeout(30)
def test_supervisor_survives_its_creator(tmp_path: object) -> None:
    control = os.path.join(str(tmp_path), "control.sock")
    r, w = os.pipe()
    creator = os.fork()
    if creator == 0:
        os.close(r)
        os.write(w, str(_start(control)).encode())
        os._exit(0)  # the creator leaves; its sandbox must stay
    os.close(w)
    pid = int(os.read(r, 64))
    os.close(r)
    os.waitpid(creator, 0)
    try:
        assert store.process_start_time(pid) is not None
        assert run(control, "echo still here")[2] == "still here\n"
    finally:
        kill_supervisor(pid)
    time.sleep(0.2)
    with pytest.raises(CorralError) as info:
        run(control, "true")
    assert info.value.code == ErrorCode.NOT_STARTED


@pytest.mark.timeout(30)
def test_workload_inherits_no_control_descriptor(sandbox: str) -> None:
    # Only stdio (and ls's own directory handle) may be open in a workload: the init's
    # listening socket and connections would let it drive other execs.
    out = run(sandbox, "ls -l /proc/self/fd")[2]
    targets = [line.rpartition(" -> ")[2] for line in out.splitlines() if " -> " in line]
    assert not [t for t in targets if t.startswith("socket:")], out
    assert len(targets) <= 4, out


@pytest.mark.timeout(30)
def test_pty_exec(sandbox: str) -> None:
    proc = start_exec(sandbox, command=("/bin/sh", "-c", "test -t 0 && echo isatty; stty size"), env=ENV, cwd="/",
                      timeout_ms=5000, pty=(33, 101))  # fmt: skip
    with proc:
        out, _ = communicate(proc)
        assert proc.wait() == 0
    assert out.split() == [b"isatty", b"33", b"101"]


@pytest.mark.timeout(60)
def test_callers_hanging_up_at_any_moment_do_not_kill_init(sandbox: str) -> None:
    for n in range(200):
        proc = start_exec(sandbox, command=("/bin/true",), env=ENV, cwd="/", timeout_ms=0,
                          stdin_devnull=True)  # fmt: skip
        if n % 2:
            time.sleep(0.002)  # sometimes after the exit message was sent
        proc.close()
    assert run(sandbox, "echo alive")[2] == "alive\n"


@pytest.mark.timeout(30)
def test_malformed_requests_are_refused_and_init_survives(sandbox: str) -> None:
    from corral.lifecycle import protocol
    from corral.native.records import record

    null = os.open(os.devnull, os.O_RDWR)
    good = record("A", "/bin/true") + record("C", "/")
    try:
        for bad in (record("C", "/"), record("A", "/bin/true"), good + record("?", "x"),
                    good + b"A\xff\xff\x00\x00", good[:3]):  # fmt: skip
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
                conn.connect(sandbox)
                protocol.send(conn, bad, [null, null, null])
                reply, _ = protocol.receive(conn)
                assert reply is not None and reply["event"] == "error", reply
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
            conn.connect(sandbox)
            protocol.send(conn, good, [null])  # stdio missing
            reply, _ = protocol.receive(conn)
            assert reply is not None and reply["event"] == "error", reply
    finally:
        os.close(null)
    assert run(sandbox, "echo alive")[2] == "alive\n"
