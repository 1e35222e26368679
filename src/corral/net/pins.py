"""Names resolved by Corral once and pinned for the sandbox's life, shared by the policy
proxy (which connects only to pinned addresses) and the DNS stub (which answers with them),
so a second, different answer can never redirect an allowed name (no DNS rebinding)."""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable

Resolver = Callable[[str, int], list[str]]


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def not_local(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    return not (ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified)


class PinRefused(Exception):
    def __init__(self, reason: str, rule: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rule = rule


class Pins:
    def __init__(self, resolver: Resolver, address_ok: Callable[[str], bool]) -> None:
        self._resolve = resolver
        self._address_ok = address_ok
        self._pinned: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def addresses(self, host: str, port: int = 0) -> list[str]:
        """The pinned addresses of ``host``, resolving it the first time; raises PinRefused."""
        with self._lock:
            pinned = self._pinned.get(host)
        if pinned is not None:
            return pinned
        try:
            found = self._resolve(host, port)
        except OSError as exc:
            raise PinRefused(f"cannot resolve {host}: {exc}", "dns") from exc
        bad = [a for a in found if not self._address_ok(a)]
        if bad or not found:
            raise PinRefused(f"{host} resolves to refused addresses {bad}", "dns rebinding")
        with self._lock:
            return self._pinned.setdefault(host, found)
