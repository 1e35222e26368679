"""The audit trail: who asked (agent or human), what was allowed or denied, and why, in an
append-only hash-chained JSON-lines log that ``verify`` can prove untouched."""

from corral.audit.events import (
    EVENT_TYPES,
    Actor,
    ActorKind,
    AuditEvent,
    Decision,
    EventType,
    Observed,
    utc_now,
)
from corral.audit.export import to_ocsf, to_otel_logs
from corral.audit.log import ENV_LOG, AuditLog, AuditSink, NullSink, default_log_path
from corral.audit.query import query, tail
from corral.audit.verify import VerifyResult, verify

__all__ = [
    "ENV_LOG",
    "EVENT_TYPES",
    "Actor",
    "ActorKind",
    "AuditEvent",
    "AuditLog",
    "AuditSink",
    "Decision",
    "EventType",
    "NullSink",
    "Observed",
    "VerifyResult",
    "default_log_path",
    "query",
    "tail",
    "to_ocsf",
    "to_otel_logs",
    "utc_now",
    "verify",
]
