"""Checking the hash chain: any edit, deletion, reordering or partial write is reported with
the first line where the chain stops holding.

Limit (documented in docs/audit.md): a pure hash chain cannot notice that whole records were
cut off the end of the file, nor a rewrite of the last record with a recomputed hash; an
external copy of the latest hash (or signed checkpoints) is needed for that.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from corral.audit.chain import FIRST_SEQ, GENESIS, record_hash
from corral.errors import CorralError, ErrorCode


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records: int  # records that verified before the first problem (all of them when ok)
    first_bad_line: int | None  # 1-based
    problem: str | None


def verify(path: str) -> VerifyResult:
    try:
        with open(path, "rb") as log:
            return _verify_lines(log)
    except OSError as exc:
        raise CorralError(
            f"cannot read the audit log {path}: {exc.strerror}", code=ErrorCode.BACKEND_ERROR
        ) from exc


def _verify_lines(lines: Iterable[bytes]) -> VerifyResult:
    expected_seq, expected_prev = FIRST_SEQ, GENESIS
    count = 0
    for number, raw in enumerate(lines, start=1):
        if not raw.endswith(b"\n"):
            problem: str | None = (
                "the last record is not newline-terminated (truncated or partial write)"
            )
        else:
            try:
                record = json.loads(raw)
                problem = _check(record, expected_seq, expected_prev)
            except ValueError:
                problem = "not a JSON record (edited, or a partial write)"
        if problem is not None:
            return VerifyResult(False, count, number, f"line {number}: {problem}")
        expected_seq, expected_prev = record["seq"] + 1, record["hash"]
        count += 1
    return VerifyResult(True, count, None, None)


def _check(record: Any, expected_seq: int, expected_prev: str) -> str | None:
    first = expected_seq == FIRST_SEQ
    if not isinstance(record, dict) or not all(k in record for k in ("seq", "prev", "hash")):
        return "not an audit record (seq, prev and hash are required)"
    seq, prev, digest = record["seq"], record["prev"], record["hash"]
    if not isinstance(seq, int) or not isinstance(prev, str) or not isinstance(digest, str):
        return "seq, prev or hash has the wrong type (edited)"
    if record_hash(record) != digest:
        return "the record's content does not match its hash (edited)"
    if first and (seq != FIRST_SEQ or prev != GENESIS):
        return (
            f"bad first record: expected seq {FIRST_SEQ} with prev {GENESIS[:8]}..., found "
            f"seq {seq} (records deleted from the start, or the file was replaced)"
        )
    if prev != expected_prev:
        if seq > expected_seq:
            why = f"seq {expected_seq} expected, found {seq}: records deleted or moved"
        elif seq < expected_seq:
            why = f"seq {seq} comes after seq {expected_seq - 1}: records reordered or duplicated"
        else:
            why = "the previous record was replaced"
        return f"chain broken, prev does not match the previous record's hash ({why})"
    if seq != expected_seq:
        return f"sequence number {seq} where {expected_seq} was expected (edited)"
    return None
