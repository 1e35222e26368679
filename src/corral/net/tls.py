"""Read the server name (SNI) from the first bytes of a TLS ClientHello, without decrypting."""

from __future__ import annotations

import struct

_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_SERVER_NAME = 0x0000


def client_hello_sni(data: bytes) -> str | None:
    """None when ``data`` is not TLS; the SNI host name; "" when TLS names no readable host
    (incomplete or malformed hello, or no SNI): the caller refuses that, failing closed."""
    if not data or data[0] != _HANDSHAKE:
        return None
    try:
        return _parse(data) or ""
    except (IndexError, struct.error, UnicodeDecodeError):
        return ""


def _parse(data: bytes) -> str | None:
    (record_len,) = struct.unpack_from("!H", data, 3)
    hello = data[5 : 5 + record_len]
    if len(hello) < record_len or hello[0] != _CLIENT_HELLO:
        return None
    pos = 4 + 2 + 32  # handshake header, version, random
    pos += 1 + hello[pos]  # session id
    (n,) = struct.unpack_from("!H", hello, pos)
    pos += 2 + n  # cipher suites
    pos += 1 + hello[pos]  # compression methods
    (ext_total,) = struct.unpack_from("!H", hello, pos)
    pos += 2
    end = pos + ext_total
    while pos + 4 <= end:
        ext_type, ext_len = struct.unpack_from("!HH", hello, pos)
        pos += 4
        if ext_type == _SERVER_NAME:
            # server_name_list length, then (type=0 host_name, length, name)
            name_type = hello[pos + 2]
            (name_len,) = struct.unpack_from("!H", hello, pos + 3)
            if name_type == 0:
                return hello[pos + 5 : pos + 5 + name_len].decode("ascii")
        pos += ext_len
    return None
