"""cgroup limits on this host (hybrid: v1 memory/pids/cpu, controller-less cgroup2), attacked
for real by processes that try to exceed them; plus the v2 code path against a fake tree."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.errors import CorralError, ErrorCode
from corral.kernel import cgroups
from corral.kernel.cgroups import Cgroup, CgroupHost, Placement

HOST = cgroups.detect()
pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        os.geteuid() != 0 or not all(p.writable for p in HOST.controllers.values()),
        reason="needs root with writable memory, pids and cpu cgroup controllers",
    ),
]

Runner = Callable[..., Any]


@pytest.fixture
def make_group() -> Iterator[Callable[..., Cgroup]]:
    made: list[Cgroup] = []

    def make(
        *, memory_mb: int | None = None, pids: int | None = None, cpu_percent: int | None = None
    ) -> Cgroup:
        name = f"test-{uuid.uuid4().hex[:12]}"
        group = cgroups.create(name, memory_mb=memory_mb, pids=pids, cpu_percent=cpu_percent)
        made.append(group)
        return group

    yield make
    for group in made:
        group.remove()


def _spawn_in(group: Cgroup, script: str) -> subprocess.Popen[str]:
    """Start ``script`` in Python already inside ``group`` (it joins between fork and exec)."""
    join = group.prepare_join()
    try:
        return subprocess.Popen(
            [sys.executable, "-c", script], preexec_fn=join.apply, stdout=subprocess.PIPE, text=True
        )
    finally:
        join.close()


_FORK_BOMB = """
import errno, os, time
children = 0
while children < 64:
    try:
        pid = os.fork()
    except OSError as exc:
        print(errno.errorcode[exc.errno], children, flush=True)
        break
    if pid == 0:
        os.closerange(0, 256)
        time.sleep(60)
        os._exit(0)
    children += 1
else:
    print("none", children, flush=True)
time.sleep(60)
"""


def _bomb(group: Cgroup) -> list[str]:
    bomb = _spawn_in(group, _FORK_BOMB)
    assert bomb.stdout is not None
    report = bomb.stdout.readline().split()
    group.kill_all()
    assert bomb.wait(timeout=10) == -9
    return report


def test_pids_limit_stops_a_fork_bomb(make_group: Callable[..., Cgroup]) -> None:
    assert _bomb(make_group(memory_mb=256)) == ["none", "64"]
    limited = make_group(pids=16)
    errno_name, children = _bomb(limited)
    assert errno_name == "EAGAIN"
    assert int(children) <= 15
    assert limited.pids_exhausted()
    assert limited.pids() == set()
    limited.remove()
    assert not any(os.path.exists(d) for d in limited.paths())


_ALLOCATE_256_MIB = "data = b'x' * (256 << 20); print('survived', len(data) >> 20, flush=True)"


def test_memory_limit_kills_the_allocator_not_us(make_group: Callable[..., Cgroup]) -> None:
    roomy = make_group(memory_mb=512)
    fine = _spawn_in(roomy, _ALLOCATE_256_MIB)
    assert fine.communicate(timeout=30)[0] == "survived 256\n"
    assert not roomy.oom_killed()

    tight = make_group(memory_mb=64)
    hog = _spawn_in(tight, _ALLOCATE_256_MIB)
    out, _ = hog.communicate(timeout=30)
    assert hog.returncode == -9
    assert out == ""
    assert tight.oom_killed()


_BUSY_ONE_SECOND = """
import os, time
end = time.monotonic() + 1.0
while time.monotonic() < end:
    pass
times = os.times()
print(times.user + times.system, flush=True)
"""


def _throttled(group: Cgroup) -> int:
    stat = Path(group.directories["cpu"], "cpu.stat").read_text().split()
    return int(stat[stat.index("nr_throttled") + 1])


@pytest.mark.timeout(30)
def test_cpu_quota_throttles_a_busy_loop(make_group: Callable[..., Cgroup]) -> None:
    group = make_group(cpu_percent=20)
    busy = _spawn_in(group, _BUSY_ONE_SECOND)
    cpu_seconds = float(busy.communicate(timeout=20)[0])
    assert _throttled(group) > 0
    # One second of wall time under a 20% quota buys at most ~0.2 s of CPU (0.5: ample slack).
    assert cpu_seconds < 0.5


def test_kill_all_ends_a_tree_of_sleepers(make_group: Callable[..., Cgroup]) -> None:
    group = make_group(pids=64)
    join = group.prepare_join()
    shell = subprocess.Popen(
        ["/bin/sh", "-c", "for i in 1 2 3 4 5; do sleep 60 & done; wait"], preexec_fn=join.apply
    )
    join.close()
    deadline = time.monotonic() + 10
    while len(group.pids()) < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(group.pids()) == 6
    group.kill_all()
    assert shell.wait(timeout=10) == -9
    assert group.pids() == set()


def test_kill_all_without_cgroup_kill_uses_freeze_and_signals(
    make_group: Callable[..., Cgroup],
) -> None:
    """This host's tracking group lacks nothing, so exercise the fallback on the v1 groups alone."""
    group = make_group(pids=64)
    v1_only = Cgroup(group.name, {"pids": group.directories["pids"]})
    shell = _spawn_in(v1_only, "import os, time\nfor _ in range(3):\n    os.fork()\ntime.sleep(60)")
    deadline = time.monotonic() + 10
    while len(v1_only.pids()) < 8 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(v1_only.pids()) == 8
    v1_only.kill_all()
    assert shell.wait(timeout=10) == -9
    assert v1_only.pids() == set()


def test_remove_is_idempotent_and_leaves_nothing(make_group: Callable[..., Cgroup]) -> None:
    group = make_group(memory_mb=64, pids=16, cpu_percent=50)
    assert set(group.directories) == {"memory", "pids", "cpu", "tracking"}
    assert all(d in cgroups.list_leftovers() for d in group.paths())
    group.remove()
    group.remove()
    assert not any(os.path.exists(d) for d in group.paths())
    assert not any(d in cgroups.list_leftovers() for d in group.paths())


def test_leftovers_are_collected(make_group: Callable[..., Cgroup]) -> None:
    group = make_group(pids=8)
    sleeper = _spawn_in(group, "import time; time.sleep(60)")
    leftovers = [d for d in cgroups.list_leftovers() if d.endswith("/" + group.name)]
    assert len(leftovers) == 2  # pids and the cgroup2 tracking group
    for leftover in leftovers:
        cgroups.remove_leftover(leftover)
    assert sleeper.wait(timeout=10) == -9
    assert not any(os.path.exists(d) for d in leftovers)
    with pytest.raises(CorralError):
        cgroups.remove_leftover("/sys/fs/cgroup/pids")


def test_unprivileged_user_gets_a_clear_refusal(in_child: Runner) -> None:
    def become_nobody() -> None:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    def try_to_limit() -> Any:
        try:
            cgroups.create("test-unprivileged", memory_mb=None, pids=16, cpu_percent=None)
        except CorralError as exc:
            return [str(exc.code), exc.message, exc.remediation]
        return "created"

    code, message, remediation = in_child(try_to_limit, become_nobody)
    assert code == ErrorCode.POLICY_VALIDATION
    assert "pids" in message and "not writable for uid 65534" in message
    assert "delegate" in remediation and "root" in remediation


def test_bad_limits_are_refused() -> None:
    for bad in ({"pids": 0}, {"memory_mb": -1}, {"cpu_percent": True}):
        options: dict[str, Any] = {"memory_mb": None, "pids": None, "cpu_percent": None}
        with pytest.raises(CorralError) as info:
            cgroups.create("test-bad", **(options | bad))
        assert info.value.code == ErrorCode.POLICY_VALIDATION
    with pytest.raises(CorralError):
        cgroups.create("../escape", memory_mb=None, pids=1, cpu_percent=None)


def test_v2_layout_writes_against_a_fake_tree(tmp_path: Path) -> None:
    """The one allowed mock: this host's cgroup2 has no controllers, so the v2 file writes are
    checked against a plain directory tree shaped like a pure-v2 /sys/fs/cgroup."""
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    placements = {c: Placement(c, 2, str(tmp_path), True) for c in ("memory", "pids", "cpu")}
    host = CgroupHost("v2", str(tmp_path), True, placements)
    group = cgroups.create("fake", memory_mb=64, pids=16, cpu_percent=20, host=host)
    directory = tmp_path / "corral" / "fake"
    assert group.paths() == [str(directory)]
    assert group.procs_files() == [str(directory / "cgroup.procs")]
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert (tmp_path / "corral" / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert (directory / "memory.max").read_text() == str(64 << 20)
    assert (directory / "pids.max").read_text() == "16"
    assert (directory / "cpu.max").read_text() == "20000 100000"
    (directory / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (directory / "pids.events").write_text("max 2\n")
    assert group.oom_killed() and group.pids_exhausted()
    (directory / "cgroup.kill").write_text("")
    group.kill_all()
    assert (directory / "cgroup.kill").read_text() == "1"


def test_v2_host_is_described(tmp_path: Path) -> None:
    placements = {"memory": Placement("memory", 2, "/sys/fs/cgroup", False)}
    text = CgroupHost("v2", "/sys/fs/cgroup", True, placements).describe()
    assert "memory: v2 at /sys/fs/cgroup (not writable by this user)" in text
    assert "pids: unavailable" in text
    assert HOST.describe().startswith(f"cgroups: {HOST.mode}")
