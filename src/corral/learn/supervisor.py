"""The caller's side of the observer: a thread that receives the sandbox's listener, writes
down every notified syscall and lets each one continue."""

from __future__ import annotations

import array
import json
import os
import select
import socket
import threading
from typing import Any

from corral.learn import notify
from corral.learn.observe import Access, Decoder

MAX_DISTINCT_ACCESSES = 200_000  # bounds the caller's memory, whatever the workload does


class Supervisor:
    """Started before the sandbox, joined after it exited. Never leaves a syscall waiting:
    whatever decoding does, the paused call is answered."""

    def __init__(self) -> None:
        self.parent, self.child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.accesses: dict[Access, None] = {}  # distinct, in the order first seen
        self.truncated = False
        self.report: dict[str, Any] = {}
        self.attached = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="corral-learn", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def sandbox_started(self) -> None:
        """The backend forked the sandbox: only it may hold the child end now, so a sandbox
        that dies before attaching ends the thread with EOF."""
        self.child.close()

    def join(self, timeout: float) -> bool:
        """Wait for the observer to see the last process go; False if it did not in time."""
        self._thread.join(timeout)
        self.parent.close()
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            listener = self._receive_listener()
            if listener is None:
                return
            self.attached = True
            try:
                self._serve(listener)
            finally:
                os.close(listener)
        except BaseException as exc:  # reported by the caller; the thread must end quietly
            self.error = exc

    def _record(self, found: list[Access]) -> None:
        for access in found:
            if len(self.accesses) >= MAX_DISTINCT_ACCESSES:
                self.truncated = True
                return
            self.accesses.setdefault(access)

    def _receive_listener(self) -> int | None:
        fds = array.array("i")
        data, ancdata, _flags, _addr = self.parent.recvmsg(4096, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if not fds:
            return None
        self.report = json.loads(data or b"{}")
        return fds[0]

    def _serve(self, listener: int) -> None:
        decoder = Decoder()
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        while True:
            events = poller.poll()
            if any(mask & (select.POLLHUP | select.POLLERR) for _fd, mask in events):
                return  # every process under the filter has exited
            n = notify.receive(listener)
            if n is None:
                continue
            try:
                found = decoder.decode(n)
                if notify.still_pending(listener, n.id):
                    self._record(found)
            finally:
                notify.let_continue(listener, n.id)
