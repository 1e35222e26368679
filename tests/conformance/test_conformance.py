"""Corral's parser against MXC's recorded answers (tests/conformance/oracle.json).

Each case must get the reference's verdict and, when both reject and the reference names a
location, the same location. Deliberate differences are listed by name in differences.json
(and explained in docs/conformance.md); a listed case must really differ, so the list stays true.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from corral.contract import parse_request
from corral.errors import CorralError, RequestParseError

HERE = Path(__file__).parent
DOCS = HERE.parent.parent / "docs" / "conformance.md"
CASES = [
    json.loads(line) for line in (HERE / "cases.jsonl").read_text("utf-8").splitlines() if line
]
ORACLE: dict[str, dict[str, Any]] = json.loads((HERE / "oracle.json").read_text("utf-8"))
DIFFERENCES: dict[str, str] = json.loads((HERE / "differences.json").read_text("utf-8"))


def request_of(case: dict[str, Any]) -> str | bytes:
    if "request_b64" in case:
        return base64.b64decode(case["request_b64"])
    return str(case["request"])


def corral_answer(case: dict[str, Any]) -> dict[str, Any]:
    try:
        parse_request(request_of(case), experimental=bool(case.get("experimental")))
    except RequestParseError as exc:
        return {"verdict": "reject", "path": None, "message": exc.message}
    except CorralError as exc:
        return {"verdict": "reject", "path": exc.details["path"], "message": exc.message}
    return {"verdict": "accept"}


def differs(ours: dict[str, Any], theirs: dict[str, Any]) -> str | None:
    if ours["verdict"] != theirs["verdict"]:
        return f"Corral: {ours['verdict']} ({ours.get('message')}); MXC: {theirs['verdict']} ({theirs['message']})"
    located = None not in (ours.get("path"), theirs.get("path"))
    if ours["verdict"] == "reject" and located and ours["path"] != theirs["path"]:
        return f"Corral blames {ours['path']!r} ({ours['message']}); MXC blames {theirs['path']!r} ({theirs['message']})"
    return None


def test_suite_is_large_and_recorded() -> None:
    names = [c["name"] for c in CASES]
    assert len(names) >= 250
    assert len(set(names)) == len(names), "case names must be unique"
    assert set(ORACLE) == set(names), (
        "re-run scripts/record_conformance.py after editing cases.jsonl"
    )


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_case_matches_reference(case: dict[str, Any]) -> None:
    difference = differs(corral_answer(case), ORACLE[case["name"]])
    if case["name"] in DIFFERENCES:
        assert difference is not None, "listed as a deliberate difference but now agrees: unlist it"
    else:
        assert difference is None, difference


def test_every_listed_difference_is_a_case_and_documented() -> None:
    docs = DOCS.read_text("utf-8")
    names = {c["name"] for c in CASES}
    for name, reason in DIFFERENCES.items():
        assert name in names, f"{name} is listed but no such case exists"
        assert reason.strip(), f"{name} needs a reason"
        assert f"`{name}`" in docs, f"{name} is not explained in docs/conformance.md"
