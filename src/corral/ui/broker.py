"""Corral's clipboard broker: the only path between the human's clipboard and a sandbox's.

The sandbox never reaches the human's display. The broker is two halves (``relay.py``), one a
client of each display, joined by one pipe per direction the policy allows:

    read   human half ──pipe──► sandbox half    (the agent may read what the human copied)
    write  human half ◄──pipe── sandbox half    (the agent may set the human's clipboard)
    all    both pipes

A half holds only the pipe ends of the allowed directions, so a ``read`` broker has no way
from the sandbox to the human at all (and a ``write`` broker no way back), whatever runs in it.

No half runs with root's authority:

* the sandbox half runs as the agent uid, no-new-privs, inside the private display's own mount
  and network namespaces (root enters them, then drops), where that display is the only one
  reachable whatever the agent did to its files;
* the human half runs as the uid the caller names (a long-lived sandbox: its owner), without
  capabilities, with the DISPLAY/XAUTHORITY the caller names. The human's X server thus sees
  the owner's own client: the broker reaches only what that user's xclip could, and never lends
  root's credentials (root's cookie files, root's ``xhost +si:localuser:root``) to a name the
  caller chose.

The halves end with each other (a pipe hangs up), and the sandbox half with the private display
(a pidfd of its server), so the broker never outlives the display it serves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from corral.ui import relay
from corral.ui.display import DisplayAddress

Direction = Literal["read", "write", "all"]
# Run from its source text, not its path: the sandbox half runs in the private display's
# mount namespace, whose private /tmp hides a checkout that lives there.
with open(relay.__file__, encoding="utf-8") as _source:
    _RELAY_SOURCE = _source.read()


@dataclass(frozen=True)
class HumanDisplay:
    """The human's desktop as the caller names it; its clients run as ``uid`` (default: the
    caller's own), without capabilities."""

    display: str
    xauthority: str | None = None
    uid: int | None = None
    gid: int | None = None

    def client_command(self, argv: Sequence[str]) -> list[str]:
        if self.uid is None:
            uid, gid = os.getuid(), os.getgid()
        else:
            uid, gid = self.uid, self.uid if self.gid is None else self.gid
        env = ["env", "-i", f"DISPLAY={self.display}"]
        if self.xauthority:
            env.append(f"XAUTHORITY={self.xauthority}")
        return [
            "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--no-new-privs",
            "--bounding-set=-all", "--inh-caps=-all", "--", *env, *argv,
        ]  # fmt: skip


@dataclass(frozen=True)
class BrokerConfig:
    human: HumanDisplay
    sandbox: DisplayAddress
    direction: Direction


class ClipboardBroker:
    """The two running halves. ``close`` ends them; ``detached`` ones (a long-lived sandbox)
    run in sessions of their own and outlive the caller, to be ended by :attr:`pids`."""

    def __init__(self, config: BrokerConfig, *, detached: bool = False) -> None:
        self.halves: list[subprocess.Popen[bytes]] = []
        human_ends: dict[str, int] = {}
        sandbox_ends: dict[str, int] = {}
        try:
            if config.direction in ("read", "all"):
                sandbox_ends["receive"], human_ends["send"] = os.pipe2(os.O_CLOEXEC)
            if config.direction in ("write", "all"):
                human_ends["receive"], sandbox_ends["send"] = os.pipe2(os.O_CLOEXEC)
            sandbox_ends["display"] = os.pidfd_open(config.sandbox.server_pid)
            for command, ends in (
                (config.human.client_command, human_ends),
                (config.sandbox.client_command, sandbox_ends),
            ):
                self.halves.append(_start_half(command, ends, detached))
        except BaseException:
            self.close()
            raise
        finally:  # the halves hold the only copies: a pipe hangs up when one of them ends
            for fd in (*human_ends.values(), *sandbox_ends.values()):
                os.close(fd)

    @property
    def pids(self) -> list[int]:
        return [half.pid for half in self.halves]

    def close(self) -> None:
        for half in self.halves:
            if half.poll() is None:
                half.kill()
            half.wait()


def _start_half(
    command: Callable[[Sequence[str]], list[str]], ends: dict[str, int], detached: bool
) -> subprocess.Popen[bytes]:
    argv = command([sys.executable, "-I", "-B", "-c", _RELAY_SOURCE, json.dumps(ends)])
    return subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        pass_fds=tuple(ends.values()), env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        start_new_session=detached,
    )  # fmt: skip
