"""Tampering with a real log: every kind of edit is caught and located."""

from __future__ import annotations

import json
import os

import pytest
from audit_support import fill

from corral.audit import verify
from corral.audit.chain import record_hash
from corral.errors import CorralError


@pytest.fixture
def log(tmp_path: object) -> str:
    path = os.path.join(str(tmp_path), "audit.jsonl")
    fill(path, 6)
    return path


def _lines(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        return f.readlines()


def _write(path: str, lines: list[bytes]) -> None:
    with open(path, "wb") as f:
        f.writelines(lines)


def test_an_untouched_log_verifies(log: str) -> None:
    result = verify(log)
    assert result.ok and result.records == 6
    assert result.first_bad_line is None and result.problem is None


def test_empty_log_verifies(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "empty.jsonl")
    open(path, "w").close()
    assert verify(path).ok


def test_an_edited_field_is_caught(log: str) -> None:
    lines = _lines(log)
    lines[2] = lines[2].replace(b'"decision":null', b'"decision":"allow"')
    _write(log, lines)
    result = verify(log)
    assert not result.ok and result.first_bad_line == 3 and result.records == 2
    assert "does not match its hash" in str(result.problem)


def test_an_edit_with_a_recomputed_hash_breaks_the_next_link(log: str) -> None:
    lines = _lines(log)
    record = json.loads(lines[2])
    record["actor"]["kind"] = "human"  # the agent pretends a human did it
    record["hash"] = record_hash(record)
    lines[2] = json.dumps(record).encode() + b"\n"
    _write(log, lines)
    result = verify(log)
    assert not result.ok and result.first_bad_line == 4
    assert "previous record was replaced" in str(result.problem)


def test_a_deleted_middle_record_is_caught(log: str) -> None:
    lines = _lines(log)
    del lines[3]
    _write(log, lines)
    result = verify(log)
    assert not result.ok and result.first_bad_line == 4
    assert "deleted" in str(result.problem)


def test_a_reordered_pair_is_caught(log: str) -> None:
    lines = _lines(log)
    lines[2], lines[3] = lines[3], lines[2]
    _write(log, lines)
    result = verify(log)
    assert not result.ok and result.first_bad_line == 3


def test_a_deleted_first_record_is_caught(log: str) -> None:
    _write(log, _lines(log)[1:])
    result = verify(log)
    assert not result.ok and result.first_bad_line == 1
    assert "bad first record" in str(result.problem)


def test_a_forged_first_record_is_caught(log: str) -> None:
    lines = _lines(log)
    record = json.loads(lines[0])
    record["prev"] = "f" * 64
    record["hash"] = record_hash(record)
    lines[0] = json.dumps(record).encode() + b"\n"
    _write(log, lines)
    result = verify(log)
    assert not result.ok and result.first_bad_line == 1


def test_a_truncated_last_record_is_caught(log: str) -> None:
    with open(log, "r+b") as f:
        f.truncate(os.path.getsize(log) - 20)
    result = verify(log)
    assert not result.ok and result.first_bad_line == 6 and result.records == 5
    assert "truncated" in str(result.problem)


def test_a_missing_final_newline_is_caught(log: str) -> None:
    with open(log, "r+b") as f:
        f.truncate(os.path.getsize(log) - 1)
    result = verify(log)
    assert not result.ok and result.first_bad_line == 6


def test_an_inserted_garbage_line_is_caught(log: str) -> None:
    lines = _lines(log)
    lines.insert(2, b"\n")
    _write(log, lines)
    result = verify(log)
    assert not result.ok and result.first_bad_line == 3


def test_a_missing_log_is_an_error_not_a_pass(tmp_path: object) -> None:
    with pytest.raises(CorralError, match="cannot read the audit log"):
        verify(os.path.join(str(tmp_path), "absent.jsonl"))
