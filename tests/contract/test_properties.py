"""Whatever arrives, parse_request returns a Request or raises a CorralError with a code."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from request_strategies import mutated, random_json, requests

from corral.contract import Request, parse_request
from corral.errors import CorralError, ErrorCode

SETTINGS = settings(max_examples=150, deadline=None)


def outcome(data: Any, experimental: bool = False) -> Request | CorralError:
    try:
        return parse_request(data, experimental=experimental)
    except CorralError as exc:
        assert isinstance(exc.code, ErrorCode)
        assert exc.message
        assert "path" in exc.details
        json.dumps(exc.to_envelope())  # always serialisable for the CLI's error envelope
        return exc


@SETTINGS
@given(mutated(), st.booleans())
def test_mutated_requests_as_mapping_and_text_agree(
    request: dict[str, Any], experimental: bool
) -> None:
    from_mapping = outcome(request, experimental)
    from_text = outcome(json.dumps(request), experimental)
    if isinstance(from_mapping, Request):
        assert from_text == from_mapping
    else:
        assert isinstance(from_text, CorralError)
        assert from_text.details == from_mapping.details


@SETTINGS
@given(requests)
def test_valid_shapes_parse_or_fail_with_a_path(request: dict[str, Any]) -> None:
    result = outcome(request, experimental=True)
    if isinstance(result, Request):
        assert result.version == request["version"]
        assert result.phase == request.get("phase")


@SETTINGS
@given(random_json)
def test_random_json(value: Any) -> None:
    outcome(json.dumps(value))
    if isinstance(value, dict):
        outcome(value)


@SETTINGS
@given(st.one_of(st.binary(max_size=64), st.text(max_size=64)))
def test_random_bytes_and_text(data: bytes | str) -> None:
    outcome(data)


def test_python_values_that_json_cannot_hold() -> None:
    for value in ({1: "x"}, {"version": "1.0.0", "process": {("a",): 1}}, {"version": object()}):
        assert isinstance(outcome(value), CorralError)
    assert isinstance(
        outcome({"version": "1.0.0", "process": {"commandLine": "x", "env": ("A=1",)}}), CorralError
    )


@SETTINGS
@given(
    st.dictionaries(
        st.sampled_from(["version", "phase", "process", "sandboxId", "containment", "corral"]),
        random_json,
    )
)
def test_random_top_level_objects(value: dict[str, Any]) -> None:
    outcome(value)
    outcome(json.dumps(value))
