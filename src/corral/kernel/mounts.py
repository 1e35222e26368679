"""Mount primitives through libc: mount, umount2, pivot_root, recursive mount_setattr."""

from __future__ import annotations

import ctypes
import os

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 2

AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
_SYS_PIVOT_ROOT = 155
_SYS_MOUNT_SETATTR = 442
AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)
_mount = _libc.mount
_mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_umount2 = _libc.umount2
_umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_syscall = _libc.syscall


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _b(s: str | None) -> bytes | None:
    return None if s is None else s.encode()


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    _check(_mount(_b(source), _b(target), _b(fstype), flags, _b(data)), f"mount {target}")


def umount(target: str, flags: int = MNT_DETACH) -> None:
    _check(_umount2(_b(target), flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_syscall(_SYS_PIVOT_ROOT, _b(new_root), _b(put_old)), "pivot_root")


def set_recursive_attrs(path: str, attrs: int) -> None:
    """Apply mount attributes to ``path`` and every mount below it (Linux >= 5.12)."""
    attr = _MountAttr(attrs, 0, 0, 0)
    _check(
        _syscall(
            _SYS_MOUNT_SETATTR,
            ctypes.c_int(AT_FDCWD),
            _b(path),
            ctypes.c_uint(AT_RECURSIVE),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        ),
        f"mount_setattr {path}",
    )


def bind(source: str, target: str, *, readonly: bool) -> None:
    """Recursive bind mount, read-only all the way down when asked; never suid or devices."""
    mount(source, target, None, MS_BIND | MS_REC)
    attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | (MOUNT_ATTR_RDONLY if readonly else 0)
    set_recursive_attrs(target, attrs)
