"""`corral policy set ID FILE`: new network rules for a provisioned sandbox.

FILE holds ``{"network": {...}}`` (MXC's directional policy) and optionally
``{"corral": {"network": {...}}}``; both replace the provision request's sections, and the
result is validated and planned like a provision request. A running sandbox gets the new table
in one nftables transaction inside its network namespace (entered through its supervisor), so
each new connection meets either the old rules or the new ones; established connections keep
flowing (replies are accepted by connection tracking). Later starts use the new rules.

Hostname rules (``corral.network.hosts``) are enforced by the sandbox's own policy proxy
process (``corral.net.proxy_service``), started with the sandbox and tied to its exit pipe;
this module also gives each exec the proxy's address, and ends the proxy with the sandbox
(stop, deprovision, ``corral gc``), finding it by the control socket it holds.
"""

from __future__ import annotations

import contextlib
import copy
import os
import select
import signal
from collections.abc import Sequence
from typing import Any

from corral.errors import CorralError, ErrorCode, PolicyError
from corral.lifecycle import store
from corral.lifecycle.launch import NETWORK_DIR, is_supervisor_of
from corral.plan import NetworkPlan

PROXY_EXIT_GRACE_S = 2.0

_ALLOWED_KEYS = {"network", "corral", "version", "$schema", "_comment"}


def merged_request(request: dict[str, Any], policy: object) -> dict[str, Any]:
    if not isinstance(policy, dict) or "network" not in policy:
        raise CorralError(
            "a network policy file is a JSON object with a 'network' section",
            code=ErrorCode.MALFORMED_REQUEST,
            remediation='e.g. {"network": {"egress": {"default": "deny"}}}',
        )
    unknown = sorted(set(policy) - _ALLOWED_KEYS)
    if unknown:
        raise CorralError(
            f"a network policy file may not carry {', '.join(unknown)}",
            code=ErrorCode.MALFORMED_REQUEST,
            remediation="only 'network' and 'corral.network' can change on a sandbox",
        )
    raw = copy.deepcopy(request)
    raw["network"] = policy["network"]
    corral = policy.get("corral")
    if corral is not None:
        if not isinstance(corral, dict) or set(corral) - {"network"}:
            raise CorralError(
                "only corral.network can change on a sandbox", code=ErrorCode.MALFORMED_REQUEST
            )
        section = dict(raw.get("corral") or {})
        section["network"] = corral.get("network", {})
        raw["corral"] = section
    return raw


def check_change(old: NetworkPlan, new: NetworkPlan, *, started: bool) -> None:
    """What a running sandbox's link cannot follow: it has none (provisioned deny-all), it is
    confined to a proxy, or its published ports would change."""
    if not started:
        return
    if old.mode == "none" and new.mode != "none":
        raise PolicyError(
            "this sandbox was started without network (deny all), so it has no link to open",
            remediation="stop it, set the policy, and start it again",
        )
    if "proxy" in (old.mode, new.mode) and old.mode != new.mode:
        raise PolicyError(
            "runtimeConfig.networkProxy cannot be added or removed on a running sandbox",
            remediation="stop it, set the policy, and start it again",
        )
    if old.corral.get("publish") != new.corral.get("publish"):
        raise PolicyError(
            "published ports cannot change on a running sandbox",
            remediation="stop it, set the policy, and start it again",
        )
    if ("hosts" in old.corral) != ("hosts" in new.corral):
        raise PolicyError(
            "corral.network.hosts cannot be added or removed on a running sandbox (its policy "
            "proxy is started with it)",
            remediation="stop it, set the policy, and start it again; or keep an empty hosts "
            "section",
        )
    if bool(old.corral.get("tlsInterception")) != bool(new.corral.get("tlsInterception")):
        raise PolicyError(
            "corral.network.tlsInterception cannot change on a running sandbox: its CA is "
            "placed in the sandbox's trust store at start",
            remediation="stop it, set the policy, and start it again",
        )


def install(
    path: str, state: store.SandboxState, network: NetworkPlan, supervisor_uid: int
) -> list[str]:
    """Swap the table (and the policy proxy's rules) in the running sandbox at ``path``;
    returns the rules now enforced."""
    from corral.net import replace_rules_in

    pid = state.supervisor_pid
    alive = pid is not None and store.supervisor_alive(state)
    if pid is None or not alive or not is_supervisor_of(pid, supervisor_uid):
        raise CorralError(
            f"sandbox {state.id} has no running supervisor", code=ErrorCode.NOT_STARTED
        )
    if network.mode == "proxy":
        raise PolicyError("a sandbox confined to runtimeConfig.networkProxy has no rules to swap")
    return replace_rules_in(
        pid, network.spec, network.corral, workdir=os.path.join(path, NETWORK_DIR)
    )


# -- the policy proxy of a started sandbox ----------------------------------------------------
def ca_binds(ca_bundle_path: str | None) -> list[tuple[str, str]]:
    """TLS interception: the sandbox's CA bundle over the system's, in its mount namespace."""
    from corral.backends.process import SYSTEM_CA_BUNDLE

    return [] if ca_bundle_path is None else [(ca_bundle_path, SYSTEM_CA_BUNDLE)]


def exec_environment(path: str, env: dict[str, str]) -> dict[str, str]:
    """An exec's environment in the sandbox at ``path``: with a policy proxy, the proxy as
    the sandbox reaches it (10.0.2.2) in every spelling tools read, and with TLS
    interception the bundle that trusts the sandbox's CA (as a one-shot run gets them)."""
    from corral.net import addresses, proxy_service
    from corral.policy.environment import proxy_environment

    service = proxy_service.find(os.path.join(path, NETWORK_DIR))
    if service is None:
        return env
    inside = f"http://{addresses.HOST_LOOPBACK_V4}:{service.port}"
    env = {**env, **proxy_environment(inside)}
    if service.ca_bundle_path is not None:
        from corral.backends.process import CA_BUNDLE_VARIABLES, SYSTEM_CA_BUNDLE

        env.update(dict.fromkeys(CA_BUNDLE_VARIABLES, SYSTEM_CA_BUNDLE))
    return env


def stop_proxy(path: str, owner_uid: int) -> None:
    """End the policy proxy of the sandbox at ``path`` and wait for it, so stop and
    deprovision leave none. It is found by its name and the control socket it holds there
    (never by a pid from a file its owner can write), run by the owner or by us."""
    from corral.net import proxy_service

    workdir = os.path.join(path, NETWORK_DIR)
    if os.path.exists(os.path.join(workdir, proxy_service.CONTROL_SOCKET)):
        _end_all(_proxies_under(workdir, {owner_uid, os.geteuid()}))


def end_orphaned_proxies(uid: int) -> list[int]:
    """`corral gc`: end every policy proxy (of ``uid``; root: everyone's) whose sandbox is
    not running. Returns their pids."""
    orphans = []
    for pid, start, socket_path in _proxies_under(store.run_dir(), None if uid == 0 else {uid}):
        state = store.load(os.path.dirname(os.path.dirname(socket_path)))
        if state is None or state.phase != "started" or not store.supervisor_alive(state):
            orphans.append((pid, start, socket_path))
    _end_all(orphans)
    return [pid for pid, _, _ in orphans]


def _proxies_under(base: str, uids: set[int] | None) -> list[tuple[int, int, str]]:
    from corral.lifecycle import gc
    from corral.net.proxy_service import PROCESS_NAME

    return [
        (pid, start, socket_path)
        for pid, start, socket_path in gc.held_sockets(base, {PROCESS_NAME})
        if uids is None or gc.process_owner(pid) in uids
    ]


def _end_all(proxies: Sequence[tuple[int, int, str]]) -> None:
    """SIGTERM (it removes its files; SIGCONT wakes a stopped one), SIGKILL after a grace."""
    pidfds = []
    for pid, start, _ in proxies:
        with contextlib.suppress(OSError):
            pidfd = os.pidfd_open(pid)
            if store.process_start_time(pid) != start:  # the pid was reused meanwhile
                os.close(pidfd)
                continue
            pidfds.append(pidfd)
            for signum in (signal.SIGTERM, signal.SIGCONT):
                signal.pidfd_send_signal(pidfd, signum)
    for pidfd in pidfds:
        with contextlib.suppress(OSError):
            if not select.select([pidfd], [], [], PROXY_EXIT_GRACE_S)[0]:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                select.select([pidfd], [], [], PROXY_EXIT_GRACE_S)
        os.close(pidfd)
