"""The human's session buses and agents (D-Bus, ssh-agent) stay out of reach, and their
environment variables never reach the agent."""

from __future__ import annotations

import socket
import subprocess

import pytest
from tests.session.support import HumanSockets, as_nobody, session_request

import corral

CONNECT = """
echo "vars: XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-unset} DBUS=${DBUS_SESSION_BUS_ADDRESS:-unset} SSH=${SSH_AUTH_SOCK:-unset}"
for path in %s; do
  socat -T2 - "UNIX-CONNECT:$path" </dev/null 2>&1 || echo "refused: $path"
done
"""


def test_human_sockets_answer_unsandboxed(human_sockets: HumanSockets) -> None:
    """Baseline: any other local user's process reaches them."""
    for path in (human_sockets.bus, human_sockets.ssh_agent):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            assert s.recv(100).strip() == human_sockets.banner
        reached = as_nobody(["socat", "-T2", "-", f"UNIX-CONNECT:{path}"], stdin=subprocess.DEVNULL)
        assert human_sockets.banner.decode() in reached.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("grant_run", [False, True], ids=["no-grant", "run-granted"])
def test_sandbox_cannot_reach_human_session_sockets(
    human_sockets: HumanSockets, grant_run: bool
) -> None:
    # The caller passes its whole session environment, and even grants /run read-only.
    request = session_request(
        CONNECT % f"{human_sockets.bus} {human_sockets.ssh_agent}",
        process={"env": human_sockets.env(), "inheritDefaultEnv": True},
        filesystem={"readonlyPaths": ["/run"]} if grant_run else {},
    )
    result = corral.run(request)
    assert result.exit_code == 0, result.stderr
    assert human_sockets.banner.decode() not in result.stdout
    assert "vars: XDG_RUNTIME_DIR=unset DBUS=unset SSH=unset" in result.stdout
    assert result.stdout.count("refused:") == 2
