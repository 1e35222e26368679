"""The whole child-side sequence the launcher runs between fork and exec, with everything
prepared in the parent: join the cgroups, drop privileges, Landlock, seccomp, exec a shell."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from corral.kernel import cgroups, landlock, privileges, seccomp
from corral.kernel.landlock import PathRule

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(os.geteuid() != 0, reason="creates cgroups as root"),
    pytest.mark.skipif(landlock.host_abi() < 6, reason="needs Landlock ABI 6"),
]


def test_prepared_mechanisms_apply_in_order_and_exec_works(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    group = cgroups.create(
        f"test-sequence-{uuid.uuid4().hex[:8]}", memory_mb=128, pids=32, cpu_percent=None
    )
    join = group.prepare_join()
    drop = privileges.prepare_privilege_drop()
    ruleset = landlock.prepare([PathRule("/usr", "read"), PathRule(str(work), "write")])
    syscalls = seccomp.prepare_filter(seccomp.build_default_filter())
    script = (
        "echo written > out; cat /etc/hostname 2>/dev/null || echo denied; "
        "unshare -U true 2>/dev/null || echo no-userns"
    )
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(write_end, 1)
            os.chdir(work)
            join.apply()
            drop.apply()
            ruleset.apply()
            syscalls.apply()
            os.execv("/bin/sh", ["/bin/sh", "-c", script])
        finally:
            os._exit(127)
    os.close(write_end)
    join.close()
    ruleset.close()
    with os.fdopen(read_end) as reader:
        output = reader.read()
    _, status = os.waitpid(pid, 0)
    try:
        assert os.waitstatus_to_exitcode(status) == 0
        assert output.split() == ["denied", "no-userns"]
        assert (work / "out").read_text() == "written\n"
    finally:
        group.remove()
    assert not any(os.path.exists(d) for d in group.paths())
