"""Build the request JSON Schema (draft 2020-12) from the same shapes the parser checks.

The schema says the shape only; the rules in ``semantics.SEMANTIC_RULES`` (CIDR host bits,
backend sections, proxy URLs, ...) and the experimental gate are left to the parser.
Run ``python -m corral.contract.schema_build`` to rewrite ``schema/request.schema.json``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from corral.contract.json_schema import SCHEMA_PATH
from corral.contract.model import SUPPORTED_VERSIONS
from corral.contract.shapes import AnyJson, Arr, Bool, Enum, Int, Obj, Shape, Str
from corral.contract.wire import (
    PHASES,
    one_shot_shape,
    phase_shape,
    provision_containments,
    provision_shape,
)

SCHEMA_ID = "https://corral.invalid/schema/request.schema.json"


def build_request_schema() -> dict[str, Any]:
    defs: dict[str, Any] = {}
    branches: list[dict[str, Any]] = []

    def branch(name: str, shape: Obj, when: dict[str, Any], required: list[str]) -> None:
        defs[name] = _to_schema(shape, defs)
        condition = {"properties": {k: {"const": v} for k, v in when.items()}, "required": required}
        branches.append({"if": condition, "then": {"$ref": f"#/$defs/{name}"}})

    for version in SUPPORTED_VERSIONS:
        branches.append(
            {
                "if": {
                    "properties": {"version": {"const": version}},
                    "not": {"required": ["phase"]},
                },
                "then": {"$ref": f"#/$defs/OneShot-{version}"},
            }
        )
        defs[f"OneShot-{version}"] = _to_schema(one_shot_shape(version), defs)
        for phase in PHASES[1:]:
            branch(
                f"{phase.capitalize()}-{version}",
                phase_shape(version, phase),
                {"version": version, "phase": phase},
                ["version", "phase"],
            )
        containments = provision_containments(version)
        branches.append(
            {
                "if": {
                    "properties": {"version": {"const": version}, "phase": {"const": "provision"}},
                    "required": ["version", "phase"],
                },
                "then": {
                    "required": ["containment"],
                    "properties": {"containment": {"enum": list(containments)}},
                },
            }
        )
        for containment in containments:
            shape = provision_shape(version, containment)
            assert shape is not None
            branch(
                f"Provision-{containment}-{version}",
                shape,
                {"version": version, "phase": "provision", "containment": containment},
                ["version", "phase", "containment"],
            )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "Corral request (MXC 0.9.0-alpha, 1.0.0, 1.1.0-alpha + Corral extensions)",
        "type": "object",
        "required": ["version"],
        "properties": {
            "version": {"enum": list(SUPPORTED_VERSIONS)},
            "phase": {"enum": list(PHASES)},
        },
        "allOf": branches,
        "$defs": defs,
    }


def _to_schema(shape: Shape, defs: dict[str, Any]) -> dict[str, Any]:
    if isinstance(shape, Obj):
        schema: dict[str, Any] = {
            "type": "object",
            "properties": {k: _to_schema(v, defs) for k, v in shape.fields.items()},
            "additionalProperties": False,
        }
        if shape.required:
            schema["required"] = sorted(shape.required)
        if not shape.name:
            return schema
        defs.setdefault(shape.name, schema)
        if defs[shape.name] != schema:
            raise ValueError(f"two different shapes are named {shape.name}")
        return {"$ref": f"#/$defs/{shape.name}"}
    if isinstance(shape, Str):
        schema = {"type": "string"}
        if shape.non_empty:
            schema["minLength"] = 1
        if shape.pattern:
            schema["pattern"] = shape.pattern
        if shape.forbidden:
            schema["not"] = {"enum": list(shape.forbidden)}
        return schema
    if isinstance(shape, Int):
        return {"type": "integer", "minimum": shape.minimum, "maximum": shape.maximum}
    if isinstance(shape, Bool):
        return {"type": "boolean"}
    if isinstance(shape, Enum):
        return (
            {"const": shape.values[0]} if len(shape.values) == 1 else {"enum": list(shape.values)}
        )
    if isinstance(shape, Arr):
        schema = {"type": "array", "items": _to_schema(shape.item, defs)}
        if shape.non_empty:
            schema["minItems"] = 1
        return schema
    assert isinstance(shape, AnyJson)
    return {}


if __name__ == "__main__":
    with open(SCHEMA_PATH, "w", encoding="utf-8") as f:
        f.write(json.dumps(build_request_schema(), indent=1) + "\n")
    sys.stdout.write(f"wrote {SCHEMA_PATH}\n")
