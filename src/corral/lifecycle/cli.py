"""`corral serve | ps | rm ID | logs ID | gc | policy set ID FILE` (registered by corral.cli)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

EXIT_FAILURE = 255


def register(subparsers: Any) -> None:
    sub = subparsers.add_parser("serve", help="run the local lifecycle service (unix socket)")
    sub.add_argument("--socket", help="socket path (default /run/corral/service.sock)")
    sub.set_defaults(handler=_serve)
    subparsers.add_parser("ps", help="list your sandboxes (root: all)").set_defaults(handler=_ps)
    rm = subparsers.add_parser("rm", help="deprovision a sandbox")
    rm.add_argument("sandbox_id", metavar="ID")
    rm.set_defaults(handler=_rm)
    logs = subparsers.add_parser("logs", help="the exec log of a sandbox (JSON lines)")
    logs.add_argument("sandbox_id", metavar="ID")
    logs.set_defaults(handler=_logs)
    subparsers.add_parser("gc", help="clean up after crashed sandboxes").set_defaults(handler=_gc)
    policy = subparsers.add_parser("policy", help="change a running sandbox's policy")
    verbs = policy.add_subparsers(metavar="VERB")
    set_ = verbs.add_parser("set", help="replace a running sandbox's network rules")
    set_.add_argument("sandbox_id", metavar="ID")
    set_.add_argument("file", metavar="FILE")
    set_.set_defaults(handler=_policy_set)


def _guard(body: Any) -> int:
    from corral.errors import CorralError

    try:
        body()
    except CorralError as exc:
        print(exc.to_json(), file=sys.stderr)
        return EXIT_FAILURE
    return 0


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from corral.lifecycle.service import serve_forever

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_forever(args.socket))
    return 0


def _ps(args: argparse.Namespace) -> int:
    from corral.lifecycle import api

    return _guard(lambda: print(json.dumps(api.list_containers(), indent=2)))


def _rm(args: argparse.Namespace) -> int:
    from corral.lifecycle import api

    return _guard(lambda: api.deprovision_container(args.sandbox_id))


def _logs(args: argparse.Namespace) -> int:
    from corral.lifecycle import api

    def show() -> None:
        for entry in api.container_logs(args.sandbox_id):
            print(json.dumps(entry))

    return _guard(show)


def _gc(args: argparse.Namespace) -> int:
    from corral.lifecycle.gc import collect

    return _guard(lambda: print(json.dumps(collect(), indent=2)))


def _policy_set(args: argparse.Namespace) -> int:
    from corral.errors import CorralError, ErrorCode
    from corral.lifecycle import api

    def apply() -> None:
        try:
            with open(args.file, "rb") as f:
                policy = json.load(f)
        except (OSError, ValueError) as exc:
            raise CorralError(
                f"cannot read the policy file {args.file}: {exc}",
                code=ErrorCode.MALFORMED_REQUEST,
            ) from exc
        print(json.dumps({"rules": api.set_container_network_policy(args.sandbox_id, policy)}))

    return _guard(apply)
