"""Network rules for long-lived sandboxes: nftables in the sandbox's namespace and a
slirp4netns that lives exactly as long as the sandbox's supervisor; `corral policy set`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from lifecycle_support import needs_lifecycle

from corral.errors import CorralError, ErrorCode

pytestmark = [needs_lifecycle, pytest.mark.timeout(90)]
pytestmark.append(
    pytest.mark.skipif(os.geteuid() != 0, reason="slirp4netns needs /dev/net/tun (root here)")
)


@pytest.fixture
def host_server() -> Iterator[int]:
    """A TCP server on the host's loopback only: reachable from a sandbox via 10.0.2.2."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"hello from the host")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


def _provision(host_loopback: str, **extra: object) -> str:
    from corral.lifecycle import api

    # The allow rule (TEST-NET-1, unused) makes it a sandbox with rules, hence with a link.
    egress = {"default": "deny", "allow": [{"to": [{"cidr": "192.0.2.0/24"}]}]}
    network = {"egress": egress, "ingress": {"default": "deny", "hostLoopback": host_loopback}}
    request = {"version": "1.0.0", "phase": "provision", "containment": "process",
               "network": network, **extra}  # fmt: skip
    return api.provision_container(request).container_id


def _reach(sid: str, port: int) -> str:
    from corral.lifecycle import api

    script = (
        "import socket\ntry:\n"
        f"    print(socket.create_connection(('10.0.2.2', {port}), timeout=2).recv(64).decode())\n"
        "except OSError as e:\n    print('refused', type(e).__name__)"
    )
    return api.run_in_container(sid, f'python3 -c "{script}"').stdout.strip()


def _slirps_of(sid: str) -> list[int]:
    """Live slirp4netns processes serving this sandbox (its API socket is in its directory)."""
    from corral.lifecycle import store

    box = os.path.join(store.run_dir(), "0", sid.rpartition(":")[2])
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        ours = argv[0].endswith(b"slirp4netns") and any(box.encode() in a for a in argv)
        if ours and store.process_start_time(int(entry)) is not None:  # not a zombie
            found.append(int(entry))
    return found


def _gone(sid: str, seconds: float = 5.0) -> bool:
    limit = time.monotonic() + seconds
    while _slirps_of(sid):
        if time.monotonic() > limit:
            return False
        time.sleep(0.05)
    return True


def test_host_loopback_follows_the_policy_and_policy_set(run_dir: str, host_server: int) -> None:
    from corral.lifecycle import api

    denied = _provision("deny")
    api.start_container(denied)
    assert _reach(denied, host_server).startswith("refused")  # nftables drops 10.0.2.2
    allowed = _provision("allow")
    api.start_container(allowed)
    assert _reach(allowed, host_server) == "hello from the host"  # the test could fail
    assert len(_slirps_of(allowed)) == 1

    # Flip both at run time: the next connection meets the new rules.
    closed = {"network": {"egress": {"default": "deny"}, "ingress": {"hostLoopback": "deny"}}}
    opened = {"network": {"egress": {"default": "deny"}, "ingress": {"hostLoopback": "allow"}}}
    rules = api.set_container_network_policy(allowed, closed)
    assert any("host" in r for r in rules)
    assert _reach(allowed, host_server).startswith("refused")
    api.set_container_network_policy(denied, opened)
    assert _reach(denied, host_server) == "hello from the host"

    # A restart keeps the rules that were set last.
    api.stop_container(denied)
    assert _gone(denied)
    api.start_container(denied)
    assert _reach(denied, host_server) == "hello from the host"

    for sid in (denied, allowed):
        api.deprovision_container(sid)
        assert _gone(sid), "slirp4netns outlived its sandbox"


def test_the_workload_cannot_change_its_rules(run_dir: str, host_server: int) -> None:
    from corral.lifecycle import api

    sid = _provision("deny")
    api.start_container(sid)
    attack = api.run_in_container(sid, "nft flush ruleset; echo $?")
    assert attack.stdout.strip() != "0" or "not found" in attack.stderr
    assert _reach(sid, host_server).startswith("refused")
    api.deprovision_container(sid)


def test_killed_supervisor_takes_slirp_with_it_and_gc_cleans(run_dir: str) -> None:
    from corral.lifecycle import api, gc, manager

    sid = _provision("allow")
    api.start_container(sid)
    assert _slirps_of(sid)
    supervisor = next(s["supervisorPid"] for s in manager.list_sandboxes() if s["sandboxId"] == sid)
    os.kill(supervisor, signal.SIGKILL)
    assert _gone(sid), "slirp4netns survived a SIGKILLed supervisor"
    report = gc.collect()
    assert sid in report["stopped"]
    api.start_container(sid)  # the owner may start it again, with its network
    assert _slirps_of(sid)
    api.deprovision_container(sid)
    assert _gone(sid)


def test_policy_set_refusals(run_dir: str) -> None:
    from corral.lifecycle import api

    closed = api.provision_container(
        {"version": "1.0.0", "phase": "provision", "containment": "process"}
    ).container_id
    api.start_container(closed)  # deny all: no link at all
    with pytest.raises(CorralError) as info:
        api.set_container_network_policy(closed, {"network": {"egress": {"default": "allow"}}})
    assert info.value.code == ErrorCode.POLICY_VALIDATION
    with pytest.raises(CorralError) as info:
        api.set_container_network_policy(closed, {"process": {"commandLine": "x"}})
    assert info.value.code == ErrorCode.MALFORMED_REQUEST
    api.stop_container(closed)  # a stopped sandbox takes any valid policy for its next start
    api.set_container_network_policy(closed, {"network": {"egress": {"default": "allow"}}})


def test_policy_set_from_the_command_line(run_dir: str, host_server: int, tmp_path: object) -> None:
    from corral.lifecycle import api

    sid = _provision("deny")
    api.start_container(sid)
    policy = os.path.join(str(tmp_path), "open.json")
    with open(policy, "w") as f:
        json.dump({"network": {"ingress": {"hostLoopback": "allow"}}}, f)
    done = subprocess.run(
        [sys.executable, "-m", "corral", "policy", "set", sid, policy],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert _reach(sid, host_server) == "hello from the host"
    api.deprovision_container(sid)
