"""Turn one paused syscall into what the workload tried to do: a path and how it was used,
or a network destination. Read while the syscall waits, so ``cwd`` and descriptors are the
ones the kernel will use.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
from dataclasses import dataclass
from typing import Literal

from corral.learn import notify

# ``read``: open for reading or lookup; ``list``: a directory opened; ``exec``: executed;
# ``write``: an existing file opened for writing (or created if missing: ``creates``);
# ``entry``: a name created, removed or renamed in ``path``'s parent directory.
FsOp = Literal["read", "list", "exec", "write", "entry"]


@dataclass(frozen=True)
class FsAccess:
    path: str  # absolute, normalised, as the sandbox names it
    op: FsOp
    syscall: str
    creates: bool = False


@dataclass(frozen=True)
class NetAccess:
    address: str
    port: int
    protocol: Literal["tcp", "udp", "any"]
    syscall: str = "connect"


Access = FsAccess | NetAccess

_AT_FDCWD = 0xFFFFFF9C  # -100 as the kernel sees the low 32 bits
_O_ACCMODE, _O_CREAT, _O_TRUNC, _O_DIRECTORY = 0o3, 0o100, 0o1000, 0o200000
_SYS_PIDFD_GETFD = 438
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# syscall -> ((dirfd arg or None, path arg, op), ...)
_PATH_ARGS: dict[str, tuple[tuple[int | None, int, FsOp], ...]] = {
    "execve": ((None, 0, "exec"),),
    "execveat": ((0, 1, "exec"),),
    "mkdir": ((None, 0, "entry"),),
    "mkdirat": ((0, 1, "entry"),),
    "rmdir": ((None, 0, "entry"),),
    "unlink": ((None, 0, "entry"),),
    "unlinkat": ((0, 1, "entry"),),
    "rename": ((None, 0, "entry"), (None, 1, "entry")),
    "renameat": ((0, 1, "entry"), (2, 3, "entry")),
    "renameat2": ((0, 1, "entry"), (2, 3, "entry")),
    "link": ((None, 1, "entry"),),
    "linkat": ((2, 3, "entry"),),
    "symlink": ((None, 1, "entry"),),
    "symlinkat": ((1, 2, "entry"),),
    "mknod": ((None, 0, "entry"),),
    "mknodat": ((0, 1, "entry"),),
    "truncate": ((None, 0, "write"),),
}


class Decoder:
    """Decodes notifications of one sandbox; skips its PID 1 (Corral's own init)."""

    def __init__(self) -> None:
        self._names = {nr: name for name, nr in notify.syscall_numbers().items()}
        self._is_init: dict[int, bool] = {}

    def decode(self, n: notify.Notification) -> list[Access]:
        name = self._names.get(n.nr)
        if name is None or self._from_init(n.pid):
            return []
        if name == "connect":
            found = _connect(n.pid, n.args)
            return [found] if found else []
        if name in ("open", "creat", "openat", "openat2"):
            found_open = _open(n.pid, name, n.args)
            return [found_open] if found_open else []
        out: list[Access] = []
        for dirfd, path_arg, op in _PATH_ARGS[name]:
            path = _path(n.pid, None if dirfd is None else n.args[dirfd], n.args[path_arg])
            if path is not None:
                out.append(FsAccess(path, op, name))
        return out

    def _from_init(self, pid: int) -> bool:
        if pid not in self._is_init:
            try:
                with open(f"/proc/{pid}/status") as f:
                    nspid = next((line.split()[1:] for line in f if line.startswith("NSpid:")), [])
            except OSError:
                nspid = []
            self._is_init[pid] = len(nspid) > 1 and nspid[-1] == "1"
        return self._is_init[pid]


def _open(pid: int, name: str, args: tuple[int, ...]) -> FsAccess | None:
    if name == "openat2":
        how = notify.read_memory(pid, args[2], 8)
        if len(how) < 8:
            return None
        flags = struct.unpack("=Q", how)[0]
        path = _path(pid, args[0], args[1])
    elif name == "openat":
        flags, path = args[2], _path(pid, args[0], args[1])
    elif name == "creat":
        flags, path = _O_CREAT | _O_TRUNC | 1, _path(pid, None, args[0])
    else:
        flags, path = args[1], _path(pid, None, args[0])
    if path is None:
        return None
    writes = (flags & _O_ACCMODE) != 0 or flags & _O_TRUNC
    if writes or flags & _O_CREAT:
        return FsAccess(path, "write", name, creates=bool(flags & _O_CREAT))
    return FsAccess(path, "list" if flags & _O_DIRECTORY else "read", name)


def _path(pid: int, dirfd: int | None, address: int) -> str | None:
    raw = notify.read_string(pid, address)
    if raw is None or raw == "":
        return None
    if not raw.startswith("/"):
        where = (
            "cwd"
            if dirfd is None or (dirfd & 0xFFFFFFFF) == _AT_FDCWD
            else f"fd/{dirfd & 0xFFFFFFFF}"
        )
        try:
            base = os.readlink(f"/proc/{pid}/{where}")
        except OSError:
            return None
        if not base.startswith("/"):
            return None  # a socket, pipe or anonymous inode: no path to grant
        raw = os.path.join(base, raw)
    return os.path.normpath(raw)


def _connect(pid: int, args: tuple[int, ...]) -> Access | None:
    data = notify.read_memory(pid, args[1], min(int(args[2]), 128))
    if len(data) < 2:
        return None
    family = struct.unpack("=H", data[:2])[0]
    if family == socket.AF_UNIX:
        path = data[2:].split(b"\0", 1)[0]
        if not path:
            return None  # abstract or unnamed: no file to grant
        return FsAccess(os.path.normpath(path.decode(errors="surrogateescape")), "read", "connect")
    if family == socket.AF_INET and len(data) >= 8:
        port = struct.unpack("!H", data[2:4])[0]
        address = socket.inet_ntop(socket.AF_INET, data[4:8])
    elif family == socket.AF_INET6 and len(data) >= 24:
        port = struct.unpack("!H", data[2:4])[0]
        address = socket.inet_ntop(socket.AF_INET6, data[8:24])
    else:
        return None
    return NetAccess(address, port, _socket_protocol(pid, args[0] & 0xFFFFFFFF))


def _socket_protocol(pid: int, fd: int) -> Literal["tcp", "udp", "any"]:
    """The socket's type, from a duplicate of its descriptor (pidfd_getfd)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return "any"
    try:
        copy = int(_libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0))
    finally:
        os.close(pidfd)
    if copy < 0:
        return "any"
    try:
        sock = socket.socket(fileno=copy)
    except OSError:  # not a socket
        os.close(copy)
        return "any"
    with sock:
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
    return "tcp" if kind == socket.SOCK_STREAM else "udp" if kind == socket.SOCK_DGRAM else "any"
