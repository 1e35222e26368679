"""Helpers for session-sandbox tests: the human's desktop and session sockets, baseline
attackers, and request builders."""

from __future__ import annotations

import pwd
import subprocess
import time
from dataclasses import dataclass
from typing import Any

NOBODY = pwd.getpwnam("nobody")
HUMAN_GEOMETRY = "1111x777"


@dataclass(frozen=True)
class HumanDesktop:
    number: int
    server: subprocess.Popen[bytes]

    @property
    def display(self) -> str:
        return f":{self.number}"

    @property
    def socket(self) -> str:
        return f"/tmp/.X11-unix/X{self.number}"

    def xclip(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["xclip", "-display", self.display, "-selection", "clipboard", *args],
            input=input, capture_output=True, timeout=5,
        )  # fmt: skip

    def set_clipboard(self, text: str) -> subprocess.Popen[bytes]:
        holder = subprocess.Popen(
            ["xclip", "-display", self.display, "-selection", "clipboard", "-i", "-quiet"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert holder.stdin is not None
        holder.stdin.write(text.encode())
        holder.stdin.close()
        wait_for(lambda: self.clipboard() == text, "the human's clipboard to be set")
        return holder

    def clipboard(self) -> str:
        return self.xclip("-o").stdout.decode(errors="replace")


def wait_for(condition: Any, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass(frozen=True)
class HumanSockets:
    runtime_dir: str
    bus: str
    ssh_agent: str
    banner: bytes = b"human-session-secret"

    def env(self) -> list[str]:
        return [
            f"XDG_RUNTIME_DIR={self.runtime_dir}",
            f"DBUS_SESSION_BUS_ADDRESS=unix:path={self.bus}",
            f"SSH_AUTH_SOCK={self.ssh_agent}",
        ]


def as_nobody(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """A normal, unsandboxed process of another user (the baseline every attack first wins)."""
    command = [
        "setpriv",
        f"--reuid={NOBODY.pw_uid}",
        f"--regid={NOBODY.pw_gid}",
        "--clear-groups",
        *argv,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=15, **kwargs)


# isolation_session requires an explicit network section; Corral enforces a closed one too.
CLOSED_NETWORK = {
    "egress": {"default": "deny"},
    "ingress": {"default": "deny", "hostLoopback": "deny"},
}


def session_request(command: str, **extra: Any) -> dict[str, Any]:
    return {
        "version": "1.0.0",
        "containment": "isolation_session",
        "network": CLOSED_NETWORK,
        "process": {"commandLine": command, "timeout": 30000, **extra.pop("process", {})},
        **extra,
    }
