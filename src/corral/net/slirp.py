"""slirp4netns: user-mode networking from a sandbox's network namespace to the host.

Chosen over pasta on measurements on this host (see docs/network.md): ready in ~5 ms
against 60-74 ms for pasta, fixed addresses that do not copy the host's network into the
sandbox, host ports published at run time through its API socket, and a lifetime tied to
an exit pipe, so it dies with the process that started it, even on SIGKILL.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field

from corral.contract.model import PublishSpec
from corral.errors import BackendUnavailableError, CorralError, ErrorCode
from corral.net import addresses, nsexec

READY_TIMEOUT_S = 5.0


def binary() -> str:
    path = shutil.which("slirp4netns")
    if path is None:
        raise BackendUnavailableError(
            "user-mode networking needs slirp4netns, which is not installed",
            remediation="apt-get install slirp4netns",
        )
    return path


@dataclass
class SlirpNetwork:
    """A running slirp4netns attached to one sandbox; ``close`` stops it and removes its files."""

    process: subprocess.Popen[bytes]
    exit_w: int
    workdir: str
    published: list[PublishSpec] = field(default_factory=list)

    @property
    def api_socket(self) -> str:
        return os.path.join(self.workdir, "api.sock")

    def publish(self, spec: PublishSpec) -> None:
        """Forward 127.0.0.1:host_port on the host to the sandbox's port."""
        reply = self._api(
            {
                "execute": "add_hostfwd",
                "arguments": {
                    "proto": spec.protocol,
                    "host_addr": "127.0.0.1",
                    "host_port": spec.host_port,
                    "guest_port": spec.sandbox_port,
                },
            }
        )
        error = reply.get("error")
        if error is not None:
            raise CorralError(
                f"cannot publish host port {spec.host_port}/{spec.protocol}: "
                f"{error.get('desc', error) if isinstance(error, dict) else error}",
                code=ErrorCode.BACKEND_ERROR,
                remediation="choose a host port that is free",
            )
        self.published.append(spec)

    def close(self) -> None:
        if self.exit_w >= 0:
            os.close(self.exit_w)  # slirp4netns exits when this pipe closes
            self.exit_w = -1
        else:
            self.process.kill()  # another process holds the exit pipe: stop it directly
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _api(self, request: dict[str, object]) -> dict[str, object]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(READY_TIMEOUT_S)
            sock.connect(self.api_socket)
            sock.sendall(json.dumps(request).encode())
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        reply: dict[str, object] = json.loads(data or b"{}")
        return reply


def start(
    pid: int,
    *,
    host_loopback: bool,
    ipv6: bool = True,
    exit_fd: int | None = None,
    workdir: str | None = None,
) -> SlirpNetwork:
    """Connect the network namespace of ``pid`` to the host; return once its tap is up.

    ``exit_fd``: the read end of a pipe whose write end another process holds (a long-lived
    sandbox's supervisor): slirp4netns then lives exactly as long as that process, and the
    returned network's ``close`` only stops it early. ``workdir``: where its API socket and
    log go (created 0700; default a fresh temporary directory)."""
    argv = [binary(), "--configure", "--mtu=65520", "--enable-seccomp"]
    if os.geteuid() == 0:
        # Its sandbox needs uid 0 inside the user namespace, which unprivileged sandboxes
        # (caller's uid mapped to itself) do not have.
        argv.append("--enable-sandbox")
    ipv6 = ipv6 and os.path.isdir("/proc/sys/net/ipv6")  # a kernel booted with ipv6.disable=1
    if ipv6:
        argv.append("--enable-ipv6")
    if not host_loopback:
        argv.append("--disable-host-loopback")
    if os.stat(f"/proc/{pid}/ns/user").st_ino != os.stat("/proc/self/ns/user").st_ino:
        argv.append(f"--userns-path=/proc/{pid}/ns/user")
    if workdir is None:
        workdir = tempfile.mkdtemp(prefix="corral-slirp-")
    else:
        os.mkdir(workdir, 0o700)
    if exit_fd is None:
        exit_r, exit_w = os.pipe()
    else:
        exit_r, exit_w = exit_fd, -1
    ready_r, ready_w = os.pipe()
    argv += [
        f"--exit-fd={exit_r}",
        f"--ready-fd={ready_w}",
        f"--api-socket={os.path.join(workdir, 'api.sock')}",
        "--netns-type=path",
        f"/proc/{pid}/ns/net",
        addresses.TAP_NAME,
    ]
    log = open(os.path.join(workdir, "slirp.log"), "wb")  # noqa: SIM115 - closed below
    try:
        process = subprocess.Popen(
            argv,
            pass_fds=(exit_r, ready_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
    except OSError as exc:
        log.close()
        for fd in (exit_r, exit_w, ready_r, ready_w):
            if fd >= 0 and fd != exit_fd:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)
        raise CorralError(f"cannot start slirp4netns: {exc}", code=ErrorCode.BACKEND_ERROR) from exc
    log.close()
    if exit_fd is None:
        os.close(exit_r)
    os.close(ready_w)
    net = SlirpNetwork(process, exit_w, workdir)
    try:
        ready, _, _ = select.select([ready_r], [], [], READY_TIMEOUT_S)
        if not ready or not os.read(ready_r, 1):
            err = _tail(os.path.join(workdir, "slirp.log"))
            net.close()
            raise CorralError(
                f"slirp4netns did not come up for sandbox process {pid}: {err.strip()}",
                code=ErrorCode.BACKEND_ERROR,
                remediation="check that /dev/net/tun is usable (scripts/setup.sh opens it up)",
            )
    finally:
        os.close(ready_r)
    if ipv6:
        try:
            nsexec.run_in_netns(pid, _configure_ipv6)
        except BaseException:
            net.close()
            raise
    return net


def _configure_ipv6() -> None:
    """Inside the sandbox's network namespace: a fixed address and default route, now.

    slirp4netns only sends router advertisements; SLAAC plus duplicate address detection
    takes seconds and races the workload. The address is marked ``nodad`` (slirp is the
    only other host on the link) and advertisements are ignored, so nothing changes later."""
    with open(f"/proc/sys/net/ipv6/conf/{addresses.TAP_NAME}/accept_ra", "w") as f:
        f.write("0")
    index = socket.if_nametoindex(addresses.TAP_NAME)
    guest = socket.inet_pton(socket.AF_INET6, addresses.GUEST_V6)
    gateway = socket.inet_pton(socket.AF_INET6, addresses.HOST_LOOPBACK_V6)
    ifaddrmsg = struct.pack(
        "=BBBBI", socket.AF_INET6, addresses.PREFIX_LEN_V6, _IFA_F_NODAD, 0, index
    )
    _rtnetlink(_RTM_NEWADDR, ifaddrmsg + _attr(_IFA_LOCAL, guest) + _attr(_IFA_ADDRESS, guest))
    rtmsg = struct.pack(
        "=BBBBBBBBI", socket.AF_INET6, 0, 0, 0, _RT_TABLE_MAIN, _RTPROT_STATIC, 0, _RTN_UNICAST, 0
    )
    oif = struct.pack("=i", index)
    _rtnetlink(_RTM_NEWROUTE, rtmsg + _attr(_RTA_GATEWAY, gateway) + _attr(_RTA_OIF, oif))


# rtnetlink(7) constants from <linux/rtnetlink.h> and <linux/if_addr.h>.
_RTM_NEWADDR, _RTM_NEWROUTE = 20, 24
_IFA_ADDRESS, _IFA_LOCAL, _IFA_F_NODAD = 1, 2, 0x02
_RTA_OIF, _RTA_GATEWAY = 4, 5
_RT_TABLE_MAIN, _RTPROT_STATIC, _RTN_UNICAST = 254, 4, 1
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_EXCL, _NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
_NLMSG_ERROR = 2


def _attr(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, kind) + data + b"\0" * (-length % 4)


def _rtnetlink(msg_type: int, body: bytes) -> None:
    """Send one create request and raise the kernel's error, if any (without pyroute2, whose
    import alone costs ~200 ms per sandbox)."""
    flags = _NLM_F_REQUEST | _NLM_F_ACK | _NLM_F_CREATE | _NLM_F_EXCL
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(READY_TIMEOUT_S)
        sock.send(struct.pack("=IHHII", 16 + len(body), msg_type, flags, 1, 0) + body)
        reply = sock.recv(65536)
    _, reply_type, _, _, _, error = struct.unpack_from("=IHHIIi", reply)
    if reply_type != _NLMSG_ERROR:
        raise OSError(f"rtnetlink {msg_type}: unexpected reply type {reply_type}")
    if error != 0:
        raise OSError(-error, f"rtnetlink {msg_type}: {os.strerror(-error)}")


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read()[-400:].decode(errors="replace")
    except OSError:
        return ""
