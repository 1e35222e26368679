"""Helpers shared by the audit tests: an actor and a quick way to fill a log."""

from __future__ import annotations

from corral.audit import Actor, AuditEvent, AuditLog, EventType

AGENT = {"kind": "agent", "name": "coder", "session": "s-42"}


def event(kind: EventType = "launch", **fields: object) -> AuditEvent:
    return AuditEvent(kind, Actor.from_process(AGENT), **fields)  # type: ignore[arg-type]


def fill(path: str, count: int) -> list[dict[str, object]]:
    with AuditLog(path) as log:
        return [log.append(event(sandbox=f"sb-{i % 3}", pid=100 + i)) for i in range(count)]
