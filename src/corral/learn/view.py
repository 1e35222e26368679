"""The learning sandbox's filesystem view and its observer, set up inside the sandbox.

Runs in the sandbox's PID 1 right after the backend assembled the root (through the
backend's ``landlock_prepare`` step, the first code that runs there with the root built):

1. every read-only part of the view gets an overlayfs whose upper layer is a private tmpfs,
   so writes outside the request's read-write grants land in memory that dies with the
   sandbox, never on the host, and the workload keeps running to show what it does next;
2. Landlock, when planned, also lets the workload write into those overlays;
3. the user-notification filter is installed and its listener sent to the caller, who
   observes every path- and address-taking syscall of the workload.
"""

from __future__ import annotations

import array
import ctypes
import json
import os
import socket
from collections.abc import Callable
from typing import Any

from corral.backends.process.launcher import ChildSpec
from corral.kernel import mounts
from corral.learn.notify import PreparedListener

_SCRATCH = "/dev/shm/.corral-learn"  # the sandbox's own tmpfs; detached before the workload
_NEVER_ABSORBED = ("/proc", "/dev", "/sys")  # the sandbox's own, or host state it cannot write


def prepare_child(spec: ChildSpec, channel: socket.socket, listener: PreparedListener) -> None:
    """Edit the backend's child spec (its ``adjust`` hook) so PID 1 builds the learning view
    and hands the observer's listener to the caller over ``channel``."""
    from corral.kernel import landlock

    original = spec.landlock_prepare or landlock.prepare  # the process backend's own ruleset
    spec.keep_fds = (*spec.keep_fds, channel.fileno())  # kept by the sandbox, not its workload

    def prepare(rules: list[Any]) -> Any:
        absorbed, failed = _absorb_writes(spec.unprivileged)
        ruleset = original([*rules, *(landlock.PathRule(p, "write") for p in absorbed)])
        fd = listener.install()
        report = json.dumps({"absorbed": len(absorbed), "failed": failed}).encode()
        channel.sendmsg([report], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        os.close(fd)
        channel.close()
        return ruleset

    spec.landlock_prepare = prepare


def _absorb_writes(unprivileged: bool) -> tuple[list[str], list[str]]:
    """Overlay every read-only tree of the view (keeping the mounts below it on top of the
    overlay); the sandbox's own root, /proc, /dev and /sys are left as they are."""
    table = _mount_table()
    os.makedirs(_SCRATCH, mode=0o700)
    mounts.mount("tmpfs", _SCRATCH, "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV, "mode=0700")
    absorbed: list[str] = []
    failed: list[str] = []
    options = ",userxattr" if unprivileged else ""

    def overlay(path: str) -> bool:
        layer = f"{_SCRATCH}/{len(absorbed) + len(failed)}"
        os.makedirs(layer + "/upper")
        os.mkdir(layer + "/work")
        if any(c in path for c in ",:\\"):
            failed.append(path)  # overlayfs option syntax cannot name it
            return False
        clones = [(p, _clone_tree(p)) for p in _top_mounts_below(path, table)]
        try:
            try:
                mounts.mount(
                    "overlay", path, "overlay", mounts.MS_NOSUID | mounts.MS_NODEV,
                    f"lowerdir={path},upperdir={layer}/upper,workdir={layer}/work{options}",
                )  # fmt: skip
            except OSError:
                failed.append(path)  # stays read-only: attempts are still observed
                return False
            # The grants and denials below go back on top; failing here raises (an overlay
            # hiding a grant would misplace the workload's writes).
            for where, fd in clones:
                _attach(fd, where)
        finally:
            for _where, fd in clones:
                os.close(fd)
        absorbed.append(path)
        return True

    _visit("/", _Walk(table, overlay, unprivileged))
    mounts.umount(_SCRATCH)  # each overlay keeps its own private reference to its layers
    os.rmdir(_SCRATCH)
    return absorbed, failed


class _Walk:
    """What the walk over the view needs. Unprivileged, an overlay cannot copy up a
    directory whose owner is not mapped into the sandbox's user namespace (EOVERFLOW): such
    directories (system trees the user cannot write on the host either) stay read-only,
    and the walk only goes through them towards the user's home, world-writable
    directories and the mounts of the view."""

    def __init__(
        self, table: dict[str, bool], overlay: Callable[[str], bool], unprivileged: bool
    ) -> None:
        self.table, self.overlay, self.unprivileged = table, overlay, unprivileged
        self.waypoints = {*table, os.path.expanduser("~")} if unprivileged else set()

    def absorbable(self, path: str) -> bool:
        if not self.unprivileged:
            return True
        st = os.stat(path)
        return _OVERFLOW_ID not in (st.st_uid, st.st_gid)

    def leads_somewhere(self, path: str) -> bool:
        prefix = path.rstrip("/") + "/"
        if any(w.startswith(prefix) for w in self.waypoints):
            return True
        return bool(os.stat(path).st_mode & 0o002)


_OVERFLOW_ID = 65534


def _visit(path: str, walk: _Walk) -> None:
    table = walk.table
    if any(path == p or path.startswith(p + "/") for p in _NEVER_ABSORBED):
        return
    if table.get(path) is False:
        return  # a read-write mount (a grant of the request, a private tmpfs) or a denial
    holder = _holder(path, table)
    host_tree = holder != "/" and table[holder]  # else the sandbox's own root (mount points)
    if host_tree and walk.absorbable(path):
        walk.overlay(path)
        for below in _top_mounts_below(path, table):
            _visit(below, walk)
        return
    if host_tree and not walk.leads_somewhere(path):
        return
    try:
        children = [e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return
    for child in sorted(children):
        _visit(child, walk)


def _holder(path: str, table: dict[str, bool]) -> str:
    return max((m for m in table if path == m or path.startswith(m.rstrip("/") + "/")), key=len)


def _top_mounts_below(path: str, table: dict[str, bool]) -> list[str]:
    prefix = path.rstrip("/") + "/"
    below = sorted(m for m in table if m.startswith(prefix))
    return [m for m in below if not any(o != m and m.startswith(o + "/") for o in below)]


_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_OPEN_TREE_CLONE = 1
_MOVE_MOUNT_F_EMPTY_PATH = 4
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _clone_tree(path: str) -> int:
    """A detached copy of the mount tree at ``path``, to put back on top of the overlay."""
    fd = _libc.syscall(
        _SYS_OPEN_TREE, mounts.AT_FDCWD, path.encode(),
        _OPEN_TREE_CLONE | os.O_CLOEXEC | mounts.AT_RECURSIVE,
    )  # fmt: skip
    if fd < 0:
        raise OSError(ctypes.get_errno(), f"open_tree {path}")
    return int(fd)


def _attach(fd: int, path: str) -> None:
    if _libc.syscall(
        _SYS_MOVE_MOUNT, fd, b"", mounts.AT_FDCWD, path.encode(), _MOVE_MOUNT_F_EMPTY_PATH
    ):
        raise OSError(ctypes.get_errno(), f"move_mount {path}")


def _mount_table() -> dict[str, bool]:
    """Mount point -> read-only, from this mount namespace; denied paths count as writable
    (they are left alone: an empty mode-000 placeholder)."""
    table: dict[str, bool] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")
            readonly = "ro" in fields[5].split(",")
            table[point] = readonly and not fields[3].startswith("/.corral-denied")
    return table
