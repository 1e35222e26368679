"""Namespaces and uid/gid maps through libc (os.unshare exists only from Python 3.12)."""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

ALL_BUT_USER = (
    CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWNET
)

_libc = ctypes.CDLL(None, use_errno=True)
_unshare = _libc.unshare
_unshare.argtypes = [ctypes.c_int]
_sethostname = _libc.sethostname
_sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_unshare(flags), "unshare")


def sethostname(name: str) -> None:
    data = name.encode()
    _check(_sethostname(data, len(data)), "sethostname")


def map_self(uid: int, gid: int) -> None:
    """In a fresh user namespace, map the caller's own uid/gid to themselves: the one mapping an
    unprivileged process may write without help (setgroups must be denied first)."""
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")


def unprivileged_userns_allowed() -> bool:
    """Whether this host lets unprivileged users create user namespaces."""
    for knob, ok in (
        ("/proc/sys/kernel/unprivileged_userns_clone", "1"),
        ("/proc/sys/user/max_user_namespaces", None),
    ):
        try:
            with open(knob) as f:
                value = f.read().strip()
        except OSError:
            continue
        if ok is not None and value != ok:
            return False
        if ok is None and value == "0":
            return False
    return True
