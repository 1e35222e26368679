"""Attach a sandbox's network namespace to its policy: nftables rules, user-mode networking,
published ports and Corral's policy proxy, all owned by one :class:`NetworkAttachment`."""

from __future__ import annotations

import os
import socket
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from corral.contract.extensions import build_corral_section
from corral.contract.model import CorralNetworkSpec, NetworkSpec
from corral.errors import CorralError, ErrorCode, PolicyError
from corral.net import addresses, nft, ruleset, slirp
from corral.plan import NetworkPlan

Audit = Callable[[dict[str, Any]], None]


class NetworkAttachment:
    """Everything that enforces one sandbox's network policy; ``close`` removes all of it."""

    def __init__(
        self,
        pid: int,
        plan: NetworkPlan,
        audit: Audit | None,
        *,
        proxy_options: dict[str, Any] | None = None,
        listener: socket.socket | None = None,
    ) -> None:
        self.pid = pid
        self._listener = listener  # the policy proxy's, in the sandbox's namespace
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
        self._proxy_options = proxy_options or {}  # tests only: resolver, upstream trust
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

            self._proxy = PolicyProxy(
                self._corral, audit=self._emit, server=self._listener, **self._proxy_options
            )
            self._listener = None  # the proxy owns (and closes) it now
            self._proxy.start()
            self.ca_bundle_path = self._proxy.ca_bundle_path
            if self._proxy.inside_sandbox:
                # On the sandbox's own loopback: only the DNS stub is on the host's.
                self._service_ports = _dns_stub_ports(self._proxy.dns_port)
                self.proxy_url_inside = f"http://127.0.0.1:{self._proxy.port}"
            else:
                self._service_ports = _policy_proxy_ports(self._proxy.port, self._proxy.dns_port)
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
            dns_stub_port=None if self._proxy is None else self._proxy.dns_port,
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
        if corral.tls_interception != self._corral.tls_interception:
            raise PolicyError(
                "corral.network.tlsInterception cannot change on a live sandbox: its CA is "
                "placed in the sandbox's trust store at start",
                remediation="stop and start the sandbox with the other setting",
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
            lines.append(
                "user-mode-networking: slirp4netns, sandbox "
                f"{addresses.GUEST_V4} and {addresses.GUEST_V6} behind "
                f"{addresses.HOST_LOOPBACK_V4} and {addresses.HOST_LOOPBACK_V6}"
            )
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
        if self._listener is not None:  # set up failed before the proxy took it
            self._listener.close()

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


def attach(
    plan: NetworkPlan,
    *,
    pid: int,
    audit: Audit | None = None,
    proxy_options: dict[str, Any] | None = None,
    listener: socket.socket | None = None,
) -> NetworkAttachment:
    """Enforce ``plan`` on the network namespace of ``pid`` before the workload starts.
    ``proxy_options`` are extra PolicyProxy arguments, for tests only (resolver, trust).
    ``listener``: a listening TCP socket on the loopback of the sandbox's own namespace for
    the policy proxy (see :func:`wants_policy_proxy`); without one it listens on the host's."""
    attachment = NetworkAttachment(pid, plan, audit, proxy_options=proxy_options, listener=listener)
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


@dataclass(frozen=True)
class DetachedNetwork:
    """What a long-lived sandbox's start must hand its workload."""

    proxy_url_inside: str | None  # the proxy to name in the environment (10.0.2.2:PORT)
    ca_bundle_path: str | None  # TLS interception: bind over the system bundle inside


def attach_detached(
    plan: NetworkPlan,
    *,
    pid: int,
    exit_fd: int,
    workdir: str,
    audit: Audit | None = None,
    sandbox: str | None = None,
    audit_log: str | None = None,
    proxy_options: dict[str, Any] | None = None,
) -> DetachedNetwork:
    """Enforce ``plan`` on a sandbox that outlives the caller (a lifecycle supervisor).

    Rules and published ports are installed now; slirp4netns and, for hostname rules, the
    policy proxy (a process of its own, ``proxy_service``) are tied to ``exit_fd`` (the read
    end of a pipe whose write end the supervisor holds), so they die with the sandbox, not
    with the caller. ``workdir`` (created here, 0700) holds their sockets and logs. The proxy
    audits to ``audit_log`` as sandbox ``sandbox``; ``proxy_options`` are for tests only
    (see :func:`proxy_service.start`). Its host-loopback link is always up and nftables alone
    decides ``ingress.hostLoopback``, so :func:`replace_rules_in` can flip it later."""
    corral = _corral_spec(plan.corral)
    attachment = NetworkAttachment(pid, plan, audit)
    os.mkdir(workdir, 0o700)
    try:
        if plan.mode == "proxy":
            assert plan.proxy_url is not None, "proxy mode carries the proxy URL"
            attachment._service_ports = (("tcp", _proxy_port(plan.proxy_url)),)
            attachment._only_services = True
            attachment.proxy_url_inside = _rewrite_proxy_url(plan.proxy_url)
        elif corral.hosts_given:
            from corral.net import proxy_service

            service = proxy_service.start(
                plan.corral, exit_fd=exit_fd, workdir=workdir, sandbox=sandbox,
                audit_log=audit_log, pid=pid, options=proxy_options,
            )  # fmt: skip
            attachment._proxy = service
            attachment._service_ports = _policy_proxy_ports(service.port, service.dns_port)
            attachment.ca_bundle_path = service.ca_bundle_path
            attachment.proxy_url_inside = f"http://{addresses.HOST_LOOPBACK_V4}:{service.port}"
        attachment._install(plan.spec, corral)
        attachment._slirp = slirp.start(
            pid, host_loopback=True, exit_fd=exit_fd, workdir=os.path.join(workdir, "slirp")
        )
        for spec in corral.publish:
            attachment._slirp.publish(spec)
    except BaseException:
        attachment.close()
        raise
    attachment._emit({"event": "network.attach", "mode": plan.mode, "rules": attachment.describe()})
    return DetachedNetwork(attachment.proxy_url_inside, attachment.ca_bundle_path)


def replace_rules_in(
    pid: int, spec: NetworkSpec, corral_network: dict[str, Any], *, workdir: str | None = None
) -> list[str]:
    """Replace the rules of the sandbox whose network namespace ``pid`` is in, from any
    process allowed to enter it: the whole table in one nft transaction, so new connections
    see either the old rules or the new ones, and hostname rules swapped in its policy proxy
    (found in ``workdir``, as :func:`attach_detached` left it) before. Returns the rules
    installed. The caller keeps published ports, hosts and tlsInterception unchanged."""
    from corral.net import proxy_service

    corral = _corral_spec(corral_network)
    service = None if workdir is None else proxy_service.find(workdir)
    if corral.hosts_given != (service is not None):
        raise PolicyError(
            "corral.network.hosts cannot be added or removed on a running sandbox",
            remediation="stop it, set the policy, and start it again",
        )
    proxy_rules: list[str] = []
    inputs = ruleset.RulesetInputs(spec, publish=corral.publish)
    if service is not None and workdir is not None:
        proxy_rules = proxy_service.replace_rules(workdir, corral_network)
        inputs = ruleset.RulesetInputs(
            spec,
            publish=corral.publish,
            service_ports=_policy_proxy_ports(service.port, service.dns_port),
            dns_stub_port=service.dns_port,
        )
    nft.run_in(pid, ruleset.render_table(inputs))
    lines = [f"nftables: {r.meaning}: {r.nft}" for r in ruleset.render(inputs)]
    return lines + [f"policy-proxy: {line}" for line in proxy_rules]


def _policy_proxy_ports(port: int, dns_port: int) -> tuple[tuple[str, int], ...]:
    """What the sandbox may reach on the host's loopback: the proxy and its DNS stub."""
    return (("tcp", port), *_dns_stub_ports(dns_port))


def _dns_stub_ports(dns_port: int) -> tuple[tuple[str, int], ...]:
    return (("udp", dns_port), ("tcp", dns_port))


def wants_policy_proxy(plan: NetworkPlan) -> bool:
    """Whether :func:`attach` runs Corral's policy proxy for ``plan`` (hostname rules)."""
    return plan.mode not in ("none", "proxy") and _corral_spec(plan.corral).hosts_given


def proxy_url_inside(url: str) -> str:
    """What ``runtimeConfig.networkProxy`` becomes inside the sandbox (through 10.0.2.2)."""
    return _rewrite_proxy_url(url)
