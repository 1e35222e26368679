"""The kernel audit netlink interface: status, enabling, and reading records as they are made.

Reading uses the multicast group ``AUDIT_NLGRP_READLOG`` (needs CAP_AUDIT_READ): any number of
readers may listen beside an audit daemon, and the kernel never waits for them (a reader whose
socket buffer is full loses records and is told so with ENOBUFS). Status and enabling go
through a unicast request (CAP_AUDIT_CONTROL); a user message (CAP_AUDIT_WRITE) travels the
same queue as the kernel's own records, so its arrival proves every earlier record has been
delivered.

A record is the text the kernel formats, ``audit(SECONDS.MILLIS:SERIAL): key=value ...``;
records of one event share the serial. Strings the kernel calls untrusted (paths, ``comm``,
``exe``) are quoted when printable and hex-encoded otherwise.
"""

from __future__ import annotations

import errno
import os
import re
import select
import socket
import struct
from dataclasses import dataclass, field

NETLINK_AUDIT = 9
AUDIT_NLGRP_READLOG = 1
AUDIT_GET = 1000
AUDIT_SET = 1001
AUDIT_TRUSTED_APP = 1121  # a free-text user message; the barrier
AUDIT_SYSCALL = 1300
AUDIT_EOE = 1320  # end of a multi-record event
AUDIT_SECCOMP = 1326
AUDIT_LANDLOCK_ACCESS = 1423
AUDIT_LANDLOCK_DOMAIN = 1424

_AUDIT_STATUS_ENABLED = 0x0001
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, port id
_STATUS = struct.Struct("=8I")  # the start of struct audit_status, stable since 2.6
_RECEIVE_BUFFER = 4 << 20  # bursts of denials fit; beyond it the kernel drops and says ENOBUFS
_UNTRUSTED = frozenset({"path", "comm", "exe", "name", "ocomm", "proctitle"})
_STAMP = re.compile(r"audit\((\d+)\.(\d+):(\d+)\):\s*")
_FIELD = re.compile(r'(\w[\w-]*)=("[^"]*"|\S*)')


@dataclass(frozen=True)
class AuditStatus:
    enabled: int  # 0 off, 1 on, 2 on and locked until reboot
    failure: int
    daemon_pid: int  # the registered audit daemon (auditd), 0 when none
    rate_limit: int
    backlog_limit: int
    lost: int
    backlog: int


@dataclass(frozen=True)
class AuditRecord:
    type: int
    serial: int
    time: float  # seconds since the epoch, millisecond resolution
    fields: dict[str, str] = field(default_factory=dict)

    def number(self, key: str) -> int | None:
        """A decimal field as an int (None when absent or not a number)."""
        try:
            return int(self.fields[key])
        except (KeyError, ValueError):
            return None


def parse_record(type_: int, text: str) -> AuditRecord | None:
    """One record's text as the kernel formats it; None for text without an audit stamp."""
    stamp = _STAMP.match(text)
    if stamp is None:
        return None
    seconds, millis, serial = stamp.groups()
    fields = {key: _decode(key, value) for key, value in _FIELD.findall(text, stamp.end())}
    return AuditRecord(type_, int(serial), int(seconds) + int(millis) / 1000, fields)


def _decode(key: str, value: str) -> str:
    if value.startswith('"') and value.endswith('"') and len(value) >= 2:
        return value[1:-1]
    if key in _UNTRUSTED and value and len(value) % 2 == 0:
        try:
            return bytes.fromhex(value).decode(errors="replace")
        except ValueError:
            return value
    return value


def _request(sock: socket.socket, type_: int, payload: bytes, flags: int = _NLM_F_ACK) -> None:
    header = _HEADER.pack(_HEADER.size + len(payload), type_, _NLM_F_REQUEST | flags, 1, 0)
    sock.sendto(header + payload, (0, 0))


def _messages(data: bytes) -> list[tuple[int, bytes]]:
    """The (type, payload) of each netlink message in one datagram."""
    out, offset = [], 0
    while offset + _HEADER.size <= len(data):
        length, type_, _, _, _ = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size:
            break
        out.append((type_, data[offset + _HEADER.size : offset + length]))
        offset += (length + 3) & ~3
    return out


def _command(type_: int, payload: bytes, reply_type: int | None = None) -> bytes | None:
    """Send one request to the kernel; the payload of its ``reply_type`` answer, if asked.
    Raises OSError with the kernel's errno (EPERM without the capability)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_AUDIT) as sock:
        sock.settimeout(2.0)
        sock.bind((0, 0))
        _request(sock, type_, payload)
        while True:
            for got, body in _messages(sock.recv(65536)):
                if got == _NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body)[0]
                    if code:
                        raise OSError(code, os.strerror(code))
                    if reply_type is None:
                        return None
                elif got == reply_type:
                    return body


def get_status() -> AuditStatus:
    """The kernel's audit status (needs CAP_AUDIT_CONTROL)."""
    body = _command(AUDIT_GET, b"", reply_type=AUDIT_GET) or b""
    _, enabled, failure, pid, rate, backlog_limit, lost, backlog = _STATUS.unpack_from(
        body.ljust(_STATUS.size, b"\0")
    )
    return AuditStatus(enabled, failure, pid, rate, backlog_limit, lost, backlog)


def set_enabled(enabled: bool) -> None:
    """Turn kernel auditing on or off, host-wide (needs CAP_AUDIT_CONTROL)."""
    # The kernel reads as much of struct audit_status as is sent and only the fields in mask.
    _command(AUDIT_SET, _STATUS.pack(_AUDIT_STATUS_ENABLED, int(enabled), 0, 0, 0, 0, 0, 0))


def send_user_message(text: str) -> None:
    """Queue a free-text user record behind every record already made (CAP_AUDIT_WRITE)."""
    _command(AUDIT_TRUSTED_APP, text.encode() + b"\0")


class RecordReader:
    """A subscription to every audit record the kernel makes from now on (CAP_AUDIT_READ)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_AUDIT)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER)
            self._sock.bind((0, 1 << (AUDIT_NLGRP_READLOG - 1)))
        except OSError:
            self._sock.close()
            raise
        self._sock.setblocking(False)
        self.lost = 0  # overruns of the receive buffer: records the kernel could not deliver

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self, timeout: float) -> list[AuditRecord]:
        """The records available within ``timeout`` seconds (none when it passes first)."""
        if not select.select([self._sock], [], [], timeout)[0]:
            return []
        records: list[AuditRecord] = []
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return records
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.lost += 1
                continue
            for type_, body in _messages(data):
                record = parse_record(type_, body.rstrip(b"\0").decode(errors="replace"))
                if record is not None:
                    records.append(record)

    def close(self) -> None:
        self._sock.close()
