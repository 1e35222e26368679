"""The audit trail of long-lived sandboxes: every phase (accepted or refused), every policy
change and every exec's launch and end, in the owner's trail with the request's actor."""

from __future__ import annotations

import contextlib
import os
import pwd
from typing import TYPE_CHECKING, Any

from corral.audit.events import Actor, EventType
from corral.audit.log import AuditLog
from corral.audit.recorder import Recorder
from corral.errors import CorralError
from corral.lifecycle import store

if TYPE_CHECKING:
    from corral.api import RunAudit


def audit_log_of(uid: int) -> str:
    """Where ``uid``'s own Corral calls audit (docs/audit.md). A process acting for a user
    (the root service's forked child) still carries root's environment, whose ``$HOME`` and
    ``$CORRAL_AUDIT_LOG`` are not the user's: the user's home from the password database
    then decides."""
    from corral.audit.log import default_log_path

    home = os.environ.get("HOME")
    if uid == 0 or (home and _owned_by(home, uid)):
        return default_log_path()
    return os.path.join(pwd.getpwuid(uid).pw_dir, ".local", "state", "corral", "audit.jsonl")


def _owned_by(path: str, uid: int) -> bool:
    try:
        return os.stat(path).st_uid == uid
    except OSError:
        return False


def recorder(
    sandbox_id: str | None, owner_uid: int, request: dict[str, Any] | None, acting_uid: int | None
) -> Recorder:
    """The owner's trail, the actor the request declared (``corral.actor``) and the one this
    process is (root acting for a user is recorded as that user, observed here)."""
    declared = None
    if isinstance(request, dict):
        section = request.get("corral")
        declared = section.get("actor") if isinstance(section, dict) else None
    uid = os.getuid() if acting_uid is None else acting_uid
    actor = Actor.from_peer(declared if isinstance(declared, dict) else None, uid=uid,
                            pid=os.getpid())  # fmt: skip
    # Root acting for a user (the service's session phases) writes its own trail: a path in
    # the user's home is the user's to point elsewhere (a symlink to /etc/shadow).
    where = audit_log_of(0 if os.geteuid() == 0 else owner_uid)
    return Recorder(AuditLog(where), actor, sandbox=sandbox_id)


def of_state(state: store.SandboxState, acting_uid: int | None = None) -> Recorder:
    return recorder(state.id, state.owner_uid, state.request, acting_uid)


def phase(rec: Recorder, name: str, **data: Any) -> None:
    event: EventType = "policy_change" if name == "policy" else "lifecycle"
    rec.emit(event, decision="allow", phase=name, **data)


def exec_launched(rec: Recorder, pid: int, command: str) -> RunAudit:
    """An exec's launch (``pid`` inside the sandbox); the returned trail writes its end."""
    from corral.api import RunAudit

    rec.emit("launch", pid=pid, phase="exec", command=command)
    return RunAudit(rec)


def refused(rec: Recorder, name: str, exc: CorralError) -> None:
    """Best effort: the refusal itself is what the caller must see (an unwritable trail, as
    for a caller without a home, must not replace it)."""
    with contextlib.suppress(OSError, CorralError):
        rec.emit("refusal", decision="deny", reason=exc.message, code=str(exc.code), phase=name)
