"""POSIX ACL entries that let an agent uid write a human's granted path (only with consent,
``fallback.allowDaclMutation``), and their removal on release."""

from __future__ import annotations

import os
import subprocess

from corral.errors import BackendUnavailableError, CorralError, ErrorCode

_TIMEOUT = 120.0


def grant_write(path: str, uid: int) -> None:
    """rwX for ``uid`` on ``path`` (recursively for a directory, plus a default entry so files
    the human adds later are covered too)."""
    argv = ["setfacl", "-P", "-m", f"u:{uid}:rwX", path]
    if os.path.isdir(path):
        argv = ["setfacl", "-P", "-R", "-m", f"u:{uid}:rwX,d:u:{uid}:rwX", path]
    _setfacl(argv, f"could not add an ACL for uid {uid} on {path}")


def revoke(path: str, uid: int) -> None:
    """Remove every ACL entry naming ``uid`` below ``path``; a vanished path is fine."""
    if not os.path.lexists(path):
        return
    argv = ["setfacl", "-P", "-x", f"u:{uid}", path]
    if os.path.isdir(path):
        argv = ["setfacl", "-P", "-R", "-x", f"u:{uid},d:u:{uid}", path]
    _setfacl(argv, f"could not remove the ACL of uid {uid} from {path}")


def _setfacl(argv: list[str], what: str) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT)
    except FileNotFoundError as exc:
        raise BackendUnavailableError(
            "setfacl is missing: read-write grants of the caller's files need POSIX ACLs",
            remediation="apt-get install acl",
        ) from exc
    if done.returncode != 0:
        raise CorralError(f"{what}: {done.stderr.strip()}", code=ErrorCode.BACKEND_ERROR)
