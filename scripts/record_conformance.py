#!/usr/bin/env python3
"""Ask MXC's reference executor about every conformance case and record its answers.

    python scripts/record_conformance.py [--oracle PATH]

Reads tests/conformance/cases.jsonl, runs ``oracle --dry-run`` (plus ``--experimental`` for
cases that ask for it) and writes tests/conformance/oracle.json. Re-runnable; the tests read
only the recorded file, never the oracle. How answers are classified: docs/conformance.md.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CASES = ROOT / "tests" / "conformance" / "cases.jsonl"
ANSWERS = ROOT / "tests" / "conformance" / "oracle.json"
DEFAULT_ORACLE = ROOT.parent / "shared" / "mxc" / "oracle"

# Exit 1 answers that are not contract rejections: the request parsed, then the host refused.
_BACKEND_REFUSALS = (
    "expected a one-shot request, got a state-aware lifecycle request",  # lifecycle: Windows-only
    "backend is not available on Linux",
    "backend not compiled in",
)
_PREFIXES = ("Configuration parse error: ", "malformed_request: ", "error: ")
_AT = re.compile(r"at `([^`]*)`: ")
_FIELD = re.compile(r"(missing|duplicate) field `([^`]*)`")
_LEADING_PATH = re.compile(
    r"^([A-Za-z_$][\w$]*(?:\.[\w$]+|\[\d+\])*) (?:must|requires|cannot|is invalid)"
)
_DECLARATIONS = {
    "Invalid version declaration": "version",
    "Unsupported contract version": "version",
    "Invalid phase declaration": "phase",
    "Unsupported phase": "phase",
    "Invalid provision containment declaration": "containment",
    "Unsupported containment for provision phase": "containment",
}


def request_bytes(case: dict[str, Any]) -> bytes:
    if "request_b64" in case:
        return base64.b64decode(case["request_b64"])
    return str(case["request"]).encode("utf-8", "surrogatepass")


def ask(oracle: Path, case: dict[str, Any]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        f.write(request_bytes(case))
    try:
        args = [str(oracle), "--dry-run", *(["--experimental"] if case.get("experimental") else [])]
        proc = subprocess.run(
            [*args, f.name], capture_output=True, text=True, errors="replace", timeout=60
        )
    finally:
        os.unlink(f.name)
    # The temporary file's name would make the recording differ from run to run.
    stdout, stderr = (text.replace(f.name, "<request>") for text in (proc.stdout, proc.stderr))
    return classify(proc.returncode, stdout, stderr)


def classify(exit_code: int, stdout: str, stderr: str) -> dict[str, Any]:
    """accept: exit 0, exit 255 (backend-level refusal after validation), or an exit-1 backend
    refusal; reject: any other exit 1 (a contract rejection), with the location it names."""
    result = [ln for ln in stdout.splitlines() if ln.startswith("Dry run completed")]
    errors = [
        ln for ln in stderr.splitlines() if ln.startswith(("Configuration parse error", "error:"))
    ]
    message = (errors or result or [""])[-1]
    for prefix in _PREFIXES * 2:
        message = message.removeprefix(prefix)
    if exit_code in (0, 255) or any(r in message for r in _BACKEND_REFUSALS):
        return {"exit": exit_code, "verdict": "accept", "message": message}
    return {"exit": exit_code, "verdict": "reject", "path": location(message), "message": message}


def location(message: str) -> str | None:
    """The JSON path the reference blames, in Corral's notation; None when it names none."""
    if "backend is experimental" in message:
        return "containment"
    at = _AT.search(message)
    field = _FIELD.search(message)
    if at or (field and "Invalid configuration" in message):
        base = at.group(1) if at else ""
        if field:
            return f"{base}.{field.group(2)}" if base else field.group(2)
        return base
    for declaration, path in _DECLARATIONS.items():
        if message.startswith(declaration):
            detail = message.removeprefix(declaration).lstrip(": ")
            if path == "version" and declaration.startswith("Invalid"):
                # "expected value", "trailing characters": the text is not a JSON object.
                return (
                    path
                    if detail.startswith(("invalid type", "missing field", "duplicate field"))
                    else None
                )
            return path
    leading = _LEADING_PATH.match(message)
    return leading.group(1) if leading else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument(
        "--oracle", type=Path, default=Path(os.environ.get("MXC_ORACLE", DEFAULT_ORACLE))
    )
    args = parser.parse_args()
    cases = [json.loads(line) for line in CASES.read_text(encoding="utf-8").splitlines() if line]
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda c: ask(args.oracle, c), cases))
    recorded = {c["name"]: a for c, a in zip(cases, answers, strict=True)}
    ANSWERS.write_text(
        json.dumps(recorded, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    rejected = sum(a["verdict"] == "reject" for a in answers)
    sys.stdout.write(f"recorded {len(cases)} answers ({rejected} rejections) in {ANSWERS}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
