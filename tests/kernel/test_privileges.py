"""Privilege drop, attacked for real: root in a forked child tries to use what it gave up."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.errors import CorralError
from corral.kernel import privileges

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(os.geteuid() != 0, reason="the privilege drop is tested from root"),
]

Runner = Callable[..., Any]
_CAP_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")


def _status_of(text: str) -> dict[str, str]:
    fields = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
    return {name: fields[name].strip() for name in _CAP_FIELDS}


def _own_status() -> dict[str, str]:
    return _status_of(Path("/proc/self/status").read_text())


def _status_after_exec() -> dict[str, str]:
    shell = subprocess.run(
        ["/bin/sh", "-c", "cat /proc/self/status"], capture_output=True, text=True
    )
    return _status_of(shell.stdout)


@pytest.fixture(scope="module")
def drop() -> Callable[[], None]:
    return privileges.prepare_privilege_drop().apply


_NOTHING = {name: "0000000000000000" for name in _CAP_FIELDS[:-1]} | {"NoNewPrivs": "1"}


def test_every_capability_set_is_empty(in_child: Runner, drop: Callable[[], None]) -> None:
    assert in_child(_own_status)["CapEff"] != "0000000000000000"
    assert in_child(_own_status, drop) == _NOTHING


def test_root_regains_nothing_through_exec(in_child: Runner, drop: Callable[[], None]) -> None:
    assert in_child(_status_after_exec)["CapEff"] != "0000000000000000"
    assert in_child(_status_after_exec, drop) == _NOTHING


def test_chown_to_another_user_is_denied(
    in_child: Runner, drop: Callable[[], None], tmp_path: Path
) -> None:
    target = tmp_path / "owned-by-root"
    target.write_text("x")
    give_away = lambda: os.chown(target, 65534, 65534)  # noqa: E731
    assert in_child(give_away, drop) == "EPERM"
    assert target.stat().st_uid == 0
    assert in_child(give_away) == "ok"
    assert target.stat().st_uid == 65534


@pytest.fixture
def setuid_id() -> Iterator[str]:
    """A setuid-root copy of ``id`` where ``nobody`` can run it (not under the 0700 test tmp)."""
    folder = tempfile.mkdtemp(prefix="corral-t-setuid-", dir="/var/tmp")
    os.chmod(folder, 0o755)
    binary = os.path.join(folder, "id")
    shutil.copy("/usr/bin/id", binary)
    os.chmod(binary, 0o4755)
    yield binary
    shutil.rmtree(folder)


def test_setuid_binary_grants_nothing(
    in_child: Runner, drop: Callable[[], None], setuid_id: str
) -> None:
    def become_nobody() -> None:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    effective_uid = lambda: subprocess.run(  # noqa: E731
        [setuid_id, "-u"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert in_child(effective_uid, become_nobody) == "0"
    assert in_child(effective_uid, become_nobody, drop) == "65534"


def test_kept_capability_survives_exec_and_nothing_else(in_child: Runner) -> None:
    cap_net_bind_service = 10
    keep = privileges.prepare_privilege_drop(keep_caps=[cap_net_bind_service]).apply
    only_that = f"{1 << cap_net_bind_service:016x}"
    status = in_child(_status_after_exec, keep)
    assert status == {
        "CapInh": only_that,
        "CapPrm": only_that,
        "CapEff": only_that,
        "CapBnd": only_that,
        "CapAmb": only_that,
        "NoNewPrivs": "1",
    }


def test_unknown_capability_is_a_clear_error() -> None:
    with pytest.raises(CorralError, match="unknown capabilities"):
        privileges.prepare_privilege_drop(keep_caps=[999])


def test_rlimits_are_lowered_and_never_raised(in_child: Runner, tmp_path: Path) -> None:
    def open_many() -> None:
        files = [open(tmp_path / f"f{i}", "w") for i in range(32)]  # noqa: SIM115
        for f in files:
            f.close()

    limit = lambda: privileges.apply_rlimits({resource.RLIMIT_NOFILE: (16, 16)})  # noqa: E731
    assert in_child(open_many) == "ok"
    assert in_child(open_many, limit) == "EMFILE"

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    above = lambda: privileges.apply_rlimits({resource.RLIMIT_NOFILE: (hard * 4, hard * 4)})  # noqa: E731
    assert in_child(lambda: list(resource.getrlimit(resource.RLIMIT_NOFILE)), above) == [hard, hard]


@pytest.mark.timeout(20)
def test_parent_death_signal_kills_the_orphan() -> None:
    """A grandchild with PDEATHSIG set dies as soon as its parent exits: the test only gets EOF
    on the pipe once the grandchild, holder of the last write end, is gone (else it times out)."""
    read_end, write_end = os.pipe()
    ready_read, ready_write = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.close(read_end)
        parent = os.getpid()
        if os.fork() == 0:
            try:
                privileges.set_parent_death_signal(signal.SIGKILL, parent_pid=parent)
            except OSError:
                os._exit(1)
            os.write(ready_write, b"r")
            time.sleep(120)
            os._exit(0)
        os.close(write_end)
        os._exit(0 if os.read(ready_read, 1) == b"r" else 1)
    for unused in (write_end, ready_read, ready_write):
        os.close(unused)
    _, status = os.waitpid(middle, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with os.fdopen(read_end, "rb") as reader:
        assert reader.read() == b""
