"""The process escape suite (tests/escape), run again in isolation_session mode: every attack
that fails in a process sandbox fails under the agent identity too."""

from __future__ import annotations

from typing import Any

import pytest
from tests.conftest import Result, Runner
from tests.escape import test_escape as escape
from tests.session.support import CLOSED_NETWORK


class SessionRunner(Runner):
    """The root caller (session sandboxes need root), every request made an isolation_session
    one: closed network, and consent for the scene's read-write grant of the caller's files."""

    def run(self, request: dict[str, Any]) -> Result:
        session = {
            "containment": "isolation_session",
            "network": CLOSED_NETWORK,
            "fallback": {"allowDaclMutation": True},
        }
        return super().run({**session, **request})


@pytest.fixture
def runner() -> Runner:
    return SessionRunner(None, None)


@pytest.fixture
def scene(runner: Runner, area: str) -> escape.Scene:
    return escape.Scene(runner, area)


class TestFilesystem(escape.TestFilesystem):
    pass


class TestProcessesAndKernel(escape.TestProcessesAndKernel):
    pass


class TestSockets(escape.TestSockets):
    pass
