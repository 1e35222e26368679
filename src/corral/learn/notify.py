"""seccomp user notification: the kernel pauses a chosen syscall and asks a supervisor.

Learning mode installs a filter that sends the path- and address-taking syscalls to Corral
and always answers ``SECCOMP_USER_NOTIF_FLAG_CONTINUE``: the kernel then runs the syscall as
usual. Nothing is decided here, only observed; enforcement stays with the mount namespace,
Landlock, nftables and the default seccomp filter.

Layouts from ``<linux/seccomp.h>`` (x86-64 only, like the rest of the process backend).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass

_SYS_SECCOMP = 317
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_USER_NOTIF = 0x7FC00000
_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000

_NOTIF = struct.Struct("=QII iIQ6Q")  # seccomp_notif: id, pid, flags, seccomp_data
_RESP = struct.Struct("=QqiI")  # seccomp_notif_resp: id, val, error, flags
_IOCTL_RECV = 0xC0502100  # _IOWR('!', 0, struct seccomp_notif)
_IOCTL_SEND = 0xC0182101  # _IOWR('!', 1, struct seccomp_notif_resp)
_IOCTL_ID_VALID = 0x40082102  # _IOW('!', 2, __u64)
_FLAG_CONTINUE = 1

# BPF opcodes
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_RET_K = 0x06
_JGE_K = 0x35


@dataclass(frozen=True)
class Notification:
    id: int
    pid: int  # in the supervisor's PID namespace
    nr: int
    args: tuple[int, ...]


def build_filter(syscalls: Iterable[int]) -> bytes:
    """Classic BPF: native-ABI ``syscalls`` go to the supervisor, everything else passes."""
    numbers = sorted(set(syscalls))
    prog: list[tuple[int, int, int, int]] = [
        (_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        (_JEQ_K, 1, 0, _AUDIT_ARCH_X86_64),
        (_RET_K, 0, 0, _SECCOMP_RET_ALLOW),  # other ABIs: the default filter kills them
        (_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
        (_JGE_K, len(numbers) + 1, 0, _X32_SYSCALL_BIT),
    ]
    for index, nr in enumerate(numbers):
        prog.append((_JEQ_K, len(numbers) - index, 0, nr))
    prog.append((_RET_K, 0, 0, _SECCOMP_RET_ALLOW))
    prog.append((_RET_K, 0, 0, _SECCOMP_RET_USER_NOTIF))
    return b"".join(struct.pack("=HBBI", *ins) for ins in prog)


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


@dataclass
class PreparedListener:
    """A filter laid out before fork; :meth:`install` is one syscall in the child."""

    instructions: ctypes.Array[_SockFilter]
    program: _SockFprog

    @classmethod
    def prepare(cls, syscalls: Iterable[int]) -> PreparedListener:
        bpf = build_filter(syscalls)
        count = len(bpf) // ctypes.sizeof(_SockFilter)
        instructions = (_SockFilter * count).from_buffer_copy(bpf)
        return cls(
            instructions, _SockFprog(count, ctypes.cast(instructions, ctypes.POINTER(_SockFilter)))
        )

    def install(self) -> int:
        """Install on the calling process (needs CAP_SYS_ADMIN or no_new_privs); returns the
        listener descriptor the supervisor reads notifications from."""
        fd = _libc.syscall(
            _SYS_SECCOMP,
            _SECCOMP_SET_MODE_FILTER,
            _SECCOMP_FILTER_FLAG_NEW_LISTENER,
            ctypes.byref(self.program),
        )
        if fd < 0:
            raise OSError(ctypes.get_errno(), "seccomp(SECCOMP_FILTER_FLAG_NEW_LISTENER) failed")
        return int(fd)


def receive(listener: int) -> Notification | None:
    """The next notification; None when the notifying process died before we read it."""
    buf = bytearray(_NOTIF.size)
    try:
        fcntl.ioctl(listener, _IOCTL_RECV, buf)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EINTR):
            return None
        raise
    nid, pid, _flags, nr, _arch, _ip, *args = _NOTIF.unpack(buf)
    return Notification(nid, pid, nr, tuple(args))


def still_pending(listener: int, notification_id: int) -> bool:
    """Whether the syscall still waits (so what we read from its memory was its argument)."""
    try:
        fcntl.ioctl(listener, _IOCTL_ID_VALID, struct.pack("=Q", notification_id))
    except OSError:
        return False
    return True


def let_continue(listener: int, notification_id: int) -> None:
    """Let the kernel carry out the paused syscall as if nothing had watched it."""
    try:
        fcntl.ioctl(listener, _IOCTL_SEND, _RESP.pack(notification_id, 0, 0, _FLAG_CONTINUE))
    except OSError as exc:
        if exc.errno != errno.ENOENT:  # the process died meanwhile
            raise


def syscall_numbers() -> dict[str, int]:
    """x86-64 numbers of the syscalls learning mode observes."""
    return dict(_X86_64)


_X86_64 = {
    "open": 2, "creat": 85, "openat": 257, "openat2": 437,
    "execve": 59, "execveat": 322,
    "connect": 42,
    "mkdir": 83, "mkdirat": 258, "rmdir": 84,
    "unlink": 87, "unlinkat": 263,
    "rename": 82, "renameat": 264, "renameat2": 316,
    "link": 86, "linkat": 265, "symlink": 88, "symlinkat": 266,
    "mknod": 133, "mknodat": 259, "truncate": 76,
}  # fmt: skip


def read_memory(pid: int, address: int, size: int) -> bytes:
    """``size`` bytes at ``address`` in ``pid`` (short at an unmapped page boundary)."""
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        out = b""
        while len(out) < size:
            try:
                chunk = os.pread(
                    fd, min(size - len(out), 4096 - (address + len(out)) % 4096), address + len(out)
                )
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        return out
    finally:
        os.close(fd)


def read_string(pid: int, address: int, limit: int = 4096) -> str | None:
    """The NUL-terminated string at ``address`` in ``pid``, or None if unreadable."""
    if address == 0:
        return None
    data = read_memory(pid, address, limit)
    end = data.find(b"\0")
    if end < 0:
        return None
    return data[:end].decode(errors="surrogateescape")
