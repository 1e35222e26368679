"""The host side of the guest agent's framing (see guest/agent.c): type byte, 4-byte
big-endian length, payload."""

from __future__ import annotations

import socket
import struct
from collections.abc import Mapping, Sequence

from corral.errors import CorralError

HEADER = struct.Struct(">cI")

READY = b"H"
MOUNT = b"M"
MOUNTED = b"A"
EXEC = b"X"
EXEC_TTY = b"T"  # exec on a guest terminal: rows, columns (2-byte big-endian), then X's payload
RESIZE = b"W"  # the guest terminal's new rows, columns
STDIN = b"I"
SIGNAL = b"S"
KILL = b"K"
ENTROPY = b"N"
STDOUT = b"O"
STDERR = b"R"
EXITED = b"Q"
ERROR = b"E"


class AgentGone(CorralError):
    """The guest agent's channel closed (the VM died or was shut down)."""


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def read_frame(sock: socket.socket) -> tuple[bytes, bytes]:
    kind, length = HEADER.unpack(_read_exactly(sock, HEADER.size))
    return kind, _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    chunks: list[bytes] = []
    while n:
        chunk = sock.recv(min(n, 1 << 16))
        if not chunk:
            raise AgentGone("the micro-VM's agent channel closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def mount_payload(options: str, tmpfs_paths: Sequence[str]) -> bytes:
    return b"".join(s.encode() + b"\0" for s in (options, *tmpfs_paths))


def window(rows: int, columns: int) -> bytes:
    return struct.pack(">HH", rows, columns)


def exec_payload(cwd: str, argv: Sequence[str], env: Mapping[str, str]) -> bytes:
    fields = [cwd, str(len(argv)), *argv, *(f"{k}={v}" for k, v in env.items())]
    if any("\0" in f for f in fields):
        raise CorralError("the command, cwd or environment contains a NUL byte")
    return b"".join(f.encode() + b"\0" for f in fields)
