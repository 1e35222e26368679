"""Corral's clipboard broker: the only path between the human's clipboard and a sandbox.

The sandbox never reaches the human's display; instead this separate process polls the
CLIPBOARD selection on the side(s) the policy lets it read and copies changes to the other
side, in the allowed direction only:

    read   human -> sandbox   (the agent may read what the human copied)
    write  sandbox -> human   (the agent may set the human's clipboard)
    all    both

It reads the sandbox side only inside the private display's own namespaces, so nothing the
agent does to its files can point it at another display. It ends when its private display does.
Text only, capped at ``MAX_BYTES``.

    python -m corral.ui.broker '<json BrokerConfig>'
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from corral.ui.display import DisplayAddress

Direction = Literal["read", "write", "all"]
MAX_BYTES = 1 << 20
POLL_SECONDS = 0.25
_CLIENT_TIMEOUT = 3.0
_OUT = ["xclip", "-o", "-selection", "clipboard"]
_IN = ["xclip", "-i", "-quiet", "-selection", "clipboard"]


@dataclass(frozen=True)
class HumanDisplay:
    """The human's desktop as the caller names it; clients for it run as ``uid`` when given."""

    display: str
    xauthority: str | None = None
    uid: int | None = None
    gid: int | None = None

    def client_command(self, argv: Sequence[str]) -> list[str]:
        env = ["env", "-i", f"DISPLAY={self.display}"]
        if self.xauthority:
            env.append(f"XAUTHORITY={self.xauthority}")
        prefix: list[str] = []
        if self.uid is not None:
            gid = self.gid if self.gid is not None else self.uid
            prefix = ["setpriv", f"--reuid={self.uid}", f"--regid={gid}", "--clear-groups", "--"]
        return [*prefix, *env, *argv]


@dataclass(frozen=True)
class BrokerConfig:
    human: HumanDisplay
    sandbox: DisplayAddress
    direction: Direction

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> BrokerConfig:
        raw = json.loads(text)
        return cls(HumanDisplay(**raw["human"]), DisplayAddress(**raw["sandbox"]), raw["direction"])


class ClipboardBroker:
    """The running broker process; ``close`` stops it (it also stops with the display)."""

    def __init__(self, config: BrokerConfig) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "corral.ui.broker", config.to_json()],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": _package_root()},
        )  # fmt: skip

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Side:
    """One clipboard: reads it, and owns it (an ``xclip -i`` holder) after a copy into it."""

    def __init__(self, display: DisplayAddress | HumanDisplay) -> None:
        self.display = display
        self.last: bytes | None = None
        self.holder: subprocess.Popen[bytes] | None = None

    def read(self) -> bytes | None:
        try:
            done = subprocess.run(
                self.display.client_command(_OUT), capture_output=True, timeout=_CLIENT_TIMEOUT
            )
        except subprocess.TimeoutExpired:
            return None  # an owner that does not answer is an empty clipboard
        if done.returncode != 0 or len(done.stdout) > MAX_BYTES:
            return None
        return done.stdout

    def write(self, data: bytes) -> None:
        self.release()
        self.holder = subprocess.Popen(
            self.display.client_command(_IN),
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert self.holder.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.holder.stdin.write(data)
        self.holder.stdin.close()
        self.last = data

    def release(self) -> None:
        if self.holder is not None:
            if self.holder.poll() is None:
                self.holder.kill()
            self.holder.wait()
            self.holder = None


def copy_changes(source: _Side, target: _Side) -> None:
    data = source.read()
    if data is None or data == source.last:
        return
    source.last = data
    if data != target.last:
        target.write(data)


def run(config: BrokerConfig) -> int:
    human = _Side(config.human)
    sandbox = _Side(config.sandbox)
    try:
        while _alive(config.sandbox.server_pid):
            if config.direction in ("read", "all"):
                copy_changes(human, sandbox)
            if config.direction in ("write", "all"):
                copy_changes(sandbox, human)
            time.sleep(POLL_SECONDS)
    finally:
        human.release()
        sandbox.release()
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main(argv: Sequence[str]) -> int:
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    return run(BrokerConfig.from_json(argv[1]))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
