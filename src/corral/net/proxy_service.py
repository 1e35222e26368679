"""The policy proxy of a long-lived sandbox, as a process of its own.

A one-shot sandbox's :class:`PolicyProxy` is a thread of the process that waits for it. A
long-lived sandbox outlives whoever starts it, so :func:`start` runs the same proxy (and its
DNS stub) as ``python -m corral.net.proxy_service`` (a fresh interpreter: the starter may
have threads, which a plain fork would copy in an unknown state), detached:

- it lives as long as the sandbox: it exits when the sandbox's exit pipe (the one
  slirp4netns watches; the supervisor and its init hold the write end) reaches end of file,
  and on SIGTERM; it holds its control socket ``proxy.sock`` in the sandbox's network
  directory under the name ``corral-proxy``, which is how stop and ``corral gc`` find it
  (never by a pid from a file its owner can write);
- its decisions go to the audit log the starter names, tagged with the sandbox's id;
- :func:`replace_rules` sends new ``corral.network`` rules through that control socket (0600,
  peer credentials checked); the answer comes after the swap, so the next connection meets
  the new rules.

The starter passes its settings on stdin (never a file another process could edit), and
reads one JSON line on the ready pipe: the ports, or the error that stopped the proxy.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from corral.audit.events import Actor
from corral.audit.log import AuditLog
from corral.audit.recorder import Recorder
from corral.contract.extensions import build_corral_section
from corral.contract.model import CorralNetworkSpec
from corral.errors import CorralError, ErrorCode, PolicyError

PROCESS_NAME = "corral-proxy"  # /proc/PID/comm: `corral gc` recognises the proxy by it
CONTROL_SOCKET = "proxy.sock"
RECORD = "proxy.json"  # ports and CA bundle, for the sandbox's exec environment
LOG = "proxy.log"
READY_TIMEOUT_S = 10.0  # a fresh interpreter importing the proxy: ~0.2 s here
_MAX_MESSAGE = 1 << 20
_PR_SET_NAME = 15


@dataclass(frozen=True)
class ProxyService:
    """A running detached policy proxy, as its starter and its sandbox's users see it."""

    pid: int
    port: int
    dns_port: int
    ca_bundle_path: str | None
    rules: tuple[str, ...]  # what it enforces, one line per rule (for ``describe``)

    def describe(self) -> list[str]:
        return list(self.rules)

    def stop(self) -> None:
        """Stop it early (its starter failed after starting it): it exits on SIGTERM."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)


def start(
    corral_network: dict[str, Any],
    *,
    exit_fd: int,
    workdir: str,
    sandbox: str | None,
    audit_log: str | None,
    pid: int,
    options: dict[str, Any] | None = None,
) -> ProxyService:
    """Run the proxy for the sandbox whose network namespace ``pid`` is in. ``exit_fd`` is
    the read end of the sandbox's exit pipe; ``workdir`` (existing, private) receives its
    control socket, record and log. ``options`` are for tests only: ``resolve`` (a static
    name → addresses table instead of the system resolver) and ``allowLocal`` (let names
    resolve to loopback, where a test's server listens)."""
    settings = {
        "network": corral_network,
        "sandbox": sandbox,
        "auditLog": audit_log,
        "pid": pid,
        "workdir": workdir,
        "options": options or {},
    }
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    log = os.open(os.path.join(workdir, LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        launcher = subprocess.Popen(
            [sys.executable, "-m", __name__, str(exit_fd), str(ready_w)],
            pass_fds=(exit_fd, ready_w),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=_environment(),
            cwd="/",
            start_new_session=True,
        )
    except OSError as exc:
        os.close(ready_r)
        raise CorralError(
            f"cannot start the policy proxy: {exc}", code=ErrorCode.BACKEND_ERROR
        ) from exc
    finally:
        os.close(ready_w)
        os.close(log)
    try:
        assert launcher.stdin is not None
        with launcher.stdin:
            launcher.stdin.write(json.dumps(settings).encode())
        launcher.wait(timeout=READY_TIMEOUT_S)  # it forks the proxy off and exits
        reply = _read_line(ready_r, READY_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
        launcher.kill()
        launcher.wait()
        raise _failed(workdir, str(exc)) from exc
    finally:
        os.close(ready_r)
    if "error" in reply:
        raise _failed(workdir, str(reply["error"]))
    service = ProxyService(
        reply["pid"], reply["port"], reply["dnsPort"], reply["caBundle"], tuple(reply["rules"])
    )
    _write_record(workdir, service)
    return service


def find(workdir: str) -> ProxyService | None:
    """The proxy a sandbox's network directory records (None: it has none)."""
    try:
        with open(os.path.join(workdir, RECORD), "rb") as f:
            data = json.load(f)
        return ProxyService(
            data["pid"], data["port"], data["dnsPort"], data["caBundle"], tuple(data["rules"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def replace_rules(workdir: str, corral_network: dict[str, Any]) -> list[str]:
    """Swap the proxy's rules; returns what it now enforces. Raises when it is not running."""
    path = os.path.join(workdir, CONTROL_SOCKET)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(READY_TIMEOUT_S)
            sock.connect(path)
            sock.send(json.dumps({"network": corral_network}).encode())
            reply = json.loads(sock.recv(_MAX_MESSAGE) or b"{}")
    except (OSError, ValueError) as exc:
        raise CorralError(
            f"the sandbox's policy proxy does not answer at {path}: {exc}",
            code=ErrorCode.BACKEND_ERROR,
            remediation="stop and start the sandbox",
        ) from exc
    if "error" in reply:
        raise PolicyError(str(reply["error"]))
    rules: list[str] = reply["rules"]
    return rules


def _environment() -> dict[str, str]:
    """A clean environment that imports this very Corral (the starter's may be a copy)."""
    import corral

    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(corral.__file__)))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": package_parent}
    if "TMPDIR" in os.environ:  # where the interception CA's bundle goes
        env["TMPDIR"] = os.environ["TMPDIR"]
    return env


def _read_line(fd: int, timeout: float) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        if not select.select([fd], [], [], timeout)[0]:
            raise OSError("the policy proxy did not get ready in time")
        chunk = os.read(fd, 65536)
        if not chunk:
            raise OSError("the policy proxy exited before it was ready")
        data += chunk
    reply: dict[str, Any] = json.loads(data)
    return reply


def _failed(workdir: str, why: str) -> CorralError:
    tail = ""
    with contextlib.suppress(OSError), open(os.path.join(workdir, LOG), "rb") as f:
        tail = f.read()[-400:].decode(errors="replace").strip()
    return CorralError(
        f"the sandbox's policy proxy did not start: {why}" + (f" ({tail})" if tail else ""),
        code=ErrorCode.BACKEND_ERROR,
        remediation=f"see {os.path.join(workdir, LOG)}",
    )


def _write_record(workdir: str, service: ProxyService) -> None:
    record = {
        "pid": service.pid,
        "port": service.port,
        "dnsPort": service.dns_port,
        "caBundle": service.ca_bundle_path,
        "rules": list(service.rules),
    }
    fd = os.open(
        os.path.join(workdir, RECORD),
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
    )
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)


# -- the proxy process ------------------------------------------------------------------------
def _corral_spec(corral_network: dict[str, Any]) -> CorralNetworkSpec:
    return build_corral_section({"network": corral_network}).network


def _proxy_arguments(options: dict[str, Any]) -> dict[str, Any]:
    args: dict[str, Any] = {}
    if "resolve" in options:
        table: dict[str, list[str]] = options["resolve"]

        def resolve(host: str, port: int) -> list[str]:
            if host not in table:
                raise socket.gaierror(socket.EAI_NONAME, f"{host} is not in the test table")
            return table[host]

        args["resolver"] = resolve
    if options.get("allowLocal"):
        args["address_ok"] = lambda address: True
    return args


def _audit(settings: dict[str, Any]) -> Callable[[dict[str, Any]], None] | None:
    if not settings["auditLog"]:
        return None
    recorder = Recorder(AuditLog(settings["auditLog"]), Actor.from_process(), settings["sandbox"])
    sandbox_pid = settings["pid"]
    return lambda event: recorder.network_decision({"area": "network", "pid": sandbox_pid, **event})


class _Service:
    """The proxy, its control socket, and the exit-pipe watch that ends them."""

    def __init__(self, settings: dict[str, Any]) -> None:
        from corral.net.policy_proxy import PolicyProxy

        self._corral = _corral_spec(settings["network"])
        audit = _audit(settings)
        self.proxy = PolicyProxy(self._corral, audit=audit, **_proxy_arguments(settings["options"]))
        self._control_path = os.path.join(settings["workdir"], CONTROL_SOCKET)
        self._control = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            self._control.bind(self._control_path)
        finally:
            os.umask(old_umask)
        self._control.listen(8)
        self.proxy.start()
        if audit is not None:
            audit({"event": "network.attach", "mode": "rules", "rules": self.proxy.describe()})

    def ready(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "port": self.proxy.port,
            "dnsPort": self.proxy.dns_port,
            "caBundle": self.proxy.ca_bundle_path,
            "rules": self.proxy.describe(),
        }

    def serve_control(self) -> None:
        while True:
            try:
                conn, _ = self._control.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(READY_TIMEOUT_S)
                with contextlib.suppress(OSError):
                    conn.send(json.dumps(self._answer(conn)).encode())

    def _answer(self, conn: socket.socket) -> dict[str, Any]:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        if struct.unpack("3i", creds)[1] not in (0, os.getuid()):
            return {"error": "only the sandbox's owner may change its rules"}
        try:
            corral = _corral_spec(json.loads(conn.recv(_MAX_MESSAGE))["network"])
        except (ValueError, KeyError, TypeError, CorralError) as exc:
            return {"error": f"bad rules: {exc}"}
        if not corral.hosts_given or corral.tls_interception != self._corral.tls_interception:
            return {"error": "hosts and tlsInterception are fixed while the sandbox runs"}
        self.proxy.replace_rules(corral)
        self._corral = corral
        return {"rules": self.proxy.describe()}

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self._control_path)
        self._control.close()
        self.proxy.stop()


def _main(argv: list[str]) -> int:
    exit_fd, ready_fd = int(argv[0]), int(argv[1])
    settings = json.load(sys.stdin)
    if os.fork() != 0:
        os._exit(0)  # the starter reaps this parent now; the proxy is nobody's child
    ctypes.CDLL(None).prctl(_PR_SET_NAME, PROCESS_NAME.encode(), 0, 0, 0)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        service = _Service(settings)
    except Exception as exc:  # reported to the starter, which raises a CorralError
        os.write(ready_fd, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode() + b"\n")
        return 1
    try:
        os.write(ready_fd, json.dumps(service.ready()).encode() + b"\n")
        os.close(ready_fd)
        threading.Thread(target=service.serve_control, name="control", daemon=True).start()
        while os.read(exit_fd, 1):  # nobody writes: returns b"" once the sandbox is gone
            pass
    finally:
        service.close()
    return 0


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
