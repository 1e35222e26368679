"""The published JSON Schema (draft 2020-12) of every request Corral accepts.

Generated from the parser's own shapes by ``corral.contract.schema_build`` (regenerate with
``python -m corral.contract.schema_build``; a test fails when the file and the shapes drift).
"""

from __future__ import annotations

import json
import os
from typing import Any

SCHEMA_PATH = os.path.join(os.path.dirname(__file__), "schema", "request.schema.json")


def request_schema() -> dict[str, Any]:
    """The published JSON Schema of a request (a fresh copy on every call)."""
    with open(SCHEMA_PATH, encoding="utf-8") as f:
        schema: dict[str, Any] = json.load(f)
    return schema
