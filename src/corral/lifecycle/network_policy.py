"""`corral policy set ID FILE`: new network rules for a provisioned sandbox.

FILE holds ``{"network": {...}}`` (MXC's directional policy) and optionally
``{"corral": {"network": {...}}}``; both replace the provision request's sections, and the
result is validated and planned like a provision request. A running sandbox gets the new table
in one nftables transaction inside its network namespace (entered through its supervisor), so
each new connection meets either the old rules or the new ones; established connections keep
flowing (replies are accepted by connection tracking). Later starts use the new rules.
"""

from __future__ import annotations

import copy
from typing import Any

from corral.errors import CorralError, ErrorCode, PolicyError
from corral.lifecycle import store
from corral.lifecycle.launch import is_supervisor_of
from corral.plan import NetworkPlan

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


def install(state: store.SandboxState, network: NetworkPlan, supervisor_uid: int) -> list[str]:
    """Swap the table in the running sandbox; returns the rules now enforced."""
    from corral.net import replace_rules_in

    pid = state.supervisor_pid
    alive = pid is not None and store.supervisor_alive(state)
    if pid is None or not alive or not is_supervisor_of(pid, supervisor_uid):
        raise CorralError(
            f"sandbox {state.id} has no running supervisor", code=ErrorCode.NOT_STARTED
        )
    if network.mode == "proxy":
        raise PolicyError("a sandbox confined to runtimeConfig.networkProxy has no rules to swap")
    return replace_rules_in(pid, network.spec, network.corral)
