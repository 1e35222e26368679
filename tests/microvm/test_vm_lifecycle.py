"""`microvm` sandboxes through the lifecycle: provision, start (a VM kept running by a detached
owner), exec through the guest agent, stop, deprovision, and `corral gc` after the owner is
SIGKILLed. One sandbox is shared by the module (each start restores a VM: about half a second
under TCG); tests that stop it start it again, so they pass in any order."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from microvm_support import TERMINAL_SCRIPT, process_alive, read_until

from corral.backends.microvm import MicrovmBackend
from corral.backends.microvm.limits import QEMU_OVERHEAD_MB
from corral.errors import CorralError, ErrorCode
from corral.lifecycle import api, gc, manager, store

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

MEMORY_MB, CPU_PERCENT = 256, 50


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, backend: MicrovmBackend) -> Iterator[str]:
    base = str(tmp_path_factory.mktemp("vmrun") / "corral")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CORRAL_RUN_DIR", base)
        mp.setenv("CORRAL_NO_SERVICE", "1")
        yield base
        for entry in manager.list_sandboxes():
            with contextlib.suppress(CorralError):
                api.deprovision_container(entry["sandboxId"])
        gc.collect()


@pytest.fixture(scope="module")
def shared(run_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vmshared")
    path.chmod(0o777)  # QEMU runs as nobody
    return path


def request(shared: Path, **corral: Any) -> dict[str, Any]:
    return {
        "version": "1.1.0-alpha",
        "phase": "provision",
        "containment": "microvm",
        "filesystem": {"readwritePaths": [str(shared)]},
        "corral": corral,
    }


@pytest.fixture(scope="module")
def sandbox(shared: Path) -> str:
    resources = {"memoryMb": MEMORY_MB, "cpuPercent": CPU_PERCENT}
    sid = api.provision_container(request(shared, resources=resources), experimental=True)
    return sid.container_id


def started(sid: str) -> str:
    if _entry(sid)["phase"] != "started":
        api.start_container(sid)
    return sid


def _entry(sid: str) -> dict[str, Any]:
    return next(e for e in manager.list_sandboxes() if e["sandboxId"] == sid)


def owner_pid(sid: str) -> int:
    pid = _entry(sid)["supervisorPid"]
    assert isinstance(pid, int)
    return pid


def qemu_of(owner: int) -> int:
    with open(f"/proc/{owner}/task/{owner}/children") as f:
        for child in f.read().split():
            with open(f"/proc/{child}/comm") as c:
                if c.read().startswith("qemu-system"):
                    return int(child)
    raise AssertionError(f"no QEMU under the owner {owner}")


def vm_run_dir(run_dir: str, qemu: int) -> str:
    """QEMU's run directory (stage, logs), found by the pid it records."""
    base = os.path.join(run_dir, "microvm")
    for name in os.listdir(base):
        with contextlib.suppress(OSError):
            if Path(base, name, "qemu.pid").read_text() == str(qemu):
                return os.path.join(base, name)
    raise AssertionError(f"no run directory for QEMU {qemu}")


def sandbox_path(run_dir: str, sid: str) -> str:
    return os.path.join(run_dir, "0", sid.rpartition(":")[2])


def wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 10
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not process_alive(pid)


def assert_released(run_dir: str, sid: str, owner: int, qemu: int, qemu_dir: str) -> None:
    """No owner, no QEMU, no control socket, no QEMU run directory, no cgroup left."""
    wait_gone(owner)
    wait_gone(qemu)
    assert not os.path.exists(os.path.join(sandbox_path(run_dir, sid), store.CONTROL_SOCKET))
    assert not os.path.exists(qemu_dir)
    assert manager.cgroup_name(sid.rpartition(":")[2]) not in {
        os.path.basename(p) for p in gc.sandbox_cgroups()
    }


def code_of(call: Any, *args: Any) -> ErrorCode:
    with pytest.raises(CorralError) as info:
        call(*args)
    return info.value.code


def test_provision_validates_without_booting(run_dir: str, shared: Path) -> None:
    assert code_of(api.provision_container, request(shared)) == ErrorCode.UNSUPPORTED_CONTAINMENT
    # a limit a VM cannot enforce fails at provision, before anything is kept
    with pytest.raises(CorralError, match="pids"):
        api.provision_container(request(shared, resources={"pids": 10}), experimental=True)
    sid = api.provision_container(request(shared), experimental=True).container_id
    assert sid.startswith("corral-microvm:")
    assert _entry(sid)["phase"] == "provisioned" and _entry(sid)["supervisorPid"] is None
    assert code_of(api.run_in_container, sid, "true") == ErrorCode.NOT_STARTED
    assert code_of(api.stop_container, sid) == ErrorCode.NOT_STARTED
    api.deprovision_container(sid)
    assert code_of(api.start_container, sid) == ErrorCode.STALE_ID


def test_exec_output_exit_code_and_stdin(sandbox: str) -> None:
    result = api.run_in_container(started(sandbox), "echo out; echo err >&2; exit 7")
    assert (result.stdout, result.stderr, result.exit_code) == ("out\n", "err\n", 7)
    assert api.run_in_container(sandbox, "tr a-z A-Z", input=b"hello").stdout == "HELLO"
    assert code_of(api.start_container, sandbox) == ErrorCode.ALREADY_STARTED


def test_execs_share_the_running_vm(sandbox: str, shared: Path) -> None:
    started(sandbox)
    api.run_in_container(sandbox, f"echo kept > /tmp/state; echo host > {shared}/from-guest")
    assert api.run_in_container(sandbox, "cat /tmp/state").stdout == "kept\n"
    assert (shared / "from-guest").read_text() == "host\n"


def test_timeout_kills_the_workload_not_the_vm(sandbox: str) -> None:
    exec_request = {"version": "1.1.0-alpha", "phase": "exec", "sandboxId": started(sandbox),
                    "process": {"commandLine": "sleep 60", "timeout": 1000}}  # fmt: skip
    result = api.run_in_container(sandbox, exec_request)
    assert result.timed_out and result.exit_code == 137
    assert api.run_in_container(sandbox, "echo alive").stdout == "alive\n"


def test_one_exec_at_a_time(sandbox: str) -> None:
    with api.spawn_in_container(started(sandbox), "sleep 30"):
        assert code_of(api.run_in_container, sandbox, "true") == ErrorCode.BACKEND_ERROR
    assert api.run_in_container(sandbox, "echo free").stdout == "free\n"


def test_pty_exec_in_the_running_vm(sandbox: str) -> None:
    """The caller's pty slave goes to the owner, relayed to a terminal in the guest; a resize
    of the caller's pty reaches the guest."""
    with api.spawn_in_container_with_pty(started(sandbox), TERMINAL_SCRIPT, 30, 100) as proc:
        assert proc.pty_fd is not None
        assert read_until(proc.pty_fd, b"30 100\r\n").endswith(b"on-a-tty\r\n30 100\r\n")
        os.write(proc.pty_fd, b"typed\r")
        assert b"got:typed\r\n" in read_until(proc.pty_fd, b"got:typed\r\n")
        proc.resize(40, 120)
        assert b"40 120" in read_until(proc.pty_fd, b"40 120")
        assert proc.wait(30) == 3


def test_qemu_runs_in_a_cgroup_with_the_limits(sandbox: str) -> None:
    """corral.resources on the QEMU process itself: memory (guest RAM + QEMU's own) and CPU."""
    qemu = qemu_of(owner_pid(started(sandbox)))
    name = manager.cgroup_name(sandbox.rpartition(":")[2])
    with open(f"/proc/{qemu}/cgroup") as f:
        groups = {line.split(":")[1]: line.split(":")[2].strip() for line in f}
    from corral.kernel import cgroups

    host = cgroups.detect()
    memory, cpu = host.controllers["memory"], host.controllers["cpu"]
    member = {c: g for c, g in groups.items() if g.endswith("/" + name)}
    memory_dir = cpu_dir = None
    for controllers, group in member.items():
        if "memory" in controllers.split(",") or (memory.version == 2 and controllers == ""):
            memory_dir = memory.mount + group
        if "cpu" in controllers.split(",") or (cpu.version == 2 and controllers == ""):
            cpu_dir = cpu.mount + group
    assert memory_dir is not None and cpu_dir is not None, groups
    limit = (MEMORY_MB + QEMU_OVERHEAD_MB) * 1024 * 1024
    if memory.version == 1:
        assert int(Path(memory_dir, "memory.limit_in_bytes").read_text()) == limit
        quota = int(Path(cpu_dir, "cpu.cfs_quota_us").read_text())
        period = int(Path(cpu_dir, "cpu.cfs_period_us").read_text())
    else:
        assert int(Path(memory_dir, "memory.max").read_text()) == limit
        quota, period = map(int, Path(cpu_dir, "cpu.max").read_text().split())
    assert quota * 100 // period == CPU_PERCENT


def test_stop_leaves_no_qemu_socket_or_image_and_start_again(run_dir: str, sandbox: str) -> None:
    owner = owner_pid(started(sandbox))
    qemu = qemu_of(owner)
    qemu_dir = vm_run_dir(run_dir, qemu)
    api.stop_container(sandbox)
    assert _entry(sandbox)["phase"] == "stopped"
    assert_released(run_dir, sandbox, owner, qemu, qemu_dir)
    assert code_of(api.run_in_container, sandbox, "true") == ErrorCode.NOT_STARTED
    assert code_of(api.stop_container, sandbox) == ErrorCode.ALREADY_STOPPED
    api.start_container(sandbox)
    result = api.run_in_container(sandbox, "test -e /tmp/state || echo fresh")
    assert result.stdout == "fresh\n"  # a new VM: the guest's /tmp is new


def test_gc_after_the_owner_is_killed(run_dir: str, sandbox: str) -> None:
    owner = owner_pid(started(sandbox))
    qemu = qemu_of(owner)
    qemu_dir = vm_run_dir(run_dir, qemu)
    os.kill(owner, signal.SIGKILL)
    wait_gone(qemu)  # QEMU dies with its owner (PR_SET_PDEATHSIG)
    assert os.path.isdir(qemu_dir)  # what the owner could not clean up
    assert sandbox in gc.collect()["stopped"]  # its release sweeps the run directory
    assert_released(run_dir, sandbox, owner, qemu, qemu_dir)
    assert api.run_in_container(started(sandbox), "echo back").stdout == "back\n"


def test_deprovision_removes_everything(run_dir: str, shared: Path) -> None:
    sid = api.provision_container(request(shared), experimental=True).container_id
    owner = owner_pid(started(sid))
    qemu = qemu_of(owner)
    qemu_dir = vm_run_dir(run_dir, qemu)
    api.deprovision_container(sid)
    assert_released(run_dir, sid, owner, qemu, qemu_dir)
    assert not os.path.exists(sandbox_path(run_dir, sid))
    assert code_of(api.run_in_container, sid, "true") == ErrorCode.STALE_ID
    assert code_of(api.start_container, sid) == ErrorCode.STALE_ID
