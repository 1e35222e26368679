"""Fixtures for session-sandbox tests: a real X server standing in for the human's desktop,
and human session sockets (D-Bus-like, ssh-agent) under a fake XDG_RUNTIME_DIR."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from tests.session.support import HUMAN_GEOMETRY, HumanDesktop, HumanSockets, wait_for

if os.geteuid() != 0:
    pytest.skip("session sandboxes need root", allow_module_level=True)


def _free_display() -> int:
    """A display number with no lock file, no socket file and no abstract socket (an X server
    in another mount namespace still owns its abstract name in this network namespace)."""
    with open("/proc/net/unix") as f:
        abstract = f.read()
    for number in range(40, 200):
        paths = (f"/tmp/.X{number}-lock", f"/tmp/.X11-unix/X{number}")
        if not any(map(os.path.exists, paths)) and f"@/tmp/.X11-unix/X{number}\n" not in abstract:
            return number
    raise RuntimeError("no free X display number")


@pytest.fixture(scope="module")
def human() -> Iterator[HumanDesktop]:
    """The human's desktop: Xvfb without authentication (the common case that makes the
    abstract socket dangerous), listening on /tmp/.X11-unix/XN and @/tmp/.X11-unix/XN."""
    number = _free_display()
    ready_r, ready_w = os.pipe()
    server = subprocess.Popen(
        ["Xvfb", f":{number}", "-nolisten", "tcp", "-noreset", "-screen", "0", f"{HUMAN_GEOMETRY}x24",
         "-displayfd", str(ready_w)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(ready_w,),
    )  # fmt: skip
    os.close(ready_w)
    try:
        # Xvfb may write -displayfd again later; the pipe stays open while it runs.
        readable, _, _ = select.select([ready_r], [], [], 10)
        announced = os.read(ready_r, 16) if readable else b""
        assert announced.strip() == str(number).encode(), "the human's Xvfb did not start"
        desktop = HumanDesktop(number, server)
        wait_for(lambda: os.path.exists(desktop.socket), "the human's X socket")
        yield desktop
    finally:
        server.terminate()  # not SIGKILL: Xvfb removes its lock file and socket itself
        server.wait(timeout=10)
        os.close(ready_r)


@pytest.fixture
def human_sockets() -> Iterator[HumanSockets]:
    """A D-Bus-like bus and an ssh-agent-like socket (socat, world-connectable so that only
    the sandbox stands in the way) in a fake XDG_RUNTIME_DIR under /run/user."""
    created_run_user = not os.path.isdir("/run/user")
    runtime = f"/run/user/{4000 + os.getpid() % 1000}"
    os.makedirs(runtime, mode=0o755)
    servers = []
    sockets = HumanSockets(runtime, f"{runtime}/bus", f"{runtime}/ssh-agent.sock")
    for path in (sockets.bus, sockets.ssh_agent):
        servers.append(
            subprocess.Popen(
                [
                    "socat",
                    f"UNIX-LISTEN:{path},fork,mode=666",
                    f"SYSTEM:echo {sockets.banner.decode()}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    try:
        for path in (sockets.bus, sockets.ssh_agent):
            wait_for(lambda p=path: os.path.exists(p), f"socat on {path}")
        yield sockets
    finally:
        for server in servers:
            server.kill()
            server.wait()
        shutil.rmtree(runtime, ignore_errors=True)
        if created_run_user:
            shutil.rmtree("/run/user", ignore_errors=True)
