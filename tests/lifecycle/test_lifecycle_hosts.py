"""Hostname rules (corral.network.hosts) for long-lived sandboxes: the sandbox's own policy
proxy process lives exactly as long as the sandbox, `corral policy set` swaps its rules for
the next connection, and its decisions reach the owner's audit trail."""

from __future__ import annotations

import functools
import http.server
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from lifecycle_support import needs_lifecycle
from tests.net.http_echo import EchoHandler

from corral.errors import CorralError, ErrorCode

pytestmark = [needs_lifecycle, pytest.mark.timeout(120)]
pytestmark.append(
    pytest.mark.skipif(os.geteuid() != 0, reason="slirp4netns needs /dev/net/tun (root here)")
)

# Run inside the sandbox: one request through the proxy named in the environment.
FETCH = """
import sys, urllib.error, urllib.request
try:
    print(200, urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
except OSError as e:
    print('failed', type(e).__name__)
"""
# Straight to the host's loopback, around the proxy.
DIRECT = """
import socket, sys
try:
    socket.create_connection(('10.0.2.2', int(sys.argv[1])), timeout=2); print('connected')
except OSError as e:
    print('refused', type(e).__name__)
"""


@pytest.fixture
def upstream(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """An HTTP server on the host's loopback, and the started sandboxes' proxies told (tests
    only) that allowed.test and denied.test are there and that loopback may be reached."""
    from corral import net

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    table = {"allowed.test": ["127.0.0.1"], "denied.test": ["127.0.0.1"]}
    options = {"resolve": table, "allowLocal": True}
    attach = functools.partial(net.attach_detached, proxy_options=options)
    monkeypatch.setattr(net, "attach_detached", attach)
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _hosts(allow: str, port: int) -> dict[str, Any]:
    return {"network": {"hosts": {"allow": [{"host": allow, "ports": [port]}]}}}


def _provision(port: int) -> str:
    from corral.lifecycle import api

    request = {"version": "1.0.0", "phase": "provision", "containment": "process",
               "network": {"egress": {"default": "deny"}}, "corral": _hosts("allowed.test", port)}  # fmt: skip
    return api.provision_container(request).container_id


def _in_sandbox(sid: str, script: str, arg: str) -> str:
    from corral.lifecycle import api

    return api.run_in_container(sid, f'python3 -c "{script}" {arg}').stdout.strip()


def _fetch(sid: str, url: str) -> tuple[str, str]:
    status, _, body = _in_sandbox(sid, FETCH, url).partition(" ")
    return status, body


def _proxies(sid: str) -> list[int]:
    """Live policy proxies of this sandbox: named corral-proxy, holding a socket in its dir."""
    from corral.lifecycle import gc, store
    from corral.net.proxy_service import PROCESS_NAME

    box = os.path.join(store.run_dir(), str(os.getuid()), sid.rpartition(":")[2])
    return [pid for pid, _, _ in gc.held_sockets(box, {PROCESS_NAME})]


def _decisions(sid: str) -> list[dict[str, Any]]:
    with open(os.environ["CORRAL_AUDIT_LOG"]) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if r["type"] == "network_decision" and r["sandbox"] == sid]


def test_hostname_rules_and_policy_set(run_dir: str, upstream: int) -> None:
    from corral.lifecycle import api

    sid = _provision(upstream)
    api.start_container(sid)
    # The server is there, but only the proxy leads to it: nftables drops the direct way.
    assert _in_sandbox(sid, DIRECT, str(upstream)).startswith("refused")
    assert _fetch(sid, f"http://allowed.test:{upstream}/x") == ("200", "GET /x")
    status, body = _fetch(sid, f"http://denied.test:{upstream}/y")
    assert status == "403"
    assert "no hosts.allow rule" in json.loads(body)["rule"]

    # Flip the rule: the next connection meets the new one (no restart, same proxy).
    proxy = _proxies(sid)
    rules = api.set_container_network_policy(sid, {
        "network": {"egress": {"default": "deny"}}, "corral": _hosts("denied.test", upstream)
    })  # fmt: skip
    assert any("policy-proxy: allow denied.test" in r for r in rules)
    assert _fetch(sid, f"http://denied.test:{upstream}/y") == ("200", "GET /y")
    assert _fetch(sid, f"http://allowed.test:{upstream}/x")[0] == "403"
    assert _proxies(sid) == proxy

    decided = [(r["data"]["host"], r["decision"]) for r in _decisions(sid) if "host" in r["data"]]
    assert decided == [
        ("allowed.test", "allow"),
        ("denied.test", "deny"),
        ("denied.test", "allow"),
        ("allowed.test", "deny"),
    ]
    api.deprovision_container(sid)


def test_hosts_cannot_be_added_or_removed_while_running(run_dir: str, upstream: int) -> None:
    from corral.lifecycle import api

    sid = _provision(upstream)
    api.start_container(sid)
    without = {"network": {"egress": {"default": "allow"}}, "corral": {"network": {}}}
    with pytest.raises(CorralError) as info:
        api.set_container_network_policy(sid, without)
    assert info.value.code == ErrorCode.POLICY_VALIDATION
    assert "corral.network.hosts" in info.value.message
    api.stop_container(sid)  # a stopped sandbox takes it, for its next start
    api.set_container_network_policy(sid, without)
    api.start_container(sid)
    assert _proxies(sid) == []
    api.deprovision_container(sid)


def test_stop_and_deprovision_end_the_proxy(run_dir: str, upstream: int) -> None:
    from corral.lifecycle import api

    sid = _provision(upstream)
    api.start_container(sid)
    assert len(_proxies(sid)) == 1
    api.stop_container(sid)
    assert _proxies(sid) == []
    api.start_container(sid)  # a new proxy for the new start
    assert len(_proxies(sid)) == 1
    assert _fetch(sid, f"http://allowed.test:{upstream}/again") == ("200", "GET /again")
    api.deprovision_container(sid)
    assert _proxies(sid) == []


def test_gc_ends_the_proxy_of_a_killed_supervisor(run_dir: str, upstream: int) -> None:
    from corral.lifecycle import api, gc, manager

    sid = _provision(upstream)
    api.start_container(sid)
    [proxy] = _proxies(sid)
    # Stopped, it cannot notice its exit pipe closing: only gc can end it now.
    os.kill(proxy, signal.SIGSTOP)
    supervisor = next(s["supervisorPid"] for s in manager.list_sandboxes() if s["sandboxId"] == sid)
    os.kill(supervisor, signal.SIGKILL)
    time.sleep(0.5)
    assert _proxies(sid) == [proxy]  # the supervisor's death alone did not end it
    report = gc.collect()
    assert sid in report["stopped"]
    assert _proxies(sid) == []
    api.deprovision_container(sid)


def test_the_proxy_leaves_with_its_sandbox(run_dir: str, upstream: int) -> None:
    """Without gc: the exit pipe it shares with slirp4netns closes when the supervisor dies."""
    from corral.lifecycle import api, manager

    sid = _provision(upstream)
    api.start_container(sid)
    assert _proxies(sid)
    supervisor = next(s["supervisorPid"] for s in manager.list_sandboxes() if s["sandboxId"] == sid)
    os.kill(supervisor, signal.SIGKILL)
    limit = time.monotonic() + 5
    while _proxies(sid) and time.monotonic() < limit:
        time.sleep(0.05)
    assert _proxies(sid) == [], "the policy proxy outlived its sandbox"
    api.deprovision_container(sid)


# The unprivileged owner, without the service: its own proxy, its own audit trail.
AS_USER = """
import functools, json, os, sys
from corral import net
from corral.lifecycle import api, gc, store
port, fetch = int(sys.argv[1]), sys.argv[2]
options = {"resolve": {"allowed.test": ["127.0.0.1"]}, "allowLocal": True}
net.attach_detached = functools.partial(net.attach_detached, proxy_options=options)
hosts = {"network": {"hosts": {"allow": [{"host": "allowed.test", "ports": [port]}]}}}
sid = api.provision_container({"version": "1.0.0", "phase": "provision", "containment": "process",
    "network":
    {"egress": {"default": "deny"}}, "corral": hosts}).container_id
api.start_container(sid)
box = os.path.join(store.run_dir(), str(os.getuid()), sid.rpartition(":")[2])
proxies = lambda: [p for p, _, _ in gc.held_sockets(box, {"corral-proxy"})]
run = lambda url: api.run_in_container(sid, f'python3 -c "{fetch}" {url}').stdout.split()[0]
out = {"sid": sid, "uids": [os.stat(f"/proc/{p}").st_uid for p in proxies()],
       "allowed": run(f"http://allowed.test:{port}/"), "denied": run(f"http://other.test:{port}/")}
api.deprovision_container(sid)
print(json.dumps({**out, "left": proxies()}))
"""


def test_unprivileged_owner_gets_its_own_proxy_and_audit(upstream: int, user_src: str) -> None:
    import shutil
    import subprocess
    import sys
    import tempfile

    from tests.conftest import ensure_test_user

    user = ensure_test_user()
    base = tempfile.mkdtemp(prefix="corral-hosts-", dir="/var/tmp")
    os.chmod(base, 0o755)
    os.mkdir(os.path.join(base, "corral"), 0o1733)
    os.chmod(os.path.join(base, "corral"), 0o1733)
    trail = os.path.join(user.pw_dir, ".local", "state", "corral", "audit.jsonl")
    try:
        done = subprocess.run(
            ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
             "--reset-env", "env", f"PYTHONPATH={user_src}", f"HOME={user.pw_dir}",
             f"CORRAL_RUN_DIR={base}/corral", "CORRAL_NO_SERVICE=1", "PATH=/usr/bin:/bin",
             sys.executable, "-c", AS_USER, str(upstream), FETCH],
            capture_output=True, text=True, timeout=90, cwd="/",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        assert out["uids"] == [user.pw_uid]  # the owner's process, not root's
        assert (out["allowed"], out["denied"]) == ("200", "403")
        assert out["left"] == []
        with open(trail) as f:
            mine = [json.loads(line) for line in f if out["sid"] in line]
        hosts = [(r["data"].get("host"), r["decision"]) for r in mine if "host" in r["data"]]
        assert hosts == [("allowed.test", "allow"), ("other.test", "deny")]
        assert {r["actor"]["uid"] for r in mine} == {user.pw_uid}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_tls_interception_ca_is_trusted_inside_and_fixed(run_dir: str, upstream: int) -> None:
    from corral.lifecycle import api

    hosts = {"allow": [{"host": "allowed.test", "paths": ["/v1/"]}]}
    corral = {"network": {"tlsInterception": True, "hosts": hosts}}
    request = {"version": "1.0.0", "phase": "provision", "containment": "process",
               "network": {"egress": {"default": "deny"}}, "corral": corral}  # fmt: skip
    sid = api.provision_container(request).container_id
    api.start_container(sid)
    count = "grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/ca-certificates.crt"
    with open("/etc/ssl/certs/ca-certificates.crt") as f:
        system = f.read().count("BEGIN CERTIFICATE")
    inside = api.run_in_container(sid, f"echo $SSL_CERT_FILE; {count}").stdout.split()
    assert inside == ["/etc/ssl/certs/ca-certificates.crt", str(system + 1)]  # + its own CA
    plain = {"network": {"egress": {"default": "deny"}}, "corral": {"network": {"hosts": hosts}}}
    with pytest.raises(CorralError) as info:
        api.set_container_network_policy(sid, plain)
    assert "tlsInterception" in info.value.message
    api.deprovision_container(sid)


def test_through_the_root_service_the_proxy_is_the_owners(service: str) -> None:
    """Root's service starts it for the user: it runs with the user's uid and audits to the
    user's own trail, not to root's environment's ($HOME, $CORRAL_AUDIT_LOG)."""
    from tests.lifecycle.test_users import _as, _ok, _user

    alice = _user("corral-alice")
    request = {"version": "1.0.0", "phase": "provision", "containment": "process",
               "network": {"egress": {"default": "deny"}}, "corral": _hosts("allowed.test", 80)}  # fmt: skip
    sid = _ok(_as(alice, service, "provision", {"request": request}))["sandboxId"]
    _ok(_as(alice, service, "start", {"sandboxId": sid}))
    from corral.lifecycle import gc
    from corral.net.proxy_service import PROCESS_NAME

    box = os.path.join(os.path.dirname(service), str(alice.pw_uid), sid.rpartition(":")[2])
    proxies = [pid for pid, _, _ in gc.held_sockets(box, {PROCESS_NAME})]
    assert [os.stat(f"/proc/{pid}").st_uid for pid in proxies] == [alice.pw_uid]
    trail = os.path.join(alice.pw_dir, ".local", "state", "corral", "audit.jsonl")
    with open(trail) as f:
        assert any(sid in line and "network.attach" in line for line in f)
    _ok(_as(alice, service, "deprovision", {"sandboxId": sid}))
    assert not [pid for pid, _, _ in gc.held_sockets(box, {PROCESS_NAME})]
