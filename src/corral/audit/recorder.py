"""Emit the SDK's audit events for one request: who asked, what was planned, how it ended."""

from __future__ import annotations

from typing import Any

from corral.audit.events import Actor, AuditEvent, EventType
from corral.audit.log import AuditLog, AuditSink, NullSink


class Recorder:
    """Binds one request's actor and sandbox to a sink; ``emit`` never loses the actor."""

    def __init__(self, sink: AuditSink, actor: Actor, sandbox: str | None = None) -> None:
        self.sink = sink
        self.actor = actor
        self.sandbox = sandbox

    @classmethod
    def open(cls, *, enabled: bool, declared_actor: Any = None) -> Recorder:
        sink: AuditSink = AuditLog() if enabled else NullSink()
        return cls(sink, Actor.from_process(declared_actor))

    def emit(
        self,
        type: EventType,
        *,
        pid: int | None = None,
        decision: str | None = None,
        reason: str | None = None,
        **data: Any,
    ) -> None:
        self.sink.append(
            AuditEvent(
                type,
                self.actor,
                sandbox=self.sandbox,
                pid=pid,
                decision=decision,  # type: ignore[arg-type]
                reason=reason,
                data=data,
            )
        )

    def network_decision(self, event: dict[str, Any]) -> None:
        """Callback for corral.net: each proxy or rule decision becomes an audit event."""
        data = {k: v for k, v in event.items() if k not in ("decision", "reason", "pid")}
        self.emit(
            "network_decision",
            pid=event.get("pid"),
            decision=event.get("decision"),
            reason=event.get("reason") or event.get("rule"),
            **data,
        )
