"""The `corral` command: thin, over the SDK. Startup time is a product metric: import lazily."""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import Sequence
from typing import Any

EXIT_UNPARSEABLE = 1
EXIT_FAILURE = 255


CORE_COMMANDS = ("exec", "backends")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    # Other layers' subcommands cost imports: load them only when they may be wanted.
    parser = _parser(with_optional=first not in CORE_COMMANDS)
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return 2
    code: int = args.handler(args)
    return code


def _parser(*, with_optional: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corral", description="Policy-driven execution containers for AI agents."
    )
    sub = parser.add_subparsers(metavar="COMMAND")
    ex = sub.add_parser("exec", help="run (or --dry-run) an MXC request")
    ex.add_argument("config_path", nargs="?", metavar="CONFIG_PATH")
    ex.add_argument("--config", dest="config_flag", metavar="PATH")
    ex.add_argument("--config-base64", metavar="B64")
    ex.add_argument("--dry-run", action="store_true", help="validate and print the plan")
    ex.add_argument("--json", action="store_true", help="print the plan as JSON")
    ex.add_argument("--debug", action="store_true")
    ex.add_argument("--log-file", metavar="PATH")
    ex.add_argument("--experimental", action="store_true")
    ex.add_argument(
        "--learn",
        action="store_true",
        help="learning mode: run permissively, record what the policy would refuse, "
        "write a proposed policy",
    )
    ex.add_argument(
        "--learn-output", metavar="PATH", help="where --learn writes the proposed policy"
    )
    ex.set_defaults(handler=_cmd_exec)
    be = sub.add_parser("backends", help="backends and capabilities on this host (JSON)")
    be.set_defaults(handler=_cmd_backends)
    if with_optional:
        _register_optional(sub)
    return parser


def _register_optional(sub: Any) -> None:
    """Subcommands owned by other layers (audit, lifecycle, ...), when present."""
    for module in (
        "corral.audit.cli",
        "corral.lifecycle.cli",
        "corral.learn.cli",
        "corral.backends.microvm.cli",
    ):
        try:
            __import__(module)
        except ImportError:
            continue
        sys.modules[module].register(sub)


def _read_config(args: argparse.Namespace) -> bytes:
    given = [x for x in (args.config_path, args.config_flag, args.config_base64) if x]
    if len(given) != 1:
        raise _Usage("give exactly one of CONFIG_PATH, --config PATH or --config-base64 B64")
    if args.config_base64:
        try:
            return base64.b64decode(args.config_base64, validate=True)
        except ValueError as exc:
            raise _Usage(f"--config-base64 is not valid base64: {exc}") from exc
    path = args.config_path or args.config_flag
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise _Usage(f"cannot read config {path!r}: {exc.strerror}") from exc


class _Usage(Exception):
    pass


def _log(args: argparse.Namespace, message: str) -> None:
    if args.debug:
        print(f"corral: {message}", file=sys.stderr)
    if args.log_file:
        with open(args.log_file, "a") as f:
            f.write(message + "\n")


def _cmd_exec(args: argparse.Namespace) -> int:
    from corral import api
    from corral.errors import CorralError, RequestParseError, ValidationError

    try:
        raw = _read_config(args)
        request = api.parse(raw, experimental=args.experimental)
    except _Usage as exc:
        print(f"corral: {exc}", file=sys.stderr)
        return EXIT_UNPARSEABLE
    except (RequestParseError, ValidationError) as exc:
        print(f"Request error\n{exc.message}", file=sys.stderr)
        _log(args, f"rejected: {exc}")
        return EXIT_UNPARSEABLE
    except CorralError as exc:
        return _fail(args, exc)
    try:
        if not request.is_one_shot:
            return _lifecycle(args, request)
        if args.learn and not args.dry_run:
            from corral.learn.cli import run_exec

            return run_exec(args, request)
        if args.dry_run:
            plan = api.plan(request)
            _log(args, f"plan:\n{plan.render_table()}")
            print(plan.to_json() if args.json else plan.render_table())
            return 0
        return _run_inherited(args, request)
    except CorralError as exc:
        return _fail(args, exc)


def _run_inherited(args: argparse.Namespace, request: Any) -> int:
    """The workload on the caller's own stdio, with the SDK's audit trail."""
    from corral import api
    from corral.backends.base import LaunchOptions
    from corral.errors import CorralError, ErrorCode

    sys.stdout.flush()
    options = LaunchOptions("inherit", "inherit", "inherit")
    plan, proc, trail = api.audited_launch(request, options)
    _log(args, f"plan:\n{plan.render_table()}")
    for warning in plan.warnings:
        print(f"corral: warning: {warning}", file=sys.stderr)
    try:
        with proc:
            code = proc.wait()
    finally:
        trail.finish(proc)
    if proc.timed_out:
        raise CorralError(
            f"the workload exceeded its timeout of {plan.timeout_ms} ms and was killed",
            code=ErrorCode.BACKEND_ERROR,
            details={"timedOut": True},
        )
    return code


def _lifecycle(args: argparse.Namespace, request: Any) -> int:
    from corral.errors import CorralError, ErrorCode

    try:
        from corral.lifecycle import api as lifecycle
    except ImportError:
        raise CorralError(
            f"the state-aware phase {request.phase!r} is not available in this build",
            code=ErrorCode.UNSUPPORTED_PHASE,
        ) from None
    result = lifecycle.handle(request)
    print(json.dumps({"result": result}))
    if request.phase == "exec":  # as the reference CLI: the workload's own exit code
        return EXIT_FAILURE if result["timedOut"] else int(result["exitCode"])
    return 0


def _fail(args: argparse.Namespace, exc: Any) -> int:
    _log(args, f"error: {exc}")
    print(exc.to_json(), file=sys.stderr)
    return EXIT_FAILURE


def _cmd_backends(args: argparse.Namespace) -> int:
    from corral import api

    print(json.dumps(api.get_available_backends(), indent=2))
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
