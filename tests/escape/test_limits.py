"""Resource and lifetime attacks: fork bombs, memory hogs, outliving the timeout or the caller.

Cgroup limits need a writable cgroup hierarchy, which only root has on this machine, so these
run as root; an unprivileged request for limits must be refused (fail closed).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from tests.conftest import SRC, Runner
from tests.escape.test_escape import Scene

import corral


@pytest.fixture
def root_scene(root_runner: Runner, tmp_path_factory: pytest.TempPathFactory) -> Scene:
    area = str(tmp_path_factory.mktemp("limits"))
    return Scene(root_runner, area)


def _marker_processes(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if marker in " ".join(p.info["cmdline"] or []):
            found.append(p)
    return found


@pytest.mark.timeout(120)
def test_fork_bomb_hits_pids_limit(root_scene: Scene) -> None:
    outside = root_scene.outside("fork_bomb", 64)
    assert outside == "OK forked 64"
    inside = root_scene.inside("fork_bomb", 64, corral={"resources": {"pids": 16}})
    assert inside.startswith("DENIED EAGAIN"), inside


@pytest.mark.timeout(120)
def test_memory_limit_kills_the_sandbox_not_the_host(root_scene: Scene) -> None:
    assert root_scene.outside("allocate", 256).startswith("OK")
    result = root_scene.runner.run(
        {
            "process": {"commandLine": root_scene.command("allocate", 256)},
            "filesystem": {"readonlyPaths": [root_scene.tools]},
            "corral": {"resources": {"memoryMb": 64}},
        }
    )
    assert result.exit_code == 128 + signal.SIGKILL, result
    assert "OK" not in result.stdout


@pytest.mark.timeout(60)
def test_timeout_kills_the_whole_tree(root_scene: Scene) -> None:
    marker = f"corral-timeout-{os.getpid()}"
    started = time.monotonic()
    result = corral.run(
        {
            "version": "1.0.0",
            "process": {
                "commandLine": f"(sleep 300; : {marker}) & sleep 300; : {marker}",
                "timeout": 1000,
            },
        }
    )
    assert result.timed_out
    assert time.monotonic() - started < 30
    assert _marker_processes(marker) == []


@pytest.mark.timeout(60)
def test_sandbox_dies_with_its_caller() -> None:
    marker = f"corral-orphan-{os.getpid()}"
    caller = (
        "import corral,sys,time\n"
        f"p=corral.spawn({{'version':'1.0.0','process':{{'commandLine':'sleep 300; : {marker}'}}}})\n"
        "print(p.pid, flush=True)\ntime.sleep(300)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", caller],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert proc.stdout is not None
    int(proc.stdout.readline())
    deadline = time.monotonic() + 10
    while not _marker_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _marker_processes(marker), "the workload never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while _marker_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _marker_processes(marker) == []


def test_unprivileged_limits_fail_closed(runner: Runner) -> None:
    if runner.uid == 0:
        pytest.skip("root can write cgroups here")
    result = runner.run({"process": {"commandLine": "true"}, "corral": {"resources": {"pids": 16}}})
    assert result.exit_code == -1
    assert "cgroup" in result.stderr
