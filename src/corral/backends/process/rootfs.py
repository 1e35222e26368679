"""Build the sandbox's deny-by-default root inside a fresh mount namespace.

Runs in the sandbox's PID-1 child (already in its own mount, PID and, when unprivileged, user
namespace). Order, as bubblewrap does it: a scratch tmpfs becomes the root so the host's tree
is reachable under /oldroot; the sandbox root is assembled under /newroot from binds of
/oldroot; then /newroot is pivoted to / and the host tree is detached.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from corral.kernel import mounts
from corral.policy.baseline import system_symlinks
from corral.policy.filesystem import FilesystemPolicy, is_within

# Mount points Corral creates itself instead of binding from the host.
PRIVATE_TMP = "/tmp"
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
_OLD = "/oldroot"
_NEW = "/newroot"
_DENY_MARK = "/.corral-denied"  # a 000 empty file and dir used to cover denied paths


@dataclass(frozen=True)
class MountStep:
    kind: str  # "bind" | "copy" | "deny" | "tmpfs" | "symlink"
    path: str  # path inside the sandbox
    readonly: bool = True
    is_dir: bool = True
    target: str = ""  # symlink target
    source: str = ""  # bind source on the host when it differs from ``path``


def plan_mounts(fs: FilesystemPolicy, *, private_tmp: bool = True) -> list[MountStep]:
    """The ordered mount steps (computed in the parent, applied in the child)."""
    steps = [MountStep("symlink", p, target=t) for p, t in system_symlinks().items()]
    tmp_granted = any(e.path == PRIVATE_TMP for e in fs.entries if e.access != "deny")
    private = private_tmp and not tmp_granted
    grants = [e for e in fs.entries if e.access != "deny"]
    for e in fs.entries:  # parents first
        if private and e.path != PRIVATE_TMP and is_within(e.path, PRIVATE_TMP):
            # Grants under /tmp go on top of the private /tmp, which goes on top of any
            # grant of a parent (such as /).
            steps.append(MountStep("tmpfs", PRIVATE_TMP, readonly=False))
            private = False
        if e.access == "deny":
            # A denial matters only where something above it is visible; elsewhere the path
            # simply does not exist in the sandbox.
            if any(is_within(e.path, g.path) for g in grants) or (
                private_tmp and not tmp_granted and is_within(e.path, PRIVATE_TMP)
            ):
                steps.append(MountStep("deny", e.path, is_dir=e.is_dir))
        elif e.origin == "baseline" and not e.is_dir and e.path.startswith("/etc/"):
            # Small configuration files: a copy on the read-only root costs a fraction of a
            # bind mount, and the copy cannot be used to reach anything else of the host.
            steps.append(MountStep("copy", e.path, is_dir=False))
        else:
            steps.append(MountStep("bind", e.path, readonly=e.access == "ro", is_dir=e.is_dir))
    if private:  # nothing under /tmp was granted: the private /tmp goes on top of all
        steps.append(MountStep("tmpfs", PRIVATE_TMP, readonly=False))
    return steps


def build_root(steps: Sequence[MountStep]) -> None:
    """Assemble the root and pivot into it. Raises OSError with the failing path."""
    mounts.mount(None, "/", None, mounts.MS_REC | mounts.MS_PRIVATE)
    scratch = "/tmp"  # any host directory works: the scratch tmpfs only hides it in this ns
    mounts.mount(
        "tmpfs", scratch, "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV, "mode=0755,size=64k"
    )
    os.mkdir(scratch + _OLD)
    os.mkdir(scratch + _NEW)
    mounts.pivot_root(scratch, scratch + _OLD)
    os.chdir("/")
    mounts.mount("tmpfs", _NEW, "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV, "mode=0755")
    with open(_DENY_MARK, "w"):
        pass
    os.chmod(_DENY_MARK, 0)
    os.mkdir(_DENY_MARK + "-dir", 0)

    for step in steps:
        target = _NEW + step.path
        if step.kind == "symlink":
            _ensure_parent(target)
            os.symlink(step.target, target)
        elif step.kind == "tmpfs":
            _ensure_dir(target)
            mounts.mount("tmpfs", target, "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV, "mode=1777")
        elif step.kind == "copy":
            _ensure_parent(target)
            with open(_OLD + step.path, "rb") as src, open(target, "wb") as dst:
                dst.write(src.read())
        elif step.kind == "bind":
            _ensure_mountpoint(target, step.is_dir)
            mounts.bind(_OLD + (step.source or step.path), target, readonly=step.readonly)
        elif step.kind == "deny":
            _ensure_mountpoint(target, step.is_dir)
            source = _DENY_MARK + "-dir" if step.is_dir else _DENY_MARK
            mounts.bind(source, target, readonly=True)

    _build_dev(_NEW + "/dev")
    _ensure_dir(_NEW + "/proc")
    mounts.mount(
        "proc", _NEW + "/proc", "proc", mounts.MS_NOSUID | mounts.MS_NODEV | mounts.MS_NOEXEC
    )

    mounts.umount(_OLD)
    os.chdir(_NEW)
    mounts.pivot_root(".", ".")
    mounts.umount(".")  # detaches the scratch root stacked under the new one
    os.chdir("/")
    # The assembled root itself holds only mount points: nothing may be created there.
    mounts.mount(
        None,
        "/",
        None,
        mounts.MS_REMOUNT | mounts.MS_BIND | mounts.MS_RDONLY | mounts.MS_NOSUID | mounts.MS_NODEV,
    )


def _build_dev(dev: str) -> None:
    _ensure_dir(dev)
    mounts.mount("tmpfs", dev, "tmpfs", mounts.MS_NOSUID | mounts.MS_NOEXEC, "mode=0755")
    for name in DEVICES:
        node = f"{dev}/{name}"
        with open(node, "w"):
            pass
        mounts.mount(f"{_OLD}/dev/{name}", node, None, mounts.MS_BIND)
    os.mkdir(f"{dev}/pts")
    mounts.mount(
        "devpts", f"{dev}/pts", "devpts", mounts.MS_NOSUID | mounts.MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )  # fmt: skip
    os.symlink("pts/ptmx", f"{dev}/ptmx")
    os.mkdir(f"{dev}/shm")
    mounts.mount("tmpfs", f"{dev}/shm", "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV, "mode=1777")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):  # fmt: skip
        os.symlink(target, f"{dev}/{name}")
    mounts.mount(
        None, dev, None, mounts.MS_REMOUNT | mounts.MS_NOSUID | mounts.MS_NOEXEC | mounts.MS_RDONLY
    )


def _ensure_dir(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)


def _ensure_parent(path: str) -> None:
    _ensure_dir(os.path.dirname(path))


def _ensure_mountpoint(target: str, is_dir: bool) -> None:
    if os.path.lexists(target):
        return
    if is_dir:
        _ensure_dir(target)
    else:
        _ensure_parent(target)
        with open(target, "w"):
            pass
