"""The record stream Corral's Python side hands to the native launcher (``launch.c``).

One record: a tag byte, the payload's length as a little-endian u32, the payload; a payload's
fields are separated by NUL bytes. The same encoding carries a long-lived sandbox's exec
requests over its control socket.
"""

from __future__ import annotations

import struct

Field = str | bytes | int


def record(tag: str, *fields: Field) -> bytes:
    parts = [f if isinstance(f, bytes) else str(f).encode() for f in fields]
    for part in parts[:-1]:
        if b"\0" in part:
            raise ValueError(f"a launch record field cannot contain NUL: {part!r}")
    payload = b"\0".join(parts)
    return tag.encode() + struct.pack("<I", len(payload)) + payload


def exec_request(
    command: list[str], env: dict[str, str], cwd: str, *, timeout_ms: int, pty: bool
) -> bytes:
    """One exec in a started sandbox (caller -> the sandbox's init)."""
    out = [record("A", arg) for arg in command]
    out += [record("E", f"{key}={value}") for key, value in env.items()]
    out.append(record("C", cwd))
    if timeout_ms > 0:
        out.append(record("t", timeout_ms))
    if pty:
        out.append(record("p"))
    return b"".join(out)


KILL = record("k")  # caller -> init: kill the workload of this connection


def decode(data: bytes) -> list[tuple[str, list[str]]]:
    """Records back into (tag, fields) (the Python launcher's sync message, a VM's exec
    requests). ValueError (or UnicodeDecodeError) when ``data`` is not a record stream."""
    out = []
    at = 0
    while at < len(data):
        if len(data) - at < 5:
            raise ValueError("truncated record header")
        (length,) = struct.unpack_from("<I", data, at + 1)
        if len(data) - at - 5 < length:
            raise ValueError("truncated record")
        payload = data[at + 5 : at + 5 + length]
        out.append((chr(data[at]), payload.decode().split("\0")))
        at += 5 + length
    return out
