"""A test peer run inside a network namespace: `serve PORT...` (TCP answers "ok", UDP echoes)
or `tcp|udp HOST PORT` (exit 0 when the peer answered, 1 when the traffic did not flow)."""

from __future__ import annotations

import socket
import sys
import threading


def serve(ports: list[int]) -> None:
    for port in ports:
        tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        tcp.bind(("::", port))
        tcp.listen(64)
        threading.Thread(target=_tcp_loop, args=(tcp,), daemon=True).start()
        udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        udp.bind(("::", port))
        threading.Thread(target=_udp_loop, args=(udp,), daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes our stdin


def _tcp_loop(sock: socket.socket) -> None:
    while True:
        conn, _ = sock.accept()
        with conn:
            conn.sendall(b"ok\n")


def _udp_loop(sock: socket.socket) -> None:
    while True:
        data, addr = sock.recvfrom(2048)
        sock.sendto(b"ok:" + data, addr)


def probe(proto: str, host: str, port: int) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family, kind) as sock:
        sock.settimeout(1.5)
        try:
            sock.connect((host, port))
            if proto == "udp":
                sock.send(b"ping")
            return 0 if sock.recv(64).startswith(b"ok") else 1
        except OSError as exc:
            print(f"{proto} {host} {port}: {exc}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve([int(p) for p in sys.argv[2:]])
    else:
        sys.exit(probe(sys.argv[1], sys.argv[2], int(sys.argv[3])))
