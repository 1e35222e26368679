"""The audit event model: who asked (declared and observed), what happened, the decision, why."""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from corral.errors import CorralError, ErrorCode

EventType = Literal[
    "request",
    "refusal",
    "plan",
    "launch",
    "exit",
    "timeout",
    "lifecycle",
    "policy_change",
    "network_decision",
    "fs_denial",
    "seccomp_denial",
    "admin_clamp",
    # Kernel denial records (corral.audit.kernel_denials): Landlock IPC scopes, and the watch
    # itself (turned on, unavailable and why, records lost).
    "ipc_denial",
    "kernel_audit",
]
EVENT_TYPES: frozenset[str] = frozenset(get_args(EventType))
ActorKind = Literal["agent", "human", "unknown"]
Decision = Literal["allow", "deny"]


def utc_now() -> str:
    """RFC 3339 UTC with microseconds, e.g. ``2026-11-29T04:10:29.123456Z``."""
    return _rfc3339(datetime.now(UTC))


def utc_time(seconds: float) -> str:
    """``seconds`` since the epoch (a kernel record's clock) in the trail's format."""
    return _rfc3339(datetime.fromtimestamp(seconds, UTC))


def _rfc3339(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")[:-6] + "Z"  # drop "+00:00"


@dataclass(frozen=True)
class Observed:
    """What the OS says about the caller, as opposed to what it declared."""

    uid: int
    pid: int
    exe: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"uid": self.uid, "pid": self.pid}
        if self.exe is not None:
            out["exe"] = self.exe
        return out


@dataclass(frozen=True)
class Actor:
    """Who asked. ``kind``/``name``/``session`` are declared by the caller (``declared`` says
    whether they were); ``uid``/``user``/``observed`` come from the OS and cannot be claimed."""

    uid: int
    user: str
    kind: ActorKind
    name: str | None
    session: str | None
    declared: bool
    observed: Observed

    @classmethod
    def from_process(cls, declared: Any = None) -> Actor:
        """The actor for a request made by this very process."""
        return cls.from_peer(declared, uid=os.getuid(), pid=os.getpid())

    @classmethod
    def from_peer(cls, declared: Any, *, uid: int, pid: int) -> Actor:
        """The actor for a request from another process, e.g. a service client whose ``uid``
        and ``pid`` come from SO_PEERCRED. ``declared`` is an ``ActorSpec``, a mapping with
        ``kind``/``name``/``session``, or None."""
        kind, name, session = _declared_fields(declared)
        return cls(
            uid=uid,
            user=_user_name(uid),
            kind=kind,
            name=name,
            session=session,
            declared=declared is not None,
            observed=Observed(uid=uid, pid=pid, exe=_exe_of(pid)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "user": self.user,
            "kind": self.kind,
            "name": self.name,
            "session": self.session,
            "declared": self.declared,
            "observed": self.observed.to_dict(),
        }


@dataclass(frozen=True)
class AuditEvent:
    """One thing that happened. ``data`` holds type-specific detail (JSON-serialisable)."""

    type: EventType
    actor: Actor
    sandbox: str | None = None
    pid: int | None = None
    decision: Decision | None = None
    reason: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    time: str = field(default_factory=utc_now)

    def __post_init__(self) -> None:
        if self.type not in EVENT_TYPES:
            raise CorralError(
                f"unknown audit event type {self.type!r}; use one of {sorted(EVENT_TYPES)}",
                code=ErrorCode.BACKEND_ERROR,
            )
        if self.decision not in (None, "allow", "deny"):
            raise CorralError(
                f"audit decision must be 'allow', 'deny' or None, not {self.decision!r}",
                code=ErrorCode.BACKEND_ERROR,
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "time": self.time,
            "actor": self.actor.to_dict(),
            "sandbox": self.sandbox,
            "pid": self.pid,
            "decision": self.decision,
            "reason": self.reason,
            "data": dict(self.data),
        }


def _declared_fields(declared: Any) -> tuple[ActorKind, str | None, str | None]:
    if declared is None:
        return "unknown", None, None
    if isinstance(declared, Mapping):
        kind, name, session = declared.get("kind"), declared.get("name"), declared.get("session")
    else:
        kind = getattr(declared, "kind", None)
        name = getattr(declared, "name", None)
        session = getattr(declared, "session", None)
    if kind not in ("agent", "human"):
        raise CorralError(
            f"a declared actor's kind must be 'agent' or 'human', not {kind!r}",
            code=ErrorCode.MALFORMED_REQUEST,
            details={"path": "corral.actor.kind"},
        )
    for label, value in (("name", name), ("session", session)):
        if value is not None and not isinstance(value, str):
            raise CorralError(
                f"a declared actor's {label} must be a string",
                code=ErrorCode.MALFORMED_REQUEST,
                details={"path": f"corral.actor.{label}"},
            )
    return kind, name, session


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _exe_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None  # gone, or not ours to read: the record says so by omitting it
