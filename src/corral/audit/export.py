"""Exporters for SIEMs: OpenTelemetry logs (OTLP/JSON) and OCSF-shaped events.

The OCSF class per event type is documented in docs/audit.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from corral.audit.query import parse_time
from corral.errors import CorralError

OCSF_VERSION = "1.3.0"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SEVERITY_INFO, _SEVERITY_WARN = (9, "INFO"), (13, "WARN")

# event type -> (OCSF class_uid, class_name, activity_id, activity_name)
_OCSF_CLASS: dict[str, tuple[int, str, int, str]] = {
    "launch": (1007, "Process Activity", 1, "Launch"),
    "exit": (1007, "Process Activity", 2, "Terminate"),
    "timeout": (1007, "Process Activity", 2, "Terminate"),
    "fs_denial": (1001, "File System Activity", 99, "Other"),
    "seccomp_denial": (1003, "Kernel Activity", 4, "Invoke"),
    "network_decision": (4001, "Network Activity", 1, "Open"),
    "request": (6003, "API Activity", 1, "Create"),
    "refusal": (6003, "API Activity", 1, "Create"),
    "plan": (6003, "API Activity", 2, "Read"),
    "admin_clamp": (6003, "API Activity", 3, "Update"),
    "policy_change": (6003, "API Activity", 3, "Update"),
    "lifecycle": (6002, "Application Lifecycle", 99, "Other"),
}
_FS_ACTIVITY = {"create": (1, "Create"), "read": (2, "Read"), "write": (3, "Update")}
_FS_ACTIVITY |= {"delete": (4, "Delete"), "rename": (5, "Rename"), "open": (14, "Open")}
_LIFECYCLE_ACTIVITY = {"provision": (1, "Install"), "deprovision": (2, "Remove")}
_LIFECYCLE_ACTIVITY |= {"start": (3, "Start"), "stop": (4, "Stop")}


def to_otel_logs(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """An OTLP/JSON ``ExportLogsServiceRequest`` holding one log record per audit record."""
    return {
        "resourceLogs": [
            {
                "resource": {"attributes": _attributes({"service.name": "corral"})},
                "scopeLogs": [
                    {
                        "scope": {"name": "corral.audit", "version": "1"},
                        "logRecords": [_otel_record(r) for r in records],
                    }
                ],
            }
        ]
    }


def _otel_record(record: Mapping[str, Any]) -> dict[str, Any]:
    actor = record.get("actor") or {}
    observed = actor.get("observed") or {}
    severity = _SEVERITY_WARN if _is_denial(record) else _SEVERITY_INFO
    nanos = _epoch_nanos(record)
    attributes = {
        "event.name": f"corral.{record.get('type')}",
        "corral.seq": record.get("seq"),
        "corral.hash": record.get("hash"),
        "corral.prev": record.get("prev"),
        "corral.sandbox.id": record.get("sandbox"),
        "corral.decision": record.get("decision"),
        "corral.reason": record.get("reason"),
        "process.pid": record.get("pid"),
        "user.id": actor.get("uid"),
        "user.name": actor.get("user"),
        "corral.actor.kind": actor.get("kind"),
        "corral.actor.name": actor.get("name"),
        "corral.actor.session": actor.get("session"),
        "corral.actor.declared": actor.get("declared"),
        "corral.actor.observed.pid": observed.get("pid"),
        "corral.actor.observed.exe": observed.get("exe"),
        "corral.data": record.get("data") or None,
    }
    return {
        "timeUnixNano": str(nanos),
        "observedTimeUnixNano": str(nanos),
        "severityNumber": severity[0],
        "severityText": severity[1],
        "body": {"stringValue": _summary(record)},
        "attributes": _attributes(attributes),
    }


def _attributes(values: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"key": k, "value": _any_value(v)} for k, v in values.items() if v is not None]


def _any_value(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}  # OTLP/JSON encodes 64-bit integers as strings
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, Mapping):
        return {"kvlistValue": {"values": _attributes(value)}}
    if isinstance(value, list | tuple):
        return {"arrayValue": {"values": [_any_value(v) for v in value if v is not None]}}
    return {"stringValue": str(value)}


def to_ocsf(record: Mapping[str, Any]) -> dict[str, Any]:
    """One OCSF-shaped event for one audit record."""
    kind = str(record.get("type"))
    class_uid, class_name, activity_id, activity = _OCSF_CLASS.get(
        kind, (6003, "API Activity", 99, "Other")
    )
    data: Mapping[str, Any] = record.get("data") or {}
    if kind == "fs_denial":
        activity_id, activity = _FS_ACTIVITY.get(str(data.get("access")), (99, "Other"))
    elif kind == "lifecycle":
        activity_id, activity = _LIFECYCLE_ACTIVITY.get(str(data.get("phase")), (99, "Other"))
    elif kind == "network_decision" and record.get("decision") == "deny":
        activity_id, activity = 5, "Refuse"
    failed = _is_denial(record)
    event: dict[str, Any] = {
        "class_uid": class_uid,
        "class_name": class_name,
        "category_uid": class_uid // 1000,
        "activity_id": activity_id,
        "activity_name": activity,
        "type_uid": class_uid * 100 + activity_id,
        "time": _epoch_nanos(record) // 1_000_000,
        "severity_id": 3 if failed else 1,
        "status_id": 2 if failed else (1 if record.get("decision") == "allow" else 0),
        "message": _summary(record),
        "actor": _ocsf_actor(record.get("actor") or {}),
        "metadata": {
            "version": OCSF_VERSION,
            "product": {"name": "Corral", "vendor_name": "Corral"},
            "log_name": "corral.audit",
            "uid": record.get("hash"),
            "sequence": record.get("seq"),
            "correlation_uid": record.get("sandbox"),
            "original_time": record.get("time"),
        },
        "unmapped": {"corral": {"type": kind, "prev": record.get("prev"), "data": dict(data)}},
    }
    if record.get("reason"):
        event["status_detail"] = record["reason"]
    event |= _ocsf_objects(kind, record, data)
    return event


def _ocsf_actor(actor: Mapping[str, Any]) -> dict[str, Any]:
    observed = actor.get("observed") or {}
    process: dict[str, Any] = {"pid": observed.get("pid")}
    if observed.get("exe"):
        process["file"] = {"path": observed["exe"]}
    out: dict[str, Any] = {
        "user": {"uid": str(actor.get("uid")), "name": actor.get("user")},
        "process": process,
        "app_name": actor.get("name"),
        # OCSF has no "agent or human" field: keep ours beside the standard ones.
        "corral_kind": actor.get("kind"),
        "corral_declared": actor.get("declared"),
    }
    if actor.get("session"):
        out["session"] = {"uid": actor["session"]}
    return out


def _ocsf_objects(kind: str, record: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """The class-specific objects OCSF expects (process, file, endpoints, kernel)."""
    if kind in ("launch", "exit", "timeout"):
        process: dict[str, Any] = {"pid": record.get("pid")}
        if "commandLine" in data:
            process["cmd_line"] = data["commandLine"]
        out: dict[str, Any] = {"process": process}
        if "exitCode" in data:
            out["exit_code"] = data["exitCode"]
        return out
    if kind == "fs_denial":
        return {"file": {"path": data.get("path"), "type_id": 0}}
    if kind == "network_decision":
        return {
            "dst_endpoint": {
                "ip": data.get("ip"),
                "port": data.get("port"),
                "hostname": data.get("host"),
            },
            "connection_info": {"protocol_name": data.get("protocol")},
        }
    if kind == "seccomp_denial":
        return {"kernel": {"name": data.get("syscall"), "type_id": 2, "type": "System Call"}}
    return {"api": {"operation": kind, "service": {"name": "corral"}}}


def _is_denial(record: Mapping[str, Any]) -> bool:
    return record.get("decision") == "deny" or record.get("type") in (
        "refusal",
        "fs_denial",
        "seccomp_denial",
    )


def _summary(record: Mapping[str, Any]) -> str:
    parts = [str(record.get("type"))]
    if record.get("decision"):
        parts.append(str(record["decision"]))
    if record.get("sandbox"):
        parts.append(f"sandbox={record['sandbox']}")
    if record.get("reason"):
        parts.append(f"- {record['reason']}")
    return " ".join(parts)


def _epoch_nanos(record: Mapping[str, Any]) -> int:
    """Nanoseconds since the epoch; 0 (OTLP's "unknown") when the record has no valid time."""
    try:
        when = parse_time(str(record.get("time")))
    except CorralError:
        return 0
    return (when - _EPOCH) // timedelta(microseconds=1) * 1000
