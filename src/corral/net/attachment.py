"""Attach a sandbox's network namespace to its policy: nftables rules, user-mode networking,
published ports and Corral's policy proxy, all owned by one :class:`NetworkAttachment`."""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from typing import Any

from corral.contract.extensions import build_corral_section
from corral.contract.model import CorralNetworkSpec, NetworkSpec
from corral.errors import CorralError, ErrorCode, PolicyError
from corral.net import addresses, nft, ruleset, slirp
from corral.plan import NetworkPlan

Audit = Callable[[dict[str, Any]], None]


class NetworkAttachment:
    """Everything that enforces one sandbox's network policy; ``close`` removes all of it."""

    def __init__(self, pid: int, plan: NetworkPlan, audit: Audit | None) -> None:
        self.pid = pid
        self.mode = plan.mode
        self.proxy_url_inside: str | None = None
        self.ca_bundle_path: str | None = None
        self._audit = audit
        self._corral = _corral_spec(plan.corral)
        self._service_ports: tuple[tuple[str, int], ...] = ()
        self._only_services = False
        self._inputs = ruleset.RulesetInputs(plan.spec)
        self._slirp: slirp.SlirpNetwork | None = None
        self._proxy: Any = None  # corral.net.policy_proxy.PolicyProxy, imported on demand
        self._closed = False

    # -- set-up -------------------------------------------------------------------------
    def _setup(self, plan: NetworkPlan) -> None:
        if plan.mode == "none":
            return
        if plan.mode == "proxy":
            assert plan.proxy_url is not None, "proxy mode carries the proxy URL"
            port = _proxy_port(plan.proxy_url)
            self._service_ports = (("tcp", port),)
            self._only_services = True
            self.proxy_url_inside = _rewrite_proxy_url(plan.proxy_url)
        elif self._corral.hosts_given:
            from corral.net.policy_proxy import PolicyProxy

            self._proxy = PolicyProxy(self._corral, audit=self._emit)
            self._proxy.start()
            self._service_ports = (("tcp", self._proxy.port),)
            self.proxy_url_inside = f"http://{addresses.HOST_LOOPBACK_V4}:{self._proxy.port}"
        self._install(plan.spec, self._corral)
        host_loopback = bool(self._service_ports) or plan.spec.ingress.host_loopback == "allow"
        self._slirp = slirp.start(self.pid, host_loopback=host_loopback)
        for spec in self._corral.publish:
            self._slirp.publish(spec)
        self._emit({"event": "network.attach", "mode": plan.mode, "rules": self.describe()})

    def _install(self, spec: NetworkSpec, corral: CorralNetworkSpec) -> None:
        inputs = ruleset.RulesetInputs(
            spec,
            publish=corral.publish,
            service_ports=self._service_ports,
            only_services=self._only_services,
        )
        nft.run_in(self.pid, ruleset.render_table(inputs))
        self._inputs = inputs

    # -- public -------------------------------------------------------------------------
    def replace_rules(self, spec: NetworkSpec, corral_network: dict[str, Any]) -> None:
        """Swap the sandbox's rules in one atomic transaction; new connections see them."""
        self._check_open()
        corral = _corral_spec(corral_network)
        if corral.publish != self._corral.publish:
            raise PolicyError(
                "published ports cannot change on a live sandbox",
                remediation="stop and start the sandbox to publish other ports",
            )
        if corral.hosts_given != self._corral.hosts_given:
            raise PolicyError(
                "corral.network.hosts cannot be added or removed on a live sandbox",
                remediation="provision the sandbox with a (possibly empty) hosts section",
            )
        if self.mode == "proxy":
            raise PolicyError(
                "a sandbox confined to runtimeConfig.networkProxy has no rules to swap"
            )
        self._install(spec, corral)
        if self._proxy is not None:
            self._proxy.replace_rules(corral)
        self._corral = corral
        self._emit({"event": "network.rules_replaced", "rules": self.describe()})

    def describe(self) -> list[str]:
        """Every rule with the mechanism that enforces it (for the plan and ``--dry-run``)."""
        lines = [f"nftables: {r.meaning}: {r.nft}" for r in ruleset.render(self._inputs)]
        if self._slirp is not None:
            lines.append("user-mode-networking: slirp4netns, sandbox 10.0.2.100 behind 10.0.2.2")
            lines += [
                f"user-mode-networking: publish 127.0.0.1:{p.host_port}/{p.protocol} -> "
                f"sandbox port {p.sandbox_port}"
                for p in self._corral.publish
            ]
        if self.mode == "proxy":
            lines.append(f"proxy-only-network: the only way out is {self.proxy_url_inside}")
        if self._proxy is not None:
            lines += [f"policy-proxy: {line}" for line in self._proxy.describe()]
        return lines

    def close(self) -> None:
        """Stop helpers and remove what was created; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        if self._slirp is not None:
            self._slirp.close()
        if self._proxy is not None:
            self._proxy.stop()

    def __enter__(self) -> NetworkAttachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise CorralError("this network attachment is closed", code=ErrorCode.BACKEND_ERROR)

    def _emit(self, event: dict[str, Any]) -> None:
        if self._audit is not None:
            self._audit({"area": "network", "pid": self.pid, **event})


def attach(plan: NetworkPlan, *, pid: int, audit: Audit | None = None) -> NetworkAttachment:
    """Enforce ``plan`` on the network namespace of ``pid`` before the workload starts."""
    attachment = NetworkAttachment(pid, plan, audit)
    try:
        attachment._setup(plan)
    except BaseException:
        attachment.close()
        raise
    return attachment


def _corral_spec(corral_network: dict[str, Any]) -> CorralNetworkSpec:
    return build_corral_section({"network": corral_network} if corral_network else {}).network


def _proxy_port(url: str) -> int:
    port = urllib.parse.urlsplit(url.strip()).port
    if port is None:
        raise PolicyError(f"the proxy URL {url!r} names no port")
    return port


def _rewrite_proxy_url(url: str) -> str:
    """The URL the sandbox must use: the host's loopback seen through the user-mode gateway."""
    parts = urllib.parse.urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    if host in ("::1",) or ":" in host:
        raise PolicyError(
            f"the proxy {url!r} listens on IPv6 loopback, which the user-mode network "
            "does not map into the sandbox",
            remediation="run the proxy on 127.0.0.1 and name it as http://127.0.0.1:PORT",
        )
    netloc = f"{addresses.HOST_LOOPBACK_V4}:{parts.port}"
    if parts.username is not None:
        auth = parts.username + (f":{parts.password}" if parts.password is not None else "")
        netloc = f"{auth}@{netloc}"
    return urllib.parse.urlunsplit((parts.scheme.lower(), netloc, parts.path, parts.query, ""))
