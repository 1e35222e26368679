"""Reused daemon threads for the policy proxy's connections and tunnels.

Starting a Python thread costs 0.15-0.35 ms on a 2-core VM (measured), handing a call to a
thread already waiting ≈ 10 µs; a proxied connection needs two (its requests, then the
second direction of its tunnel), so reusing them is most of the proxy's per-connection
cost. Unbounded like one thread per connection: a tunnel holds its thread for its life.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

IDLE_S = 60.0  # a thread idle this long exits


class Workers:
    """Runs each submitted call on a waiting thread, or on a new one when none waits."""

    def __init__(self, name: str, idle_s: float = IDLE_S) -> None:
        self._name = name
        self._idle_s = idle_s
        self._calls: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting = 0  # threads waiting for a call that no submit has claimed yet
        self._closed = False

    def submit(self, call: Callable[[], None]) -> None:
        with self._lock:
            claimed = self._waiting > 0
            self._waiting -= claimed
        if not claimed:  # started first: a call is never queued for a thread that failed to start
            threading.Thread(target=self._run, name=self._name, daemon=True).start()
        self._calls.put(call)

    def close(self) -> None:
        """Waiting threads exit now, busy ones when their call returns."""
        with self._lock:
            self._closed = True
            waiting, self._waiting = self._waiting, 0
        for _ in range(waiting):
            self._calls.put(None)

    def _run(self) -> None:
        while True:
            try:
                call = self._calls.get(timeout=self._idle_s)
            except queue.Empty:
                with self._lock:
                    if self._waiting == 0:
                        continue  # every waiting thread, this one too, was claimed: a call comes
                    self._waiting -= 1
                return
            if call is None:
                return
            try:
                call()
            except Exception as exc:  # reported as an uncaught error in a thread would be
                args = (type(exc), exc, exc.__traceback__, threading.current_thread())
                threading.excepthook(threading.ExceptHookArgs(args))
            del call  # drop its sockets now, not when the next call arrives
            with self._lock:
                if self._closed:
                    return
                self._waiting += 1
