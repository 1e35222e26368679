"""Reading the log: filtered queries and the last few records.

Readers do not verify the chain (that is ``verify``'s job) and skip lines that are not JSON
objects, so a damaged log can still be searched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from corral.errors import CorralError, ErrorCode

_TAIL_CHUNK = 65536


def parse_time(value: str | datetime) -> datetime:
    """An aware UTC datetime from an ISO 8601 / RFC 3339 string (naive means UTC)."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError as exc:
            raise CorralError(
                f"{value!r} is not an ISO 8601 time; write e.g. 2026-11-29T04:10:00Z",
                code=ErrorCode.MALFORMED_REQUEST,
            ) from exc
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def query(
    path: str,
    *,
    sandbox: str | None = None,
    actor_kind: str | None = None,
    actor_name: str | None = None,
    decision: str | None = None,
    types: Iterable[str] | None = None,
    since: str | datetime | None = None,
    until: str | datetime | None = None,
) -> Iterator[dict[str, Any]]:
    """Records matching every given filter, oldest first. ``since`` is inclusive, ``until``
    exclusive."""
    wanted_types = None if types is None else frozenset(types)
    start = None if since is None else parse_time(since)
    end = None if until is None else parse_time(until)
    for record in _records(path):
        actor = record.get("actor") or {}
        if sandbox is not None and record.get("sandbox") != sandbox:
            continue
        if actor_kind is not None and actor.get("kind") != actor_kind:
            continue
        if actor_name is not None and actor.get("name") != actor_name:
            continue
        if decision is not None and record.get("decision") != decision:
            continue
        if wanted_types is not None and record.get("type") not in wanted_types:
            continue
        if start is not None or end is not None:
            when = _record_time(record)
            if when is None or (start and when < start) or (end and when >= end):
                continue
        yield record


def tail(path: str, n: int = 10) -> list[dict[str, Any]]:
    """The last ``n`` records, oldest first, reading only the end of the file."""
    if n <= 0:
        return []
    try:
        with open(path, "rb") as log:
            size = os.fstat(log.fileno()).st_size
            chunk, lines = _TAIL_CHUNK, [b""]
            while True:
                start = max(0, size - chunk)
                log.seek(start)
                lines = log.read(size - start).splitlines()
                if start == 0 or len(lines) > n:  # the first line may be cut: need n + 1
                    break
                chunk *= 2
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    return [r for r in (_parse(line) for line in lines[-n:]) if r is not None]


def _records(path: str) -> Iterator[dict[str, Any]]:
    try:
        with open(path, "rb") as log:
            for line in log:
                record = _parse(line)
                if record is not None:
                    yield record
    except OSError as exc:
        raise _unreadable(path, exc) from exc


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _record_time(record: dict[str, Any]) -> datetime | None:
    value = record.get("time")
    if not isinstance(value, str):
        return None
    try:
        return parse_time(value)
    except CorralError:
        return None


def _unreadable(path: str, exc: OSError) -> CorralError:
    return CorralError(
        f"cannot read the audit log {path}: {exc.strerror}", code=ErrorCode.BACKEND_ERROR
    )
