"""The micro-VM backend, attacked from inside a real guest (TCG on hosts without usable KVM)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from microvm_support import TERMINAL_SCRIPT, Tree, make_plan, process_alive, read_until, run

from corral.backends.base import LaunchOptions
from corral.backends.microvm import MicroVM, MicrovmBackend
from corral.backends.microvm.vm import RUN_DIR, sweep_stale
from corral.errors import CorralError

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]


def test_probe_names_the_accelerator_and_mechanisms(backend: MicrovmBackend) -> None:
    info = backend.probe()
    assert {"hypervisor", "mount-namespace", "network-namespace", "guest-filesystem"} <= set(
        info.mechanisms
    )
    assert f"accel={backend.accelerator().name}" in info.mechanisms["hypervisor"]


def test_guest_speed_options_only_under_tcg(backend: MicrovmBackend, vm: MicroVM) -> None:
    """User-space ASLR is off in the guest exactly when QEMU emulates (and the probe says so)."""
    tcg = backend.accelerator().name == "tcg"
    assert run(vm, "cat /proc/sys/kernel/randomize_va_space").out == ("0\n" if tcg else "2\n")
    assert ("norandmaps" in backend.probe().mechanisms["hypervisor"]) == tcg


def test_output_streams_and_exit_code(vm: MicroVM) -> None:
    result = run(vm, "echo out; echo err >&2; exit 7")
    assert (result.code, result.out, result.err) == (7, "out\n", "err\n")


def test_stdin_env_and_cwd(vm: MicroVM, tree: Tree) -> None:
    env = {"GREETING": "hi", "PATH": "/usr/bin:/bin"}
    with vm.exec(
        ["/bin/sh", "-c", "pwd; echo $GREETING; tr a-z A-Z"], cwd=str(tree.ro), env=env
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"from stdin\n")
        proc.stdin.close()
        out = proc.stdout.read().decode()
        assert proc.wait(60) == 0
    assert out == f"{tree.ro}\nhi\nFROM STDIN\n"


def test_signal_exit_code_is_128_plus_n(vm: MicroVM) -> None:
    assert run(vm, "kill -TERM $$").code == 128 + signal.SIGTERM


def test_read_write_grant_is_writable(vm: MicroVM, tree: Tree) -> None:
    """The control for the read-only test: the same write works where it is granted."""
    assert run(vm, f"echo written > {tree.rw}/new").code == 0
    assert (tree.rw / "new").read_text() == "written\n"


def test_read_only_grant_is_not_writable_even_by_guest_root(vm: MicroVM, tree: Tree) -> None:
    assert run(vm, f"cat {tree.ro}/data").out == "read-only data\n"
    # Guest root remounts its view read-write first: the read-only bind lives on the host side.
    attack = f"mount -o remount,rw / 2>/dev/null; echo pwned > {tree.ro}/data; echo pwned > {tree.ro}/new"
    result = run(vm, attack)
    assert result.code != 0
    assert "Read-only file system" in result.err
    assert (tree.ro / "data").read_text() == "read-only data\n"
    assert not (tree.ro / "new").exists()


def test_guest_root_cannot_plant_setuid_root_files_or_devices(vm: MicroVM, tree: Tree) -> None:
    """QEMU serves the share as nobody without CAP_CHOWN/CAP_FOWNER/CAP_MKNOD."""
    (tree.rw / "host-owned").write_text("#!/bin/sh\n")
    attack = (
        f"cd {tree.rw}; cp /bin/true planted; chown 0:0 planted; chmod 4755 planted; "
        "chmod 4755 host-owned; mknod disk b 8 0; mknod mem c 1 1; ls -ln"
    )
    run(vm, attack)
    planted = os.stat(tree.rw / "planted")
    assert planted.st_uid != 0 and planted.st_gid != 0  # a set-uid bit, if any, is nobody's
    assert not os.stat(tree.rw / "host-owned").st_mode & 0o6000
    assert not (tree.rw / "disk").exists() and not (tree.rw / "mem").exists()


def test_qemu_runs_unprivileged(vm: MicroVM) -> None:
    with open(f"/proc/{vm.pid}/status") as f:
        status = dict(line.split(":", 1) for line in f.read().splitlines())
    assert status["Uid"].split()[:3] == ["65534"] * 3
    assert int(status["CapEff"], 16) == 0b110  # CAP_DAC_OVERRIDE | CAP_DAC_READ_SEARCH
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"  # QEMU's own -sandbox filter


def test_denied_path_inside_a_grant_is_empty_and_unwritable(vm: MicroVM, tree: Tree) -> None:
    result = run(
        vm,
        f"ls -A {tree.denied}; cat {tree.denied}/key; echo x > {tree.denied}/key; umount {tree.denied}",
    )
    assert "DENIED-SECRET" not in result.out
    assert result.out.strip() == ""
    assert (tree.denied / "key").read_text() == "DENIED-SECRET\n"


def test_unshared_host_paths_are_invisible(vm: MicroVM, tree: Tree) -> None:
    result = run(
        vm, f"ls {tree.hidden.parent}; cat {tree.hidden}/key; ls /root /home /etc/shadow /var"
    )
    assert result.out.split() == ["ro", "rw"]  # the granted siblings only
    assert "HIDDEN-SECRET" not in result.out
    for path in (f"{tree.hidden}/key", "/root", "/home", "/etc/shadow", "/var"):
        assert f"{path}': No such file" in result.err or f"{path}: No such file" in result.err
    assert os.path.exists(tree.hidden / "key")  # it is there on the host


def test_network_is_denied_by_default(vm: MicroVM) -> None:
    """No network device at all; a connect to a listening host address fails."""
    host_ip = _host_address()
    with socket.create_server(("0.0.0.0", 0)) as server:
        port = server.getsockname()[1]
        socket.create_connection(
            (host_ip, port), timeout=2
        ).close()  # control: reachable on the host
        devices = run(vm, "cat /proc/net/dev").out.splitlines()[2:]
        assert [line.split(":")[0].strip() for line in devices] == ["lo"]
        attack = (
            "import socket,sys\n"
            f"try: socket.create_connection(({host_ip!r},{port}),timeout=3)\n"
            "except OSError as e: print('blocked', e.errno); sys.exit(0)\n"
            "print('connected')"
        )
        result = run(vm, f'python3 -c "{attack}"')
    assert "blocked" in result.out, result


def test_timeout_kills_the_guest_workload(vm: MicroVM) -> None:
    start = time.monotonic()
    result = run(vm, "sleep 60 & sleep 60", timeout_ms=1500)
    assert result.timed_out
    assert result.code == 128 + signal.SIGKILL
    assert time.monotonic() - start < 20
    assert run(vm, "pgrep -x sleep").code == 1  # nothing of it survives in the guest


def test_background_jobs_die_with_the_workload(vm: MicroVM) -> None:
    assert run(vm, "sleep 100 > /dev/null 2>&1 & echo started").out == "started\n"
    assert run(vm, "pgrep -x sleep").code == 1


def test_kill_stops_a_running_workload(vm: MicroVM) -> None:
    with vm.exec(["/bin/sh", "-c", "sleep 60"], cwd="/", env={}) as proc:
        proc.kill()
        assert proc.wait(10) == 128 + signal.SIGKILL
        assert not proc.timed_out


def test_pty_exec_runs_on_a_guest_terminal_and_follows_resizes(vm: MicroVM) -> None:
    env = {"PATH": "/usr/bin:/bin"}
    options = LaunchOptions(pty=(30, 100))
    with vm.exec(["/bin/sh", "-c", TERMINAL_SCRIPT], cwd="/", env=env, options=options) as proc:
        assert proc.pty_fd is not None
        assert read_until(proc.pty_fd, b"30 100\r\n").endswith(b"on-a-tty\r\n30 100\r\n")
        os.write(proc.pty_fd, b"typed\r")  # the guest's line discipline echoes it and ends the line
        assert b"typed\r\ngot:typed\r\n" in read_until(proc.pty_fd, b"got:typed\r\n")
        proc.resize(40, 120)
        assert b"40 120" in read_until(proc.pty_fd, b"40 120")
        assert proc.wait(30) == 3


def test_one_exec_at_a_time(vm: MicroVM) -> None:
    with (
        vm.exec(["/bin/sh", "-c", "sleep 60"], cwd="/", env={}),
        pytest.raises(CorralError, match="already running"),
    ):
        vm.exec(["/bin/true"], cwd="/", env={})


def test_one_shot_launch_leaves_nothing_behind(backend: MicrovmBackend, tree: Tree) -> None:
    before = set(os.listdir(RUN_DIR))
    fds_before = len(os.listdir("/proc/self/fd"))
    plan = make_plan(backend, tree, f"cat {tree.ro}/data; exit 3")
    proc = backend.launch(plan, LaunchOptions(stdin="devnull"))
    assert proc.stdout is not None
    assert proc.stdout.read() == b"read-only data\n"
    assert proc.wait(60) == 3
    new_dirs = set(os.listdir(RUN_DIR)) - before
    assert len(new_dirs) == 1 and process_alive(proc.pid)
    proc.close()
    assert not process_alive(proc.pid)
    assert set(os.listdir(RUN_DIR)) == before  # no socket, log or staging directory left
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_qemu_dies_with_its_parent() -> None:
    """SIGKILL the process that booted a VM: QEMU must die too, and the next boot sweeps
    the run directory it left."""
    before = set(os.listdir(RUN_DIR))
    script = (
        "from corral.backends.microvm import MicrovmBackend, MicroVM\n"
        "from corral.backends.microvm.qemu import Machine\n"
        "from corral.policy.filesystem import FilesystemPolicy\n"
        "b = MicrovmBackend()\n"
        "MicroVM.boot(FilesystemPolicy((), ()), Machine('tcg', 128, 1), b.image())\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script])
    pid = _wait_for_qemu_pid(before)
    assert process_alive(pid)
    child.kill()
    child.wait()
    deadline = time.monotonic() + 10
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(pid)
    sweep_stale(RUN_DIR)
    assert set(os.listdir(RUN_DIR)) == before


def test_sweep_kills_a_qemu_that_outlived_its_owner(backend: MicrovmBackend, tree: Tree) -> None:
    """A QEMU whose owner is gone (here: the run directory names an exited process) is killed by
    the sweep `corral gc` runs, and its run directory removed; a live owner's VM is kept."""
    vm = backend.boot(make_plan(backend, tree))
    try:
        rundir = next(
            f"{RUN_DIR}/{n}" for n in os.listdir(RUN_DIR) if _read(f"{RUN_DIR}/{n}/qemu.pid") == str(vm.pid)
        )  # fmt: skip
        sweep_stale(RUN_DIR)
        assert process_alive(vm.pid) and os.path.isdir(rundir)  # its owner (us) lives
        gone = subprocess.Popen(["sleep", "60"])
        with open(f"/proc/{gone.pid}/stat") as f:
            gone_start = f.read().rpartition(")")[2].split()[19]
        gone.kill()
        gone.wait()
        owner, qemu_start = _read(f"{rundir}/owner").split()[0::2]
        assert owner == str(os.getpid())
        with open(f"{rundir}/owner", "w") as f:
            f.write(f"{gone.pid} {gone_start} {qemu_start}")
        assert rundir in sweep_stale(RUN_DIR)
        assert not process_alive(vm.pid) and not os.path.exists(rundir)
    finally:
        vm.shutdown()


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def test_guests_resumed_from_one_snapshot_do_not_share_randomness(
    backend: MicrovmBackend, vm: MicroVM, tree: Tree
) -> None:
    read_random = "head -c 32 /dev/urandom | od -An -tx1"
    plan = make_plan(backend, tree, read_random)
    with backend.launch(plan, LaunchOptions(stdin="devnull")) as other:
        assert other.stdout is not None
        theirs = other.stdout.read()
        assert other.wait(60) == 0
    ours = run(vm, read_random).out.encode()
    assert len(ours) > 64 and ours != theirs


def _wait_for_qemu_pid(before: set[str]) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for name in set(os.listdir(RUN_DIR)) - before:
            try:
                with open(f"{RUN_DIR}/{name}/qemu.pid") as f:
                    return int(f.read())
            except (OSError, ValueError):
                pass
        time.sleep(0.05)
    raise AssertionError("no QEMU started")


def _host_address() -> str:
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True
    )
    for line in out.stdout.splitlines():
        return line.split()[3].split("/")[0]
    return "127.0.0.1"
