"""The published JSON Schema agrees with the parser, except for the documented semantic rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from jsonschema import Draft202012Validator
from request_strategies import mutated, requests

from corral.contract import parse_request, request_schema
from corral.contract.schema_build import build_request_schema
from corral.contract.semantics import SEMANTIC_RULES
from corral.errors import RequestParseError, ValidationError

CONFORMANCE = Path(__file__).parent.parent / "conformance" / "cases.jsonl"
# Rules the schema cannot see (docs/conformance.md): the semantic rules, the experimental gate
# (the schema describes the request as if experimental features were on), and what a schema
# validator never sees because JSON decoding already folded it.
NOT_IN_SCHEMA = SEMANTIC_RULES | {"experimental"}
INVISIBLE_TO_SCHEMA = {"duplicate_key", "integral_float"}
VALIDATOR = Draft202012Validator(request_schema())


def test_published_file_is_generated_from_the_shapes() -> None:
    assert request_schema() == build_request_schema(), "run: python -m corral.contract.schema_build"
    Draft202012Validator.check_schema(request_schema())


def assert_agree(text: str) -> None:
    try:
        parse_request(text, experimental=True)
    except RequestParseError:
        return
    except ValidationError as exc:
        rule = exc.details["rule"]
        if rule in INVISIBLE_TO_SCHEMA:
            return
        errors = list(VALIDATOR.iter_errors(json.loads(text)))
        if rule in NOT_IN_SCHEMA:
            # The shape was fine, so the schema must accept it.
            assert not errors, f"parser: {exc.message}; schema: {errors[0].message}"
        else:
            assert errors, f"parser rejects ({exc.message}) but the schema accepts"
        return
    errors = list(VALIDATOR.iter_errors(json.loads(text)))
    assert not errors, (
        f"parser accepts but the schema says: {errors[0].message} at {list(errors[0].absolute_path)}"
    )


def conformance_texts() -> list[tuple[str, str]]:
    cases = [json.loads(line) for line in CONFORMANCE.read_text("utf-8").splitlines() if line]
    return [(c["name"], c["request"]) for c in cases if "request" in c]


@pytest.mark.parametrize(
    ("name", "text"), conformance_texts(), ids=[n for n, _ in conformance_texts()]
)
def test_schema_agrees_on_conformance_case(name: str, text: str) -> None:
    assert_agree(text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests)
def test_schema_agrees_on_generated_requests(request: dict[str, Any]) -> None:
    assert_agree(json.dumps(request))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_schema_agrees_on_mutated_requests(request: dict[str, Any]) -> None:
    assert_agree(json.dumps(request))
