"""One half of the clipboard broker: an unprivileged client of one display (see broker.py).

    python3 -I -B relay.py '{"send": FD|null, "receive": FD|null, "display": PIDFD|null}'

It uses the display its environment names (DISPLAY, XAUTHORITY) through xclip. ``send``: the
write end of a pipe to the other half; changes of this display's CLIPBOARD go there.
``receive``: the read end of a pipe from the other half; what arrives becomes this display's
CLIPBOARD. A half holds only the pipe ends its allowed direction needs, so the kernel, not this
code, keeps the other direction closed. It ends when the other half does (its pipe hangs up) or
when ``display`` (a pidfd of the private display's server) exits.

Standard library only, run isolated (-I), so it imports nothing its environment could choose.
Text only, capped at ``MAX_BYTES``.
"""

from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
import time

MAX_BYTES = 1 << 20
POLL_SECONDS = 0.25
_CLIENT_TIMEOUT = 3.0
_PATH = "/usr/bin:/bin"
_OUT = ["xclip", "-o", "-selection", "clipboard"]
_IN = ["xclip", "-i", "-quiet", "-selection", "clipboard"]
_HEADER = struct.Struct(">I")  # each copy travels as its length, then its bytes


class Clipboard:
    """This display's CLIPBOARD: read by polling, owned (an ``xclip -i`` holder) after a copy
    into it. ``last`` is the value last seen or set here, so a copy is never echoed back."""

    def __init__(self) -> None:
        self.last: bytes | None = None
        self.holder: subprocess.Popen[bytes] | None = None

    def changed(self) -> bytes | None:
        data = _read_clipboard()
        if data is None or data == self.last:
            return None
        self.last = data
        return data

    def write(self, data: bytes) -> None:
        self.release()
        self.holder = subprocess.Popen(
            _IN, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        assert self.holder.stdin is not None
        try:
            self.holder.stdin.write(data)
            self.holder.stdin.close()
        except BrokenPipeError:
            pass
        self.last = data

    def release(self) -> None:
        if self.holder is not None:
            if self.holder.poll() is None:
                self.holder.kill()
            self.holder.wait()
            self.holder = None


def _read_clipboard() -> bytes | None:
    """The selection's text, or None (no owner, an owner that does not answer, too large).
    Read in bounded pieces: the other display's owner may offer any amount."""
    deadline = time.monotonic() + _CLIENT_TIMEOUT
    with subprocess.Popen(
        _OUT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    ) as proc:
        assert proc.stdout is not None
        data = b""
        try:
            while len(data) <= MAX_BYTES:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                    return None
                chunk = os.read(proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    return data if proc.wait(timeout=max(0.0, left)) == 0 else None
                data += chunk
            return None
        except subprocess.TimeoutExpired:
            return None
        finally:
            if proc.poll() is None:
                proc.kill()


class Outbox:
    """Copies waiting for the pipe, written without blocking: two halves sending to each other
    at once never wait on each other."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self.pending = b""

    def put(self, data: bytes) -> None:
        self.pending += _HEADER.pack(len(data)) + data

    def flush(self) -> None:
        try:
            written = os.write(self.fd, self.pending)
        except BlockingIOError:
            return
        self.pending = self.pending[written:]


class Inbox:
    """Copies arriving from the pipe, in whatever pieces they come."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""

    def pull(self) -> list[bytes] | None:
        """The copies complete so far; None once the other half is gone or broke the framing."""
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            return None
        self.buffer += chunk
        copies = []
        while len(self.buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self.buffer)
            if size > MAX_BYTES:
                return None
            if len(self.buffer) < _HEADER.size + size:
                break
            copies.append(self.buffer[_HEADER.size : _HEADER.size + size])
            self.buffer = self.buffer[_HEADER.size + size :]
        return copies


def run(send: int | None, receive: int | None, display: int | None) -> int:
    clipboard = Clipboard()
    outbox = Outbox(send) if send is not None else None
    inbox = Inbox(receive) if receive is not None else None
    try:
        while True:
            if outbox is not None and not outbox.pending:
                data = clipboard.changed()
                if data is not None:
                    outbox.put(data)
            poller = select.poll()
            if outbox is not None:  # POLLERR arrives unasked once the reader is gone
                poller.register(outbox.fd, select.POLLOUT if outbox.pending else 0)
            if inbox is not None:
                poller.register(inbox.fd, select.POLLIN)
            if display is not None:
                poller.register(display, select.POLLIN)
            for fd, events in poller.poll(POLL_SECONDS * 1000):
                if fd == display or events & (select.POLLERR | select.POLLNVAL):
                    return 0
                if outbox is not None and fd == outbox.fd:
                    outbox.flush()
                elif inbox is not None and fd == inbox.fd:
                    copies = inbox.pull()
                    if copies is None:
                        return 0
                    if copies:
                        clipboard.write(copies[-1])  # only the newest matters
    finally:
        clipboard.release()


def main(argv: list[str]) -> int:
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    os.environ["PATH"] = _PATH
    ends = json.loads(argv[1])
    return run(ends.get("send"), ends.get("receive"), ends.get("display"))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
