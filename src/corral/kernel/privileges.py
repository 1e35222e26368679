"""Privilege drop for the sandboxed child: no_new_privs, capabilities, securebits, rlimits.

Own ctypes over libc's ``prctl``/``capget``/``capset`` (no lazy library lookup: libc is the
process image). :func:`prepare_privilege_drop` runs in the parent and allocates every structure;
:meth:`PreparedPrivileges.apply` runs in the freshly forked child and makes only syscalls.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from corral.errors import CorralError, ErrorCode

PR_SET_PDEATHSIG = 1
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4

CAP_SETPCAP = 8

SECBIT_NOROOT = 1 << 0
SECBIT_NOROOT_LOCKED = 1 << 1
SECBIT_NO_SETUID_FIXUP = 1 << 2
SECBIT_NO_SETUID_FIXUP_LOCKED = 1 << 3
SECBIT_KEEP_CAPS_LOCKED = 1 << 5
SECBIT_NO_CAP_AMBIENT_RAISE = 1 << 6
SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED = 1 << 7

# uid 0 gets no capabilities from exec, setuid() changes nothing about capabilities, and
# neither can be undone.
_PURE_CAPABILITY_BITS = (
    SECBIT_NOROOT
    | SECBIT_NOROOT_LOCKED
    | SECBIT_NO_SETUID_FIXUP
    | SECBIT_NO_SETUID_FIXUP_LOCKED
    | SECBIT_KEEP_CAPS_LOCKED
)
_NO_AMBIENT_BITS = SECBIT_NO_CAP_AMBIENT_RAISE | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED

_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
_prctl.restype = ctypes.c_int


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_CapPair = _CapData * 2
_capget = _libc.capget
_capget.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
_capset = _libc.capset
_capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]


def _prctl_checked(option: int, arg2: int = 0, what: str = "prctl") -> None:
    if _prctl(option, arg2, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), what)


def set_no_new_privs() -> None:
    """Forbid gaining privileges through exec (setuid bits, file capabilities) for good."""
    _prctl_checked(PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")


def set_parent_death_signal(sig: int, *, parent_pid: int | None = None) -> None:
    """Deliver ``sig`` to the caller when its parent thread dies.

    When ``parent_pid`` is given and the parent already died before the call (the child was
    reparented), raises ``OSError(ESRCH)`` so the child can exit instead of living on unowned.
    """
    _prctl_checked(PR_SET_PDEATHSIG, sig, "PR_SET_PDEATHSIG")
    if parent_pid is not None and os.getppid() != parent_pid:
        raise OSError(errno.ESRCH, "parent died before the death signal was set")


def _lowest(a: int, b: int) -> int:
    if a == resource.RLIM_INFINITY:
        return b
    if b == resource.RLIM_INFINITY:
        return a
    return min(a, b)


def apply_rlimits(limits: Mapping[int, tuple[int, int]]) -> None:
    """Lower each resource limit to ``(soft, hard)``; never raises one.

    A requested hard limit above the current one is clamped to it (raising needs
    CAP_SYS_RESOURCE, which even root may lack), and the soft limit to the resulting hard one.
    """
    for which, (soft, hard) in limits.items():
        try:
            _, current_hard = resource.getrlimit(which)
            new_hard = _lowest(hard, current_hard)
            resource.setrlimit(which, (_lowest(soft, new_hard), new_hard))
        except ValueError as exc:
            raise OSError(errno.EINVAL, f"resource limit {which}: {exc}") from exc


def _mask(caps: frozenset[int], word: int) -> int:
    return sum(1 << (cap - 32 * word) for cap in caps if cap // 32 == word)


@dataclass
class PreparedPrivileges:
    """A capability drop computed in the parent; :meth:`apply` performs it in the child."""

    keep_caps: frozenset[int]
    bounding_drops: tuple[int, ...]
    securebits: int
    _header: _CapHeader = field(default_factory=_CapHeader, repr=False)
    _current: ctypes.Array[_CapData] = field(default_factory=_CapPair, repr=False)
    _target: ctypes.Array[_CapData] = field(default_factory=_CapPair, repr=False)

    def __post_init__(self) -> None:
        for word in (0, 1):
            mask = _mask(self.keep_caps, word)
            self._target[word].effective = mask
            self._target[word].permitted = mask
            self._target[word].inheritable = mask

    def apply(self) -> None:
        """Set no_new_privs, then reduce every capability set to ``keep_caps``.

        Without CAP_SETPCAP (an unprivileged caller) the bounding set and securebits cannot be
        changed; no_new_privs and the emptied permitted set then keep exec from granting any
        capability.
        """
        set_no_new_privs()
        self._header.version = _LINUX_CAPABILITY_VERSION_3
        self._header.pid = 0
        if _capget(self._header, self._current) != 0:
            raise OSError(ctypes.get_errno(), "capget")
        if self._current[0].effective & (1 << CAP_SETPCAP):
            _prctl_checked(PR_SET_SECUREBITS, self.securebits, "PR_SET_SECUREBITS")
            for cap in self.bounding_drops:
                if _prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                    raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")
        _prctl_checked(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "PR_CAP_AMBIENT_CLEAR_ALL")
        self._header.version = _LINUX_CAPABILITY_VERSION_3
        if _capset(self._header, self._target) != 0:
            raise OSError(ctypes.get_errno(), "capset")
        for cap in self.keep_caps:
            if _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "PR_CAP_AMBIENT_RAISE")


def _last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def prepare_privilege_drop(*, keep_caps: Sequence[int] = ()) -> PreparedPrivileges:
    """Plan a drop of every capability except ``keep_caps`` (kept across exec as ambient)."""
    keep = frozenset(keep_caps)
    last = _last_cap()
    unknown = sorted(cap for cap in keep if not 0 <= cap <= last)
    if unknown:
        raise CorralError(
            f"unknown capabilities {unknown} to keep; this kernel knows 0..{last}",
            code=ErrorCode.POLICY_VALIDATION,
        )
    bits = _PURE_CAPABILITY_BITS | (0 if keep else _NO_AMBIENT_BITS)
    drops = tuple(cap for cap in range(last + 1) if cap not in keep)
    return PreparedPrivileges(keep, drops, bits)
