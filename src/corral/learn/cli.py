"""`corral exec --learn CONFIG` and `corral learn diff OLD NEW`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from corral.errors import CorralError

DIFF_SAME, DIFF_DIFFERENT, DIFF_TROUBLE = 0, 1, 2  # diff(1)'s exit codes
DEFAULT_OUTPUT = "corral-proposed.json"


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    learn = subparsers.add_parser("learn", help="review policies proposed by learning mode")
    commands = learn.add_subparsers(metavar="ACTION")
    cmd = commands.add_parser("diff", help="unified diff of two policies (exit 1 if they differ)")
    cmd.add_argument("old", metavar="OLD")
    cmd.add_argument("new", metavar="NEW")
    cmd.set_defaults(handler=_cmd_diff)


def run_exec(args: argparse.Namespace, request: Any) -> int:
    """`exec --learn`: the workload's output passes through; the denials, the diff and the
    proposal's location go to stderr; the exit code is the workload's."""
    from corral.learn.proposal import to_json
    from corral.learn.run import learn_request

    result = learn_request(request, input=None)
    sys.stdout.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.write(result.stderr)
    output = args.learn_output or _default_output(args)
    with open(output, "w") as f:
        f.write(to_json(result.proposed))
    for warning in result.warnings:
        print(f"corral: warning: {warning}", file=sys.stderr)
    for denial in result.denials_as_dicts():
        print(f"corral: learned: {json.dumps(denial)}", file=sys.stderr)
    for item in result.needs_admin:
        print(f"corral: needs admin: {item}", file=sys.stderr)
    print(f"corral: proposed policy written to {output}", file=sys.stderr)
    sys.stderr.write(result.diff or "corral: the request already allows everything it did\n")
    return result.exit_code


def _default_output(args: argparse.Namespace) -> str:
    config = args.config_path or args.config_flag
    if not config:
        return DEFAULT_OUTPUT
    stem, ext = os.path.splitext(config)
    return f"{stem}.proposed{ext or '.json'}"


def _cmd_diff(args: argparse.Namespace) -> int:
    from corral.learn.proposal import unified_diff

    try:
        old, new = _load(args.old), _load(args.new)
    except CorralError as exc:
        print(f"corral: {exc.message}", file=sys.stderr)
        return DIFF_TROUBLE
    text = unified_diff(old, new, args.old, args.new)
    sys.stdout.write(text)
    return DIFF_DIFFERENT if text else DIFF_SAME


def _load(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
    except OSError as exc:
        raise CorralError(f"cannot read {path!r}: {exc.strerror}") from exc
    except ValueError as exc:
        raise CorralError(f"{path!r} is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise CorralError(f"{path!r} is not a JSON object (an MXC request)")
    return doc
