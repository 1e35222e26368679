"""The host view QEMU exports to the guest, built in QEMU's own mount namespace.

QEMU is started in a private mount and network namespace. There a tmpfs (the *stage*) is
assembled from the plan's mount steps (the same steps the process backend applies): granted
paths bound read-only or read-write, denied paths inside grants covered by an empty 000 file or
directory, the baseline's symlinks. The stage is the one 9p export, so the guest can reach
nothing else of the host, and because read-only binds and covers are host mounts, not guest
mounts, nothing the guest kernel does (even as root) can undo them. The network namespace has no
interface but an unconfigured loopback, and QEMU gets no network device.
"""

from __future__ import annotations

import ctypes
import os
import signal
from dataclasses import dataclass

from corral.backends.process.rootfs import MountStep, plan_mounts
from corral.kernel import mounts, namespaces
from corral.kernel.privileges import (
    PreparedPrivileges,
    prepare_privilege_drop,
    set_parent_death_signal,
)
from corral.policy.filesystem import FilesystemPolicy, is_within

GUEST_MOUNTPOINTS = ("proc", "dev")  # the agent mounts the guest's own there
_PR_SET_KEEPCAPS = 8
_CAP_DAC_OVERRIDE = 1
_CAP_DAC_READ_SEARCH = 2
QEMU_UID = 65534  # nobody: owns what the guest creates on the host
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Stage:
    root: str  # exported to the guest
    covers: str  # holds the 000 file and directory that cover denied paths; not exported
    steps: tuple[MountStep, ...]

    @property
    def guest_tmpfs(self) -> tuple[str, ...]:
        """Paths the guest mounts a private tmpfs on (faster than a host tmpfs over 9p); a
        tmpfs with grants inside it (say /tmp/project) is built on the host instead."""
        return tuple(
            s.path for s in self.steps if s.kind == "tmpfs" and not self._holds_grants(s.path)
        )

    def _holds_grants(self, path: str) -> bool:
        return any(s.kind != "tmpfs" and is_within(s.path, path) for s in self.steps)


def plan_stage(fs: FilesystemPolicy, rundir: str) -> Stage:
    return Stage(f"{rundir}/stage", f"{rundir}/covers", tuple(plan_mounts(fs)))


def enter(stage: Stage, privileges: PreparedPrivileges, parent_pid: int) -> None:
    """Runs in the forked child just before it executes QEMU (async-signal-unsafe work is
    limited to the mount calls the process backend's child makes too): builds the stage, then
    becomes ``nobody`` keeping only the capabilities that let QEMU read and write what the plan
    grants. Files the guest creates are then owned by nobody, and QEMU cannot chown, create
    devices or change the mode of host files it does not own: root in the guest cannot leave a
    set-uid-root program or a device node in a read-write grant."""
    namespaces.unshare(namespaces.CLONE_NEWNS | namespaces.CLONE_NEWNET)
    mounts.mount(None, "/", None, mounts.MS_REC | mounts.MS_PRIVATE)
    flags = mounts.MS_NOSUID | mounts.MS_NODEV
    mounts.mount("tmpfs", stage.covers, "tmpfs", flags, "mode=0700,size=16k")
    cover_file, cover_dir = f"{stage.covers}/file", f"{stage.covers}/dir"
    with open(cover_file, "w"):
        pass
    os.chmod(cover_file, 0)
    os.mkdir(cover_dir, 0)
    mounts.mount("tmpfs", stage.root, "tmpfs", flags, "mode=0755")
    _apply(stage, cover_file, cover_dir)
    for name in GUEST_MOUNTPOINTS:
        os.makedirs(f"{stage.root}/{name}", exist_ok=True)
    # The stage itself holds only mount points: the guest may create nothing at its top.
    mounts.mount(
        None, stage.root, None, mounts.MS_REMOUNT | mounts.MS_BIND | mounts.MS_RDONLY | flags
    )
    _libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0)
    os.setgroups([])
    os.setresgid(QEMU_UID, QEMU_UID, QEMU_UID)
    os.setresuid(QEMU_UID, QEMU_UID, QEMU_UID)
    privileges.apply()  # no_new_privs; DAC_OVERRIDE and DAC_READ_SEARCH only, ambient for exec
    # After the uid change, which clears it: QEMU dies with the thread that started it.
    set_parent_death_signal(signal.SIGKILL, parent_pid=parent_pid)


def qemu_privileges() -> PreparedPrivileges:
    """Computed in the parent (the child must not allocate much between fork and exec)."""
    return prepare_privilege_drop(keep_caps=(_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH))


def _apply(stage: Stage, cover_file: str, cover_dir: str) -> None:
    for step in stage.steps:
        target = stage.root + step.path
        if step.kind == "symlink":
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(step.target, target)
        elif step.kind == "tmpfs":
            _mountpoint(target, True)
            if step.path not in stage.guest_tmpfs:
                mounts.mount(
                    "tmpfs", target, "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV, "mode=1777"
                )
        elif step.kind == "bind":
            _mountpoint(target, step.is_dir)
            mounts.bind(step.path, target, readonly=step.readonly)
        elif step.kind == "deny":
            _mountpoint(target, step.is_dir)
            mounts.bind(cover_dir if step.is_dir else cover_file, target, readonly=True)


def _mountpoint(target: str, is_dir: bool) -> None:
    if os.path.lexists(target):
        return
    if is_dir:
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w"):
            pass
