"""Corral's default seccomp filter: compiled in the parent, loaded in the child.

:func:`build_default_filter` uses ``pyseccomp`` (ctypes over libseccomp) to compile the policy
to a classic BPF program. :func:`prepare_filter` turns those bytes into the ``sock_fprog`` the
kernel takes, before fork; :meth:`PreparedSeccomp.apply` is then one ``prctl`` in the child.
Loading a filter needs ``no_new_privs`` (or CAP_SYS_ADMIN): apply
:mod:`corral.kernel.privileges` first.

The policy allows by default and answers EPERM to sandbox-escape primitives and kernel
interfaces no agent workload needs. Syscalls of another ABI (i386 ``int 0x80``, x32) kill the
process, so they cannot be used to go around the rules.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass

from corral.errors import BackendUnavailableError

PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

_TIOCSTI = 0x5412
_TIOCLINUX = 0x541C
_LOW_32_BITS = 0xFFFFFFFF
_CLONE_NAMESPACE_FLAGS = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}

# Refused whatever their arguments.
_ALWAYS_DENIED = (
    # reading or steering other processes
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "process_madvise",
    # mounts and namespaces: the sandbox's own walls
    "mount", "umount2", "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree",
    "mount_setattr", "pivot_root", "chroot", "setns", "unshare",
    # kernel keyrings, BPF, perf, modules, kexec
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "kexec_load",
    "kexec_file_load", "init_module", "finit_module", "delete_module",
    # large attack surfaces with a record of escapes
    "io_uring_setup", "io_uring_enter", "io_uring_register", "userfaultfd",
    # host-wide state
    "swapon", "swapoff", "reboot", "settimeofday", "clock_settime", "clock_adjtime",
    "adjtimex", "acct", "quotactl", "quotactl_fd", "lookup_dcookie", "syslog", "vhangup",
    # file handles bypass path-based checks
    "name_to_handle_at", "open_by_handle_at",
    # obsolete or raw hardware access
    "uselib", "nfsservctl", "iopl", "ioperm",
)  # fmt: skip

_CONDITIONAL_RULES = (
    "clone(any CLONE_NEW* flag)",
    "clone3 (ENOSYS, so libc falls back to clone)",
    "ioctl(TIOCSTI)",
    "ioctl(TIOCLINUX)",
    "personality(any persona but PER_LINUX, queries included)",
    "every syscall of a non-native ABI (i386, x32): process killed",
)


def describe_default_filter() -> list[str]:
    """What the default filter refuses, one entry per rule, for the plan."""
    return [*_ALWAYS_DENIED, *_CONDITIONAL_RULES]


def _syscall_number(name: str) -> int:
    import pyseccomp

    number = int(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name))
    if number < 0:
        raise BackendUnavailableError(
            f"libseccomp does not know the syscall {name!r}, so the seccomp filter cannot "
            "refuse it",
            remediation="install libseccomp 2.5.4 or newer",
            details={"mechanism": "seccomp", "syscall": name},
        )
    return number


def build_default_filter() -> bytes:
    """The default filter's BPF. For root it is cached in root's private run directory:
    libseccomp's bindings look up their libraries with ldconfig at import, which costs more
    than the rest of a launch. Other users compile it each time: a cache they can write could
    be rewritten by a workload they granted that directory to."""
    if os.geteuid() != 0:
        return compile_default_filter()
    path = _cache_path()
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        pass
    bpf = compile_default_filter()
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(bpf)
        os.replace(tmp, path)
    except OSError:
        pass
    return bpf


def _cache_path() -> str:
    import hashlib

    from corral.backends.probe_cache import cache_dir

    with open(__file__, "rb") as f:
        source = hashlib.sha256(f.read()).hexdigest()[:16]
    return os.path.join(cache_dir(), f"seccomp-{os.uname().machine}-{source}.bpf")


def compile_default_filter() -> bytes:
    """Compile Corral's default policy to a BPF program for this host's native ABI."""
    import pyseccomp

    eperm = pyseccomp.ERRNO(errno.EPERM)
    try:
        rules = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
        rules.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
        # A binary tree over syscall numbers instead of a linear scan; syscalls whose verdict
        # does not depend on arguments are also cached by the kernel's constant-action bitmap.
        rules.set_attr(pyseccomp.Attr.CTL_OPTIMIZE, 2)
        for name in _ALWAYS_DENIED:
            rules.add_rule(eperm, _syscall_number(name))
        for flag in _CLONE_NAMESPACE_FLAGS.values():
            rules.add_rule(
                eperm, _syscall_number("clone"), pyseccomp.Arg(0, pyseccomp.MASKED_EQ, flag, flag)
            )
        rules.add_rule(pyseccomp.ERRNO(errno.ENOSYS), _syscall_number("clone3"))
        for request in (_TIOCSTI, _TIOCLINUX):
            low_bits = pyseccomp.Arg(1, pyseccomp.MASKED_EQ, _LOW_32_BITS, request)
            rules.add_rule(eperm, _syscall_number("ioctl"), low_bits)
        rules.add_rule(eperm, _syscall_number("personality"), pyseccomp.Arg(0, pyseccomp.NE, 0))
        memfd = os.memfd_create("corral-seccomp", os.MFD_CLOEXEC)
        with os.fdopen(memfd, "w+b") as program:
            rules.export_bpf(program)
            program.seek(0)
            return program.read()
    except OSError as exc:
        raise BackendUnavailableError(
            f"libseccomp could not compile the seccomp filter: {exc}",
            remediation="install libseccomp 2.5.4 or newer (Debian: libseccomp2)",
            details={"mechanism": "seccomp"},
        ) from exc


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


@dataclass
class PreparedSeccomp:
    """A BPF program laid out for the kernel; :meth:`apply` installs it on the caller."""

    instructions: ctypes.Array[_SockFilter]
    program: _SockFprog

    def apply(self) -> None:
        """Install the filter on the calling (single-threaded) process and its descendants."""
        if _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(self.program), 0, 0):
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")


def prepare_filter(bpf: bytes) -> PreparedSeccomp:
    """Lay out ``bpf`` (8-byte ``sock_filter`` instructions) as a ``sock_fprog``."""
    count, remainder = divmod(len(bpf), ctypes.sizeof(_SockFilter))
    if remainder or not 0 < count <= 4096:
        raise BackendUnavailableError(
            f"not a seccomp BPF program: {len(bpf)} bytes",
            details={"mechanism": "seccomp"},
        )
    instructions = (_SockFilter * count).from_buffer_copy(bpf)
    program = _SockFprog(count, ctypes.cast(instructions, ctypes.POINTER(_SockFilter)))
    return PreparedSeccomp(instructions, program)


def load_filter(bpf: bytes) -> None:
    """Prepare and install ``bpf`` at once (for callers that are not about to fork)."""
    prepare_filter(bpf).apply()
