"""Run one lifecycle operation as a sandbox's owner: a sandbox's supervisor must run with its
owner's uid (root acting for a user, and the root service acting for its callers)."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
from collections.abc import Callable
from typing import Any

from corral.errors import CorralError, ErrorCode

_PR_SET_DUMPABLE = 4


def run_as(uid: int, gid: int, operation: Callable[[], Any]) -> Any:
    """``operation()`` in a forked child with uid/gid dropped; its JSON result, or its
    CorralError re-raised here."""
    if os.getuid() == uid:
        return operation()
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            drop_to(uid, gid)
            reply: dict[str, Any] = {"result": operation()}
        except CorralError as exc:
            reply = exc.to_envelope()
        except BaseException as exc:  # a forked child must never return into the caller
            reply = {"error": {"code": "backend_error", "message": f"{type(exc).__name__}: {exc}"}}
            code = 1
        with contextlib.suppress(BaseException):
            os.write(w, json.dumps(reply).encode())
        os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    return unwrap(json.loads(b"".join(chunks) or b"{}"))


def drop_to(uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` for good. The kernel marks a process that changed credentials
    non-dumpable, which makes its /proc files root's and so forbids writing its own uid map in
    a new user namespace; the dropped process is the user's own, so it is made dumpable."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    ctypes.CDLL(None).prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)


def unwrap(reply: dict[str, Any]) -> Any:
    """The result of an envelope, or its error raised as a CorralError with the same code."""
    if "error" in reply:
        err = reply["error"]
        try:
            code = ErrorCode(err.get("code"))
        except ValueError:
            code = ErrorCode.BACKEND_ERROR
        raise CorralError(
            str(err.get("message")), code=code, details=err.get("details"),
            remediation=err.get("remediation"),
        )  # fmt: skip
    if "result" not in reply:
        raise CorralError("the operation ended without a result", code=ErrorCode.BACKEND_ERROR)
    return reply["result"]
