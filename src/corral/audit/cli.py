"""``corral audit verify|tail|query|export``: thin commands over ``corral.audit``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from typing import Any

from corral.audit.events import EVENT_TYPES
from corral.audit.export import to_ocsf, to_otel_logs
from corral.audit.log import ENV_LOG, default_log_path
from corral.audit.query import query, tail
from corral.audit.verify import verify
from corral.errors import CorralError


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    audit = subparsers.add_parser("audit", help="verify, read and export the audit trail")
    commands = audit.add_subparsers(metavar="ACTION")

    cmd = commands.add_parser("verify", help="check the hash chain; exit 1 if tampered")
    _log_option(cmd)
    cmd.set_defaults(handler=_cmd_verify)

    cmd = commands.add_parser("tail", help="print the last records")
    cmd.add_argument("-n", type=int, default=10, metavar="N", help="how many (default 10)")
    _log_option(cmd)
    cmd.set_defaults(handler=_cmd_tail)

    cmd = commands.add_parser("query", help="print records matching every filter")
    cmd.add_argument("--sandbox", metavar="ID")
    cmd.add_argument("--actor-kind", choices=("agent", "human", "unknown"))
    cmd.add_argument("--actor", metavar="NAME", help="the declared actor name")
    cmd.add_argument("--decision", choices=("allow", "deny"))
    cmd.add_argument(
        "--type", action="append", choices=sorted(EVENT_TYPES), help="repeatable event type"
    )
    cmd.add_argument("--since", metavar="ISO", help="inclusive, e.g. 2026-11-29T04:00:00Z")
    cmd.add_argument("--until", metavar="ISO", help="exclusive")
    _log_option(cmd)
    cmd.set_defaults(handler=_cmd_query)

    cmd = commands.add_parser("export", help="print the log for a SIEM")
    cmd.add_argument("--format", choices=("otel", "ocsf"), required=True)
    _log_option(cmd)
    cmd.set_defaults(handler=_cmd_export)


def _log_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log", metavar="PATH", help=f"the audit log (default: ${ENV_LOG} or the per-user log)"
    )


def _cmd_verify(args: argparse.Namespace) -> int:
    path = args.log or default_log_path()
    return _guard(lambda: _report_verify(path))


def _report_verify(path: str) -> int:
    result = verify(path)
    if result.ok:
        print(f"{path}: OK, {result.records} records, chain intact")
        return 0
    print(f"{path}: TAMPERED at {result.problem}", file=sys.stderr)
    print(f"{result.records} records verified before line {result.first_bad_line}", file=sys.stderr)
    return 1


def _cmd_tail(args: argparse.Namespace) -> int:
    path = args.log or default_log_path()
    return _guard(lambda: _print_lines(tail(path, args.n)))


def _cmd_query(args: argparse.Namespace) -> int:
    path = args.log or default_log_path()
    return _guard(
        lambda: _print_lines(
            query(
                path,
                sandbox=args.sandbox,
                actor_kind=args.actor_kind,
                actor_name=args.actor,
                decision=args.decision,
                types=args.type,
                since=args.since,
                until=args.until,
            )
        )
    )


def _cmd_export(args: argparse.Namespace) -> int:
    path = args.log or default_log_path()

    def export() -> int:
        records = query(path)
        if args.format == "otel":
            print(json.dumps(to_otel_logs(records)))
            return 0
        return _print_lines(to_ocsf(r) for r in records)

    return _guard(export)


def _print_lines(records: Iterable[dict[str, Any]]) -> int:
    for record in records:
        print(json.dumps(record, ensure_ascii=False))
    return 0


def _guard(action: Callable[[], int]) -> int:
    try:
        code = action()
    except CorralError as exc:
        print(f"corral audit: {exc}", file=sys.stderr)
        return 2
    return code
