"""Which backend serves which containment, and what each can do on this host."""

from __future__ import annotations

from corral.backends.base import Backend, BackendInfo
from corral.errors import ErrorCode, PolicyError

BACKEND_NAMES = ("process", "microvm", "session")


def get_backend(name: str) -> Backend:
    if name == "process":
        from corral.backends.process import ProcessBackend

        return ProcessBackend()
    if name == "microvm":
        from corral.backends.microvm import MicrovmBackend

        return MicrovmBackend()
    if name == "session":
        from corral.backends.session import SessionBackend

        return SessionBackend()
    raise PolicyError(
        f"no Corral backend named {name!r} on Linux",
        code=ErrorCode.UNSUPPORTED_CONTAINMENT,
        remediation="run `corral backends` to list what this host offers",
    )


def available_backends() -> list[BackendInfo]:
    """Every backend's real probe result on this host (unavailable ones say why)."""
    infos: list[BackendInfo] = []
    for name in BACKEND_NAMES:
        try:
            infos.append(get_backend(name).probe())
        except ImportError as exc:
            infos.append(BackendInfo(name, False, f"not built into this Corral: {exc}"))
    return infos
