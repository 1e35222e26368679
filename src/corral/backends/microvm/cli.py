"""`corral vm build-kernel` (for corral.cli to register): the minimal guest kernel recipe."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    vm = subparsers.add_parser("vm", help="micro-VM guest images")
    actions = vm.add_subparsers(metavar="ACTION", required=True)
    build = actions.add_parser(
        "build-kernel",
        help="build the minimal guest kernel from Debian's kernel source (~8 min on 2 cores)",
    )
    from corral.backends.microvm.kernel import add_build_arguments, run_build

    add_build_arguments(build)
    build.add_argument("--cache-dir", help="default: $CORRAL_CACHE_DIR/microvm")
    build.set_defaults(handler=run_build)
