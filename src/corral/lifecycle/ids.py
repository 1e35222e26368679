"""Sandbox ids: ``<prefix>:<token>`` as MXC shapes them; the prefix names the containment."""

from __future__ import annotations

import re
import secrets

from corral.errors import ErrorCode, LifecycleError

PREFIXES = {
    "process": "corral-process",
    "bubblewrap": "corral-bubblewrap",
    "isolation_session": "corral-session",
    "microvm": "corral-microvm",
    "vm": "corral-vm",
}
_ID = re.compile(r"corral-(?:process|bubblewrap|session|microvm|vm):([0-9a-f]{24})")


def new_id(containment: str) -> str:
    return f"{PREFIXES[containment]}:{secrets.token_hex(12)}"


def token_of(sandbox_id: object) -> str:
    """The opaque token of a Corral sandbox id; ``malformed_id`` for anything else."""
    match = _ID.fullmatch(sandbox_id) if isinstance(sandbox_id, str) else None
    if match is None:
        raise LifecycleError(
            f"{sandbox_id!r} is not a Corral sandbox id",
            code=ErrorCode.MALFORMED_ID,
            remediation="pass the sandboxId returned by provision, e.g. 'corral-process:<24 hex>'",
        )
    return match.group(1)
