"""Whether the full lifecycle can run in this build (parser and kernel modules present)."""

from __future__ import annotations

import importlib
import importlib.util

import pytest


def lifecycle_ready() -> bool:
    """The full lifecycle needs the contract parser and the kernel modules."""
    try:
        contract = importlib.import_module("corral.contract")
        return hasattr(contract, "parse_request") and all(
            importlib.util.find_spec(f"corral.kernel.{m}") is not None
            for m in ("landlock", "seccomp", "privileges")
        )
    except Exception:  # a half-built package: not ready
        return False


needs_lifecycle = pytest.mark.skipif(
    not lifecycle_ready(), reason="corral.contract.parse_request and corral.kernel.* not built yet"
)
