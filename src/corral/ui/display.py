"""A private X display for one sandbox (``ui.disable: false``), never the human's.

Xvfb runs as the agent identity in a mount and network namespace of its own: a private /tmp
holds its lock file, and its /tmp/.X11-unix is a bind of a Corral-owned directory, so its only
listening socket is a filesystem socket in that directory (no TCP, and its abstract socket lives
in a network namespace nobody else shares). It accepts only clients holding its
MIT-MAGIC-COOKIE, written for the agent alone.

    <state>/                  root:<agent gid> 0750 (the agent cannot rename what is inside)
        .X11-unix/X0          the socket (the sandbox sees this directory as /tmp/.X11-unix)
        Xauthority            the cookie, agent-owned 0400
"""

from __future__ import annotations

import os
import secrets
import select
import shutil
import struct
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

from corral.errors import BackendUnavailableError, CorralError, ErrorCode

DISPLAY_NUMBER = 0  # inside its own namespaces every display may be :0
SCREEN = "1280x800x24"
_FAMILY_WILD = 65535  # matches the client's hostname, whatever the sandbox calls itself


def client_env(state_dir: str) -> dict[str, str]:
    """The variables a client inside the sandbox needs for the display kept in ``state_dir``."""
    return {"DISPLAY": f":{DISPLAY_NUMBER}", "XAUTHORITY": os.path.join(state_dir, "Xauthority")}


@dataclass(frozen=True)
class DisplayAddress:
    """How Corral reaches a private display from the host: plain data, so the clipboard
    broker (a separate process) can be handed it."""

    state_dir: str
    uid: int
    gid: int
    server_pid: int

    @property
    def socket_dir(self) -> str:
        return os.path.join(self.state_dir, ".X11-unix")

    @property
    def xauthority(self) -> str:
        return os.path.join(self.state_dir, "Xauthority")

    @property
    def display(self) -> str:
        return f":{DISPLAY_NUMBER}"

    def client_env(self) -> dict[str, str]:
        return client_env(self.state_dir)

    def client_command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run as the agent inside the display's own namespaces, where the private
        display is the only one reachable whatever the agent did to its files."""
        return [
            "nsenter", f"--target={self.server_pid}", "--mount", "--net", "--",
            "setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
            "--no-new-privs", "--", "env", "-i", f"DISPLAY={self.display}",
            f"XAUTHORITY={self.xauthority}", *argv,
        ]  # fmt: skip


@dataclass
class PrivateDisplay:
    address: DisplayAddress
    server: subprocess.Popen[bytes]
    announce_r: int  # Xvfb's -displayfd; kept open, Xvfb dies if a later write to it fails

    def let_go(self) -> None:
        """Leave a detached server running (its owner stops it by pid); drop our handles."""
        if self.announce_r >= 0:
            os.close(self.announce_r)
            self.announce_r = -1

    def close(self) -> None:
        if self.server.poll() is None:
            self.server.kill()
        self.server.wait()
        if self.announce_r >= 0:
            os.close(self.announce_r)
            self.announce_r = -1
        shutil.rmtree(self.address.state_dir, ignore_errors=True)


def start_private_display(
    state_dir: str, uid: int, gid: int, *, timeout: float = 10.0, detached: bool = False
) -> PrivateDisplay:
    """Start Xvfb for ``uid`` with its socket and cookie under ``state_dir``, made afresh here
    (a leftover of a crashed run is removed); its parent must not be writable by ``uid``.
    ``detached``: it outlives the caller (own session, holds its own -displayfd reader, logs
    to an unnamed file rather than a pipe the caller's exit would break)."""
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        raise BackendUnavailableError(
            "ui.disable=false needs a private X server, and Xvfb is not installed",
            remediation="apt-get install xvfb",
        )
    shutil.rmtree(state_dir, ignore_errors=True)
    os.mkdir(state_dir, 0o750)
    os.chown(state_dir, 0, gid)
    sockets = os.path.join(state_dir, ".X11-unix")
    os.mkdir(sockets, 0o700)
    os.chown(sockets, uid, gid)
    cookie_file = os.path.join(state_dir, "Xauthority")
    _write_cookie(cookie_file, secrets.token_bytes(16), uid, gid)
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    log = os.memfd_create("xvfb-log", os.MFD_CLOEXEC) if detached else -1
    script = (
        'mount -t tmpfs -o mode=1777,size=1m tmpfs /tmp && mkdir /tmp/.X11-unix && '
        'mount --bind "$1" /tmp/.X11-unix && shift && exec "$@"'
    )  # fmt: skip
    server_argv = [
        "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--no-new-privs", "--",
        # -noreset: the display keeps its state when the last client leaves.
        xvfb, f":{DISPLAY_NUMBER}", "-nolisten", "tcp", "-noreset", "-auth", cookie_file,
        "-screen", "0", SCREEN, "-displayfd", str(ready_w),
    ]  # fmt: skip
    try:
        server = subprocess.Popen(
            ["unshare", "--mount", "--net", "--propagation", "private", "--",
             "/bin/sh", "-c", script, "sh", sockets, *server_argv],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log if detached else subprocess.PIPE,
            pass_fds=(ready_w, ready_r) if detached else (ready_w,),
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, start_new_session=detached,
        )  # fmt: skip
    finally:
        os.close(ready_w)
    display = PrivateDisplay(DisplayAddress(state_dir, uid, gid, server.pid), server, ready_r)
    try:
        _wait_ready(ready_r, server, timeout, log)
    except BaseException:
        display.close()
        raise
    finally:
        if log >= 0:
            os.close(log)  # Xvfb keeps its own descriptor of it
    return display


def _wait_ready(ready_r: int, server: subprocess.Popen[bytes], timeout: float, log: int) -> None:
    """``log``: the file a detached server writes its errors to (else -1: a pipe)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        readable, _, _ = select.select([ready_r], [], [], deadline - time.monotonic())
        if readable and os.read(ready_r, 64).strip():
            return
        if readable:  # EOF: the server died before it was ready
            break
    server.kill()
    _, err = server.communicate()
    if log >= 0:
        err = os.pread(log, 1 << 16, 0)
    raise CorralError(
        "the sandbox's private X server did not start: "
        + (err.decode(errors="replace").strip()[-500:] or "timed out"),
        code=ErrorCode.BACKEND_ERROR,
    )


def _write_cookie(path: str, cookie: bytes, uid: int, gid: int) -> None:
    """An Xauthority file with one MIT-MAGIC-COOKIE-1 entry for the display, any host."""

    def counted(data: bytes) -> bytes:
        return struct.pack(">H", len(data)) + data

    entry = struct.pack(">H", _FAMILY_WILD) + counted(b"") + counted(str(DISPLAY_NUMBER).encode())
    entry += counted(b"MIT-MAGIC-COOKIE-1") + counted(cookie)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o400)
    try:
        os.write(fd, entry)
        os.fchown(fd, uid, gid)
    finally:
        os.close(fd)
