"""The hash chain's rules, shared by the writer and the verifier."""

from __future__ import annotations

import hashlib
import json
from typing import Any

GENESIS = "0" * 64
FIRST_SEQ = 1


def canonical(record: dict[str, Any]) -> bytes:
    """Deterministic JSON: sorted keys, no spaces, UTF-8."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def record_hash(record: dict[str, Any]) -> str:
    """SHA-256 over the canonical JSON of ``record`` without its ``hash`` field."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()
