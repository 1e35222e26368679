"""``runtimeConfig.networkProxy``: MXC accepts an http(s) URL on localhost with an explicit port.

MXC parses with the WHATWG URL rules (Rust's ``url`` crate), so ``HTTP://127.1:3128`` is
``http://127.0.0.1:3128`` and a scheme's default port counts as no port; this module
follows those rules for the parts that decide acceptance.
"""

from __future__ import annotations

_DEFAULT_PORTS = {"http": 80, "https": 443}
_LOOPBACK_V4 = 0x7F000001


def proxy_url_problem(url: str) -> str | None:
    """Why ``url`` is not an acceptable proxy URL, or None when it is."""
    text = url.strip("\x00\x01\x02\x03\x04\x05\x06\x07\x08\t\n\x0b\x0c\r\x0e\x0f"
                     "\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a\x1b\x1c\x1d\x1e\x1f ")  # fmt: skip
    scheme, colon, rest = text.partition(":")
    if not colon or not scheme or not scheme[0].isalpha() or not _is_scheme(scheme):
        return "is invalid: relative URL without a base; write it as http://localhost:PORT"
    scheme = scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        return f"must use the 'http' or 'https' scheme (got '{scheme}'): {url}"
    authority = rest.lstrip("/\\")
    for stop in "/\\?#":
        authority = authority.split(stop, 1)[0]
    host_port = authority.rpartition("@")[2]
    if host_port.startswith("["):
        host, _, after = host_port[1:].partition("]")
        port_text = after[1:] if after.startswith(":") else None
        is_local = _is_ipv6_loopback(host)
    else:
        host, sep, port_text_raw = host_port.partition(":")
        port_text = port_text_raw if sep else None
        is_local = host.lower() == "localhost" or _ipv4_value(host) == _LOOPBACK_V4
    if not host:
        return "is invalid: empty host; write it as http://localhost:PORT"
    port: int | None = None
    if port_text:
        if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
            return "is invalid: invalid port number"
        port = int(port_text)
    if not is_local:
        return "must use localhost, 127.0.0.1, or [::1]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"must include a port (e.g., http://localhost:8080), got: {url}"
    return None


def _is_scheme(scheme: str) -> bool:
    return all(c.isascii() and (c.isalnum() or c in "+-.") for c in scheme)


def _is_ipv6_loopback(host: str) -> bool:
    import ipaddress  # rarely needed: keep it off the import path

    try:
        return ipaddress.IPv6Address(host) == ipaddress.IPv6Address("::1")
    except ValueError:
        return False


def _ipv4_value(host: str) -> int | None:
    """The WHATWG IPv4 number of ``host`` (``127.1``, ``0x7f.0.0.1``), None if not one."""
    parts = host.split(".")
    if parts and parts[-1] == "":
        parts.pop()
    if not parts or len(parts) > 4:
        return None
    numbers: list[int] = []
    for part in parts:
        base = 10
        if part[:2].lower() == "0x":
            part, base = part[2:], 16
        elif len(part) > 1 and part.startswith("0"):
            part, base = part[1:], 8
        digits = "0123456789abcdefABCDEF"[: 22 if base == 16 else base]
        if not all(c in digits for c in part):
            return None
        numbers.append(int(part, base) if part else 0)
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        return None
    value = last
    for index, number in enumerate(head):
        value += number << (8 * (3 - index))
    return value
