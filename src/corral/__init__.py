"""Corral: policy-driven execution containers for AI agents on Linux (MXC-compatible).

    import corral
    result = corral.run({"process": {"commandLine": "ls"}, "filesystem": {"readonlyPaths": ["/src"]}})

Public names are loaded on first use so that `corral` the command starts fast. The plan of a
request (what `corral exec --dry-run` prints) is `corral.api.plan(request)`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from corral.errors import CorralError, ErrorCode

if TYPE_CHECKING:
    from corral.api import (
        ExecutionResult,
        Process,
        ValidationResult,
        get_available_backends,
        get_platform_support,
        run,
        spawn,
        spawn_with_pty,
        validate,
    )
    from corral.contract.model import Request

_LAZY = {
    "ExecutionResult": "corral.api",
    "Process": "corral.api",
    "ValidationResult": "corral.api",
    "get_available_backends": "corral.api",
    "get_platform_support": "corral.api",
    "run": "corral.api",
    "spawn": "corral.api",
    "spawn_with_pty": "corral.api",
    "validate": "corral.api",
    "Request": "corral.contract.model",
}

__all__ = ["CorralError", "ErrorCode", *_LAZY]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'corral' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
