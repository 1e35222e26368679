"""Learning mode: run a workload permissively, record what the requested policy would refuse,
and propose the request plus the least grants that would have let it run.

Names load on first use: `corral learn diff` and `corral exec` must not pay for the sandbox
machinery they do not run.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corral.learn.analyse import Denial
    from corral.learn.proposal import to_json, unified_diff
    from corral.learn.run import LearnResult, learn, learn_request

_LAZY = {
    "Denial": "corral.learn.analyse",
    "to_json": "corral.learn.proposal",
    "unified_diff": "corral.learn.proposal",
    "LearnResult": "corral.learn.run",
    "learn": "corral.learn.run",
    "learn_request": "corral.learn.run",
}

__all__ = ["Denial", "LearnResult", "learn", "learn_request", "to_json", "unified_diff"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'corral.learn' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
