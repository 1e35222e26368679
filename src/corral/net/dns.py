"""Corral's DNS stub for a sandbox with ``corral.network.hosts`` rules (UDP and TCP).

It listens on the host's loopback; the sandbox's nftables table DNATs every port-53 query
(to slirp's forwarder 10.0.2.3 or any other resolver) to it through slirp's host-loopback
address 10.0.2.2, so no query leaves unanswered by Corral. Names that no allow rule names
get REFUSED; allowed names get the addresses pinned for the proxy (A and AAAA), NXDOMAIN
when they do not resolve, and an empty answer for other record types.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from corral.errors import CorralError, ErrorCode
from corral.net.pins import PinRefused, Pins

TTL_S = 300  # the answer never changes for the sandbox's life: pinned
TCP_TIMEOUT_S = 10.0
BIND_ATTEMPTS = 20
_ADDRESS_TYPES = {dns.rdatatype.A: socket.AF_INET, dns.rdatatype.AAAA: socket.AF_INET6}


class DnsStub:
    def __init__(
        self,
        allowed: Callable[[str], bool],
        pins: Pins,
        *,
        audit: Callable[[dict[str, Any]], None] | None = None,
        listen: str = "127.0.0.1",
    ) -> None:
        self._allowed = allowed
        self._pins = pins
        self._audit = audit
        self._udp, self._tcp = _bind_pair(listen)
        self.port: int = self._udp.getsockname()[1]  # the same number for UDP and TCP
        self._threads: list[threading.Thread] = []
        self._stopped = False

    def start(self) -> None:
        for target in (self._udp_loop, self._tcp_loop):
            thread = threading.Thread(target=target, name="corral-dns", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stopped = True
        for sock in (self._udp, self._tcp):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(timeout=2)

    def answer(self, wire: bytes) -> bytes | None:
        """The reply to one query in wire format; None when it is not a DNS query."""
        try:
            query = dns.message.from_wire(wire)
        except (dns.exception.DNSException, ValueError):
            return None
        if query.flags & dns.flags.QR:
            return None
        reply = dns.message.make_response(query)
        reply.flags &= ~dns.flags.RA
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            reply.set_rcode(dns.rcode.REFUSED)
            return reply.to_wire()
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        reply.set_rcode(self._fill(reply, question, name))
        return reply.to_wire()

    def _fill(
        self, reply: dns.message.Message, question: dns.rrset.RRset, name: str
    ) -> dns.rcode.Rcode:
        if not self._allowed(name):
            self._record(name, "deny", "no hosts.allow rule names it")
            return dns.rcode.REFUSED
        try:
            found = self._pins.addresses(name)
        except PinRefused as refusal:
            self._record(name, "deny", refusal.reason)
            return dns.rcode.NXDOMAIN if refusal.rule == "dns" else dns.rcode.REFUSED
        family = _ADDRESS_TYPES.get(question.rdtype)
        if question.rdclass == dns.rdataclass.IN and family is not None:
            wanted = [a for a in found if (":" in a) == (family == socket.AF_INET6)]
            if wanted:
                reply.answer.append(
                    dns.rrset.from_text_list(question.name, TTL_S, "IN", question.rdtype, wanted)
                )
        self._record(name, "allow", f"pinned {found}")
        return dns.rcode.NOERROR

    def _record(self, name: str, decision: str, detail: str) -> None:
        if self._audit is not None:
            self._audit(
                {"event": "network.dns", "name": name, "decision": decision, "detail": detail}
            )

    def _udp_loop(self) -> None:
        while not self._stopped:
            try:
                wire, peer = self._udp.recvfrom(4096)
            except OSError:
                return
            reply = self.answer(wire)
            if reply is not None:
                with contextlib.suppress(OSError):
                    self._udp.sendto(reply, peer)

    def _tcp_loop(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self._tcp.accept()
            except OSError:
                return
            threading.Thread(target=self._tcp_serve, args=(conn,), daemon=True).start()

    def _tcp_serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError, struct.error):
            conn.settimeout(TCP_TIMEOUT_S)
            while (head := _recv_exact(conn, 2)) is not None:
                wire = _recv_exact(conn, struct.unpack("!H", head)[0])
                reply = None if wire is None else self.answer(wire)
                if reply is None:
                    return
                conn.sendall(struct.pack("!H", len(reply)) + reply)


def _bind_pair(listen: str) -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket on one port number (the DNAT rule names one port)."""
    for _ in range(BIND_ATTEMPTS):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((listen, 0))
        try:
            return udp, socket.create_server((listen, udp.getsockname()[1]))
        except OSError:
            udp.close()  # that number is taken for TCP: try another
    raise CorralError(
        f"cannot find a free UDP+TCP port pair on {listen} for the DNS stub",
        code=ErrorCode.BACKEND_ERROR,
    )


def _recv_exact(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data
