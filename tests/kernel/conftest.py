"""Run a test's attack in a forked child, after the child restricted itself, and report back.

Kernel restrictions are irreversible, so each attempt happens in a fresh child of the test
process. The child reports one JSON value through a pipe: ``"ok"`` when the action succeeded,
the errno name (``"EACCES"``) when it failed with an OSError, or ``"setup: ..."`` when the
restriction itself could not be applied.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from typing import Any

import pytest

Step = Callable[[], Any]


def _attempt(action: Step) -> Any:
    try:
        value = action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "ok" if value is None else value


def run_child(action: Step, *setup: Step) -> Any:
    """Fork, run every ``setup`` step, then ``action``; return what the child reported."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            try:
                for step in setup:
                    step()
                report = _attempt(action)
            except BaseException as exc:
                report = f"setup: {exc!r}"
            os.write(write_end, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    chunks = []
    with os.fdopen(read_end, "rb") as reader:
        chunks.append(reader.read())
    _, status = os.waitpid(pid, 0)
    data = b"".join(chunks)
    if not data:
        raise AssertionError(f"child reported nothing (wait status {status:#x})")
    return json.loads(data)


@pytest.fixture
def in_child() -> Callable[..., Any]:
    return run_child
