"""Appending: the chain links, file modes, every event type with its actor, concurrency."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat

import pytest
from audit_support import AGENT, event, fill

from corral.audit import (
    EVENT_TYPES,
    Actor,
    AuditEvent,
    AuditLog,
    NullSink,
    default_log_path,
    verify,
)
from corral.errors import CorralError


def test_records_are_chained_from_the_genesis(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "audit.jsonl")
    records = fill(path, 3)
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert records[0]["prev"] == "0" * 64
    assert records[1]["prev"] == records[0]["hash"]
    assert records[2]["prev"] == records[1]["hash"]
    with open(path) as log:
        assert [json.loads(line) for line in log] == records


def test_a_second_writer_continues_the_chain(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "audit.jsonl")
    first = fill(path, 2)
    second = fill(path, 1)  # a new AuditLog reads the tail of the file to find its link
    assert second[0]["seq"] == 3 and second[0]["prev"] == first[-1]["hash"]
    assert verify(path).ok


def test_file_is_0600_and_new_parents_0700(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "a", "b", "audit.jsonl")
    fill(path, 1)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700


@pytest.mark.parametrize("kind", sorted(EVENT_TYPES))
def test_every_event_type_is_written_with_its_actor(tmp_path: object, kind: str) -> None:
    path = os.path.join(str(tmp_path), "audit.jsonl")
    with AuditLog(path) as log:
        log.append(AuditEvent(kind, Actor.from_process(AGENT), sandbox="sb", decision="deny"))  # type: ignore[arg-type]
    with open(path) as lines:
        (record,) = (json.loads(line) for line in lines)
    assert record["type"] == kind
    actor = record["actor"]
    assert actor["kind"] == "agent" and actor["name"] == "coder" and actor["session"] == "s-42"
    assert actor["declared"] is True
    assert actor["uid"] == os.getuid() and actor["observed"]["pid"] == os.getpid()
    assert actor["observed"]["exe"] == os.readlink("/proc/self/exe")
    assert record["time"].endswith("Z") and len(record["time"]) == len(
        "2026-01-01T00:00:00.000000Z"
    )


def test_undeclared_actor_is_unknown_but_observed() -> None:
    actor = Actor.from_process(None)
    assert actor.kind == "unknown" and actor.declared is False
    assert actor.observed.uid == os.getuid()


def test_bad_event_type_and_declared_kind_are_refused() -> None:
    with pytest.raises(CorralError, match="unknown audit event type"):
        AuditEvent("hack", Actor.from_process(None))  # type: ignore[arg-type]
    with pytest.raises(CorralError, match="kind must be"):
        Actor.from_process({"kind": "root"})


def test_refuses_to_chain_onto_a_damaged_tail(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "audit.jsonl")
    fill(path, 2)
    with open(path, "r+b") as log:
        log.truncate(os.path.getsize(path) - 10)
    with pytest.raises(CorralError, match="ends with a damaged record"):
        fill(path, 1)


def test_a_symlinked_log_is_refused(tmp_path: object) -> None:
    target = os.path.join(str(tmp_path), "elsewhere")
    link = os.path.join(str(tmp_path), "audit.jsonl")
    os.symlink(target, link)
    with pytest.raises(CorralError, match="cannot open the audit log"):
        fill(link, 1)


def test_null_sink_discards() -> None:
    assert NullSink().append(event()) == {}


def test_default_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_AUDIT_LOG", "/x/y.jsonl")
    assert default_log_path() == "/x/y.jsonl"
    monkeypatch.delenv("CORRAL_AUDIT_LOG")
    monkeypatch.setenv("XDG_STATE_HOME", "/state")
    expected = "/var/log/corral/audit.jsonl" if os.geteuid() == 0 else "/state/corral/audit.jsonl"
    assert default_log_path() == expected


def _writer(path: str, count: int) -> None:
    fill(path, count)


@pytest.mark.timeout(60)
def test_concurrent_processes_keep_one_intact_chain(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "audit.jsonl")
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_writer, args=(path, 200)) for _ in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(50)
        assert writer.exitcode == 0
    result = verify(path)
    assert result.ok, result.problem
    assert result.records == 800
    with open(path) as lines:
        pids = {json.loads(line)["actor"]["observed"]["pid"] for line in lines}
    assert len(pids) == 4


def _forked_writer(log: AuditLog, count: int) -> None:
    for _ in range(count):
        log.append(event())


@pytest.mark.timeout(60)
def test_a_log_inherited_across_fork_still_excludes_the_parent(tmp_path: object) -> None:
    # Parent and child share the AuditLog object (and, without care, one open file
    # description, on which flock would not exclude anything).
    path = os.path.join(str(tmp_path), "audit.jsonl")
    log = AuditLog(path)
    log.append(event())
    child = multiprocessing.get_context("fork").Process(target=_forked_writer, args=(log, 300))
    child.start()
    _forked_writer(log, 300)
    child.join(50)
    assert child.exitcode == 0
    result = verify(path)
    assert result.ok, result.problem
    assert result.records == 601
