"""The append-only, hash-chained JSON-lines audit log, safe for concurrent writers.

Each line is one record: the event plus ``seq``, ``prev`` (the previous record's hash) and
``hash``. Writers serialise on ``flock`` and read only the tail of the file under the lock,
so appending costs the same on a log of any length.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Protocol

from corral.audit.chain import FIRST_SEQ, GENESIS, canonical
from corral.audit.events import AuditEvent
from corral.errors import CorralError, ErrorCode

ENV_LOG = "CORRAL_AUDIT_LOG"
ROOT_LOG = "/var/log/corral/audit.jsonl"
_TAIL_CHUNK = 4096


def default_log_path() -> str:
    """``$CORRAL_AUDIT_LOG``; else root's system log; else the user's XDG state directory."""
    override = os.environ.get(ENV_LOG)
    if override:
        return override
    if os.geteuid() == 0:
        return ROOT_LOG
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return os.path.join(state, "corral", "audit.jsonl")


class AuditSink(Protocol):
    """Where events go. ``append`` returns the record as written (empty when discarded)."""

    def append(self, event: AuditEvent) -> dict[str, Any]: ...


class NullSink:
    """Discards events: audit turned off (refused by the admin's ``mandatoryAudit``)."""

    def append(self, event: AuditEvent) -> dict[str, Any]:
        return {}


class AuditLog:
    """Appends events to the log at ``path`` (created 0600, parents 0700)."""

    def __init__(self, path: str | None = None) -> None:
        self.path = os.path.abspath(path or default_log_path())
        self._lock = threading.Lock()
        self._fd = -1
        self._owner_pid = -1
        # What the file looked like after our last append: lets us skip re-reading the tail
        # when no other writer has appended since.
        self._known: tuple[int, int, str] | None = None  # (size, seq, hash)

    def append(self, event: AuditEvent) -> dict[str, Any]:
        with self._lock:
            fd = self._open()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                size = os.fstat(fd).st_size
                if self._known is not None and self._known[0] == size:
                    seq, prev = self._known[1] + 1, self._known[2]
                else:
                    seq, prev = self._next_link(fd, size)
                record: dict[str, Any] = {"seq": seq, "prev": prev, **event.to_dict()}
                body = canonical(record)
                record["hash"] = hashlib.sha256(body).hexdigest()
                # The hash covers the canonical form; the line need not be canonical itself,
                # so append the hash to the body instead of serialising twice.
                line = body[:-1] + b',"hash":"' + record["hash"].encode() + b'"}\n'
                written = os.write(fd, line)
                if written != len(line):
                    raise CorralError(
                        f"short write to the audit log {self.path} (disk full?): the last "
                        "record is partial; run `corral audit verify` and free space",
                        code=ErrorCode.BACKEND_ERROR,
                    )
                self._known = (size + written, seq, record["hash"])
                return record
            except OSError as exc:
                raise CorralError(
                    f"cannot append to the audit log {self.path}: {exc.strerror}",
                    code=ErrorCode.BACKEND_ERROR,
                ) from exc
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0 and self._owner_pid == os.getpid():
                os.close(self._fd)
            self._fd, self._known = -1, None

    def __del__(self) -> None:
        # Each request opens its own log (Recorder.open): without this, a long-lived SDK
        # user would leak one descriptor per request.
        if self._fd >= 0 and self._owner_pid == os.getpid():
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> int:
        # A forked child must not share the parent's open file description: flock would then
        # be shared too and no longer exclude the parent.
        if self._fd >= 0 and self._owner_pid == os.getpid():
            return self._fd
        self._known = None
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            self._fd = os.open(
                self.path,
                os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                0o600,
            )
        except OSError as exc:
            raise CorralError(
                f"cannot open the audit log {self.path}: {exc.strerror}; set "
                f"{ENV_LOG} to a writable file",
                code=ErrorCode.BACKEND_ERROR,
            ) from exc
        self._owner_pid = os.getpid()
        return self._fd

    def _next_link(self, fd: int, size: int) -> tuple[int, str]:
        """(seq, prev) for a new record, from the last record of the file."""
        if size == 0:
            return FIRST_SEQ, GENESIS
        last = read_last_line(fd, size)
        try:
            record = json.loads(last)
            seq, digest = record["seq"], record["hash"]
            if not isinstance(seq, int) or not isinstance(digest, str):
                raise TypeError
        except (ValueError, TypeError, KeyError) as exc:
            raise CorralError(
                f"the audit log {self.path} ends with a damaged record; run "
                "`corral audit verify`, then move the file aside to start a new chain",
                code=ErrorCode.BACKEND_ERROR,
            ) from exc
        return seq + 1, digest


def read_last_line(fd: int, size: int) -> bytes:
    """The file's last line (without its newline), reading backwards from the end only.

    A file that does not end with a newline has a partial last record: returned as is, so
    the caller's parse fails and refuses to chain onto it.
    """
    end = size - 1 if os.pread(fd, 1, size - 1) == b"\n" else size
    chunk = _TAIL_CHUNK
    while True:
        start = max(0, end - chunk)
        data = os.pread(fd, end - start, start)
        cut = data.rfind(b"\n")
        if cut >= 0:
            return data[cut + 1 :]
        if start == 0:
            return data
        chunk *= 2
