"""Crash safety: kill supervisors and callers at random points, then `corral gc` must leave no
supervisor, init, cgroup or state behind. CORRAL_FAULT_LIFECYCLES=200 for the full run."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from lifecycle_support import needs_lifecycle

from corral.lifecycle import gc, store
from corral.lifecycle.launch import INIT_NAME, SUPERVISOR_NAME

pytestmark = [needs_lifecycle]
LIFECYCLES = int(os.environ.get("CORRAL_FAULT_LIFECYCLES", "30"))
PROVISION = {"version": "1.0.0", "phase": "provision", "containment": "process"}


def _corral_processes() -> list[int]:
    """This test's supervisors and inits (other runs' sandboxes are not ours to kill)."""
    return [pid for pid, _ in gc.corral_processes(store.run_dir(), {SUPERVISOR_NAME, INIT_NAME})]


def _one_lifecycle(rng: random.Random) -> None:
    """In a forked caller that may be SIGKILLed by the parent at any moment."""
    from corral.lifecycle import api

    sid = api.provision_container(PROVISION).container_id
    api.start_container(sid)
    api.run_in_container(sid, "echo x > /tmp/x")
    if rng.random() < 0.5:
        api.stop_container(sid)
        api.start_container(sid)
    if rng.random() < 0.7:
        api.deprovision_container(sid)


class _Service:
    """`corral serve` in a subprocess that the test may kill and restart."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "CORRAL_NO_SERVICE"}
        self.proc = subprocess.Popen([sys.executable, "-m", "corral", "serve"], env=env)
        for _ in range(200):
            if os.path.exists(store.service_socket()):
                return
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(store.service_socket())  # a killed service leaves its socket


@pytest.mark.timeout(900)
@pytest.mark.parametrize("through_service", [False, True])
def test_random_kills_then_gc_leaves_nothing(run_dir: str, through_service: bool) -> None:
    rng = random.Random(int(os.environ.get("CORRAL_FAULT_SEED", "5")))
    service = _Service()
    victims = ["caller", "supervisor", "none"] + (["service"] if through_service else [])
    if through_service:
        service.start()
    try:
        for _ in range(LIFECYCLES):
            caller = os.fork()
            if caller == 0:
                code = 0
                try:
                    if through_service:
                        os.environ.pop("CORRAL_NO_SERVICE", None)
                    _one_lifecycle(rng)
                except BaseException:
                    code = 1
                os._exit(code)
            time.sleep(rng.uniform(0, 0.06))
            victim = rng.choice(victims)
            if victim == "caller":
                os.kill(caller, signal.SIGKILL)
            elif victim == "supervisor":
                for pid in _corral_processes():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            elif victim == "service":
                service.kill()
            os.waitpid(caller, 0)
            if victim == "service":
                service.start()  # runs `gc` at start
    finally:
        service.kill()
    report = gc.collect()
    from corral.lifecycle import api

    for entry in api.list_containers():  # what the owner still holds is theirs to remove
        api.deprovision_container(entry["sandboxId"])
    gc.collect()
    time.sleep(0.2)
    assert _corral_processes() == []
    left = os.path.join(run_dir, str(os.getuid()))
    assert {d: store.load(os.path.join(left, d)) for d in os.listdir(left)} == {}
    assert gc.sandbox_cgroups() == []
    assert isinstance(report, dict)
