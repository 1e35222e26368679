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
    from corral.lifecycle.api import (
        ProvisionResult,
        deprovision_container,
        provision_container,
        run_in_container,
        spawn_in_container,
        spawn_in_container_with_pty,
        start_container,
        stop_container,
        validate_deprovision,
        validate_exec,
        validate_provision,
        validate_start,
        validate_stop,
    )

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
    "ProvisionResult": "corral.lifecycle.api",
    "provision_container": "corral.lifecycle.api",
    "start_container": "corral.lifecycle.api",
    "run_in_container": "corral.lifecycle.api",
    "spawn_in_container": "corral.lifecycle.api",
    "spawn_in_container_with_pty": "corral.lifecycle.api",
    "stop_container": "corral.lifecycle.api",
    "deprovision_container": "corral.lifecycle.api",
    "validate_provision": "corral.lifecycle.api",
    "validate_start": "corral.lifecycle.api",
    "validate_exec": "corral.lifecycle.api",
    "validate_stop": "corral.lifecycle.api",
    "validate_deprovision": "corral.lifecycle.api",
}

__all__ = [
    "CorralError",
    "ErrorCode",
    "ExecutionResult",
    "Process",
    "ProvisionResult",
    "Request",
    "ValidationResult",
    "deprovision_container",
    "get_available_backends",
    "get_platform_support",
    "provision_container",
    "run",
    "run_in_container",
    "spawn",
    "spawn_in_container",
    "spawn_in_container_with_pty",
    "spawn_with_pty",
    "start_container",
    "stop_container",
    "validate",
    "validate_deprovision",
    "validate_exec",
    "validate_provision",
    "validate_start",
    "validate_stop",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'corral' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
