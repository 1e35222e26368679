"""Landlock: path rules, TCP denial and IPC scopes, built in the parent and enforced in the child.

An adapter over ``landlockpy`` (pinned). Everything that opens paths, loads libc or talks to the
Landlock syscalls for setup happens in :func:`prepare`, before fork; the forked child calls only
:meth:`PreparedLandlock.apply`, one ``landlock_restrict_self`` through a function pointer resolved
here. ``no_new_privs`` (or CAP_SYS_ADMIN) must already be in place: :mod:`corral.kernel.privileges`
sets it.
"""

from __future__ import annotations

import ctypes
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import landlockpy
from landlockpy import AccessFS, AccessNet, Scope
from landlockpy import _syscall as landlock_syscall

from corral.errors import BackendUnavailableError, CorralError, ErrorCode

# landlockpy finds libc with ctypes.util.find_library, which spawns ldconfig (tens of ms) and,
# done lazily, would run inside the sandbox's child; the process's own symbols include libc.
if landlock_syscall._libc is None:
    landlock_syscall._libc = ctypes.CDLL(None, use_errno=True)

_SYS_LANDLOCK_RESTRICT_SELF = 446
_RESTRICT_SELF_LOG_NEW_EXEC_ON = 2

# Rights that make sense on a regular file; the kernel refuses directory rights on a file rule.
_FILE_RIGHTS = (
    AccessFS.EXECUTE
    | AccessFS.WRITE_FILE
    | AccessFS.READ_FILE
    | AccessFS.TRUNCATE
    | AccessFS.IOCTL_DEV
)
_READ_RIGHTS = AccessFS.EXECUTE | AccessFS.READ_FILE | AccessFS.READ_DIR

_REMEDIATION = (
    "Landlock needs Linux 5.13+ built with CONFIG_SECURITY_LANDLOCK=y and 'landlock' in the "
    "lsm= boot parameter; newer features need newer kernels (ABI 4: 6.7 for TCP, ABI 6: 6.12 "
    "for scopes)"
)


def host_abi() -> int:
    """The host's Landlock ABI version, 0 when Landlock is unavailable."""
    try:
        return landlockpy.abi_version()
    except OSError:
        return 0


@dataclass(frozen=True)
class PathRule:
    """Access granted beneath ``path``.

    ``list``: list directories only (no file is opened through it). ``read``: read files, list
    directories, execute. ``write``: that plus every write right of the host's ABI (write,
    truncate, create and remove every kind of entry, rename/link across directories, device
    ioctls, and on ABI 9+ connecting to unix sockets by path).
    """

    path: str
    access: Literal["list", "read", "write"]


@dataclass
class PreparedLandlock:
    """A populated ruleset waiting to be enforced.

    ``enforced`` names what the ruleset restricts, for the plan. The ruleset descriptor is
    close-on-exec; if the launcher closes descriptors in the child, it must keep :meth:`fileno`
    open until :meth:`apply`.
    """

    enforced: dict[str, list[str]]
    _ruleset: landlockpy.Ruleset
    _restrict_self: Callable[..., int]

    def fileno(self) -> int:
        return self._ruleset.fileno()

    def apply(self) -> None:
        """Restrict the calling (single-threaded, freshly forked) process. Irreversible."""
        if self._restrict_self(_SYS_LANDLOCK_RESTRICT_SELF, self._ruleset.fileno(), 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, "landlock_restrict_self failed")

    def close(self) -> None:
        self._ruleset.close()


def _names(flags: AccessFS | AccessNet | Scope) -> list[str]:
    return [str(member.name).lower() for member in type(flags) if member & flags]


def prepare(
    rules: Sequence[PathRule],
    *,
    min_abi: int = 1,
    scope_signals: bool = True,
    scope_abstract_unix: bool = True,
    deny_tcp: bool = False,
) -> PreparedLandlock:
    """Build a ruleset that handles every filesystem right the host knows and grants ``rules``.

    Scopes need ABI 6 and are applied when the host has it (``enforced`` says whether); TCP
    denial needs ABI 4 and is refused below it, since it was asked for explicitly.
    """
    abi = host_abi()
    if abi < max(min_abi, 1):
        raise BackendUnavailableError(
            f"Landlock ABI {min_abi} or newer is required, this host offers "
            + (f"ABI {abi}" if abi else "no Landlock"),
            remediation=_REMEDIATION,
            details={"mechanism": "landlock", "host_abi": abi, "required_abi": min_abi},
        )
    if deny_tcp and abi < 4:
        raise BackendUnavailableError(
            f"Landlock TCP restrictions need ABI 4, this host offers ABI {abi}",
            remediation=_REMEDIATION,
            details={"mechanism": "landlock", "host_abi": abi, "required_abi": 4},
        )
    handled_fs = landlockpy.fs_for_abi(abi)
    handled_net = (AccessNet.BIND_TCP | AccessNet.CONNECT_TCP) if deny_tcp else AccessNet.NONE
    scoped = _scopes(abi, scope_signals, scope_abstract_unix)
    try:
        ruleset = landlockpy.Ruleset(
            handled_fs=handled_fs, handled_net=handled_net, scoped=scoped, best_effort=False
        )
    except OSError as exc:
        raise BackendUnavailableError(
            f"Landlock refused to create a ruleset: {exc}",
            remediation=_REMEDIATION,
            details={"mechanism": "landlock", "host_abi": abi},
        ) from exc
    try:
        for rule in rules:
            _add_rule(ruleset, rule, handled_fs)
    except BaseException:
        ruleset.close()
        raise
    libc = landlock_syscall._get_libc()
    enforced = {
        "abi": [str(abi)],
        "fs": _names(handled_fs),
        "net": _names(handled_net),
        "scopes": _names(scoped),
    }
    return PreparedLandlock(enforced, ruleset, libc.syscall)


@dataclass(frozen=True)
class RulesetPlan:
    """A ruleset as numbers, for a launcher that builds it itself (the native one): the
    handled rights, the rights of each path rule, the rights a non-directory rule keeps, and
    the ``landlock_restrict_self`` flags."""

    handled_fs: int
    handled_net: int
    scoped: int
    file_rights: int
    restrict_flags: int
    rules: tuple[tuple[int, str], ...]
    enforced: dict[str, list[str]]


def plan_ruleset(
    rules: Sequence[PathRule],
    *,
    scope_signals: bool = True,
    scope_abstract_unix: bool = True,
    log_denials: bool = False,
) -> RulesetPlan:
    """What :func:`prepare` would build, without opening anything (the paths are opened inside
    the sandbox's own view). ``log_denials`` (ABI 7) asks the kernel to write an audit record
    for every denial of the workload, which runs after an exec."""
    abi = host_abi()
    if abi < 1:
        raise BackendUnavailableError(
            "Landlock is unavailable on this host",
            remediation=_REMEDIATION,
            details={"mechanism": "landlock", "host_abi": abi},
        )
    handled_fs = landlockpy.fs_for_abi(abi)
    scoped = _scopes(abi, scope_signals, scope_abstract_unix)
    planned = []
    for rule in rules:
        planned.append((int(_rule_rights(rule, handled_fs)), rule.path))
    enforced = {
        "abi": [str(abi)],
        "fs": _names(handled_fs),
        "net": [],
        "scopes": _names(scoped),
    }
    flags = _RESTRICT_SELF_LOG_NEW_EXEC_ON if log_denials and abi >= 7 else 0
    return RulesetPlan(
        int(handled_fs), 0, int(scoped), int(_FILE_RIGHTS), flags, tuple(planned), enforced
    )


def _scopes(abi: int, signals: bool, abstract_unix: bool) -> Scope:
    """IPC scopes (ABI 6+): signals and abstract unix sockets stay inside the sandbox."""
    scoped = Scope.NONE
    if abi >= 6:
        if signals:
            scoped |= Scope.SIGNAL
        if abstract_unix:
            scoped |= Scope.ABSTRACT_UNIX_SOCKET
    return scoped


def _rule_rights(rule: PathRule, handled: AccessFS) -> AccessFS:
    if rule.access not in ("list", "read", "write"):
        raise CorralError(
            f"Landlock rule for {rule.path!r} has access {rule.access!r}; "
            "use 'list', 'read' or 'write'",
            code=ErrorCode.POLICY_VALIDATION,
        )
    rights = {"list": AccessFS.READ_DIR, "read": _READ_RIGHTS}.get(rule.access, handled)
    return rights & handled


def _add_rule(ruleset: landlockpy.Ruleset, rule: PathRule, handled: AccessFS) -> None:
    rights = _rule_rights(rule, handled)
    try:
        if not stat.S_ISDIR(os.stat(rule.path).st_mode):
            rights &= _FILE_RIGHTS
        ruleset.allow_path(rule.path, rights)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CorralError(
            f"cannot add a Landlock {rule.access} rule for {rule.path!r}: {reason}",
            code=ErrorCode.POLICY_VALIDATION,
            details={"path": rule.path},
        ) from exc
