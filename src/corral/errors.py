"""One exception family for every public failure, carrying MXC's stable error codes."""

from __future__ import annotations

import enum
import json
from typing import Any


class ErrorCode(enum.StrEnum):
    """MXC's closed set of error codes (plus nothing of our own: the set is the contract)."""

    MALFORMED_REQUEST = "malformed_request"
    UNSUPPORTED_CONTAINMENT = "unsupported_containment"
    UNSUPPORTED_PHASE = "unsupported_phase"
    BACKEND_UNAVAILABLE = "backend_unavailable"
    MALFORMED_ID = "malformed_id"
    STALE_ID = "stale_id"
    NOT_PROVISIONED = "not_provisioned"
    NOT_STARTED = "not_started"
    ALREADY_STARTED = "already_started"
    ALREADY_STOPPED = "already_stopped"
    POLICY_VALIDATION = "policy_validation"
    BACKEND_ERROR = "backend_error"


class CorralError(Exception):
    """Base of every error Corral raises on purpose.

    ``code`` is one of :class:`ErrorCode`; ``message`` says what was wrong and how to
    fix it; ``details`` is optional machine-readable context (e.g. the JSON path).
    """

    code: ErrorCode = ErrorCode.BACKEND_ERROR

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        details: dict[str, Any] | None = None,
        remediation: str | None = None,
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.details = details or {}
        self.remediation = remediation

    def to_envelope(self) -> dict[str, Any]:
        """The MXC machine-readable error envelope."""
        err: dict[str, Any] = {"code": str(self.code), "message": self.message}
        if self.details:
            err["details"] = self.details
        if self.remediation:
            err["remediation"] = self.remediation
        return {"error": err}

    def to_json(self) -> str:
        return json.dumps(self.to_envelope())

    def __str__(self) -> str:
        text = f"{self.code}: {self.message}"
        if self.remediation:
            text += f" ({self.remediation})"
        return text


class RequestParseError(CorralError):
    """The request is not JSON, or not an object we can read at all (CLI exit code 1)."""

    code = ErrorCode.MALFORMED_REQUEST


class ValidationError(CorralError):
    """The request is well-formed JSON but breaks the contract; ``details['path']`` locates it."""

    code = ErrorCode.MALFORMED_REQUEST


class PolicyError(CorralError):
    """A policy clause cannot be honoured (admin clamp, no mechanism on this host, ...)."""

    code = ErrorCode.POLICY_VALIDATION


class BackendUnavailableError(CorralError):
    """The selected containment cannot run on this host; the message names what is missing."""

    code = ErrorCode.BACKEND_UNAVAILABLE


class LifecycleError(CorralError):
    """A state-aware phase was called out of order or with a bad sandbox id."""
