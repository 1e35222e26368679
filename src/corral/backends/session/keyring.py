"""The workload's own kernel session keyring.

Joining happens in the workload child after it became the agent uid (so the keyring is the
agent's) and before seccomp, whose default filter forbids keyctl. It rides on the launcher's
privilege-drop step, which runs exactly there.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Any

_SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}.get(platform.machine(), 250)
_KEYCTL_JOIN_SESSION_KEYRING = 1
_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def join_new_session_keyring() -> int:
    """Replace the calling process's session keyring with a new anonymous one; its serial."""
    serial = int(_syscall(_SYS_KEYCTL, _KEYCTL_JOIN_SESSION_KEYRING, None))
    if serial < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"keyctl(JOIN_SESSION_KEYRING): {os.strerror(err)}")
    return serial


class OwnSessionKeyring:
    """Wraps a prepared privilege drop (``ChildSpec.privileges``): new keyring, then the drop."""

    def __init__(self, privileges: Any) -> None:
        self.privileges = privileges

    def apply(self) -> None:
        join_new_session_keyring()
        if self.privileges is not None:
            self.privileges.apply()
