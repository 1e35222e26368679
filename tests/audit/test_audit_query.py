"""Reading: filters, tail, and the SIEM exporters' shapes."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

from audit_support import fill

from corral.audit import Actor, AuditEvent, AuditLog, query, tail, to_ocsf, to_otel_logs


def _mixed_log(path: str) -> None:
    agent = Actor.from_process({"kind": "agent", "name": "coder"})
    human = Actor.from_process({"kind": "human", "name": "alice"})
    with AuditLog(path) as log:
        log.append(AuditEvent("request", agent, sandbox="a", decision="allow"))
        log.append(AuditEvent("refusal", human, sandbox="b", decision="deny", reason="nope"))
        log.append(
            AuditEvent(
                "network_decision",
                agent,
                sandbox="a",
                decision="deny",
                data={"ip": "10.0.0.1", "port": 443, "protocol": "tcp"},
            )
        )
        log.append(
            AuditEvent("fs_denial", agent, sandbox="a", data={"path": "/etc/x", "access": "write"})
        )
        log.append(
            AuditEvent("exit", agent, sandbox="a", pid=7, decision="allow", data={"exitCode": 3})
        )
        log.append(AuditEvent("lifecycle", Actor.from_process(None), data={"phase": "start"}))


def test_query_filters(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "audit.jsonl")
    _mixed_log(path)
    assert len(list(query(path))) == 6
    assert [r["type"] for r in query(path, sandbox="b")] == ["refusal"]
    assert [r["actor"]["name"] for r in query(path, actor_kind="human")] == ["alice"]
    assert len(list(query(path, actor_name="coder"))) == 4
    assert [r["type"] for r in query(path, decision="deny")] == ["refusal", "network_decision"]
    assert len(list(query(path, types=["exit", "fs_denial"]))) == 2
    assert len(list(query(path, actor_kind="unknown"))) == 1


def test_query_time_window(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "audit.jsonl")
    _mixed_log(path)
    now = datetime.now(UTC)
    assert len(list(query(path, since=now - timedelta(minutes=1)))) == 6
    assert list(query(path, since=now + timedelta(minutes=1))) == []
    assert list(query(path, until="2000-01-01T00:00:00Z")) == []
    first = next(query(path))["time"]
    assert len(list(query(path, until=first))) == 0  # until is exclusive
    assert len(list(query(path, since=first))) == 6


def test_tail_reads_the_last_records(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "audit.jsonl")
    records = fill(path, 2000)  # larger than one tail chunk
    assert tail(path, 3) == records[-3:]
    assert tail(path, 5000) == records
    assert tail(path, 0) == []


def test_otel_shape(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "audit.jsonl")
    _mixed_log(path)
    out = to_otel_logs(query(path))
    (resource,) = out["resourceLogs"]
    (scope,) = resource["scopeLogs"]
    records = scope["logRecords"]
    assert len(records) == 6
    refusal = records[1]
    assert refusal["severityText"] == "WARN"
    assert int(refusal["timeUnixNano"]) > 1_700_000_000 * 10**9
    attrs = {a["key"]: a["value"] for a in refusal["attributes"]}
    assert attrs["corral.actor.kind"] == {"stringValue": "human"}
    assert attrs["corral.seq"] == {"intValue": "2"}
    assert attrs["corral.actor.declared"] == {"boolValue": True}
    assert "refusal deny" in refusal["body"]["stringValue"]


def test_ocsf_classes(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "audit.jsonl")
    _mixed_log(path)
    events = [to_ocsf(r) for r in query(path)]
    by_class = [(e["class_uid"], e["activity_id"]) for e in events]
    assert by_class == [(6003, 1), (6003, 1), (4001, 5), (1001, 3), (1007, 2), (6002, 3)]
    for e in events:
        assert e["type_uid"] == e["class_uid"] * 100 + e["activity_id"]
        assert e["category_uid"] == e["class_uid"] // 1000
        assert e["actor"]["user"]["uid"] == str(os.getuid())
        assert isinstance(e["time"], int) and e["metadata"]["uid"]
    assert events[1]["status_id"] == 2 and events[1]["status_detail"] == "nope"
    assert events[2]["dst_endpoint"]["ip"] == "10.0.0.1"
    assert events[3]["file"]["path"] == "/etc/x"
    assert events[4]["exit_code"] == 3 and events[4]["process"]["pid"] == 7
    assert events[0]["actor"]["corral_kind"] == "agent"
