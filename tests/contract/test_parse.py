"""parse_request: mapping into the model, error codes, paths and messages."""

from __future__ import annotations

import json
from typing import Any

import pytest

from corral.contract import (
    SUPPORTED_VERSIONS,
    ActorSpec,
    HostRule,
    NetworkSpec,
    PeerSpec,
    PortSpec,
    PublishSpec,
    Request,
    parse_request,
)
from corral.errors import ErrorCode, RequestParseError, ValidationError

PROCESS = {"commandLine": "true"}


def one_shot(**fields: Any) -> dict[str, Any]:
    return {"version": "1.0.0", "process": dict(PROCESS), **fields}


def rejection(data: Any, **kwargs: Any) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        parse_request(data, **kwargs)
    return info.value


def test_accepts_text_bytes_and_mappings_alike() -> None:
    request = one_shot(containment="bubblewrap")
    as_text = parse_request(json.dumps(request))
    assert parse_request(json.dumps(request).encode()) == as_text
    assert parse_request(request) == as_text
    assert as_text.containment == "bubblewrap" and as_text.is_one_shot


def test_omitted_network_is_deny_all_and_recorded_as_omitted() -> None:
    request = parse_request(one_shot())
    assert request.network == NetworkSpec()
    assert request.network.egress.default == "deny" and request.network.ingress.default == "deny"
    assert request.network_given is False
    assert parse_request(one_shot(network={})).network_given is True


def test_maps_every_section_into_the_model() -> None:
    request = parse_request(
        one_shot(
            process={
                "commandLine": "ls",
                "cwd": "/w",
                "env": [],
                "inheritDefaultEnv": True,
                "timeout": 5,
            },
            filesystem={
                "readonlyPaths": ["/usr"],
                "readwritePaths": ["/w"],
                "deniedPaths": ["/w/.git"],
            },
            network={
                "egress": {
                    "default": "deny",
                    "allow": [
                        {
                            "to": [{"cidr": "10.0.0.5", "except": ["10.0.0.5/32"]}],
                            "ports": [{"protocol": "tcp", "port": 80, "endPort": 81}],
                        }
                    ],
                    "deny": [{}],
                },
                "ingress": {"hostLoopback": "allow"},
            },
            runtimeConfig={"networkProxy": "http://localhost:3128"},
            ui={"disable": False, "clipboard": "read"},
            containerId="c",
        )
    )
    assert request.process is not None
    assert request.process.env == () and request.process.inherit_default_env
    assert request.process.timeout_ms == 5 and request.process.cwd == "/w"
    assert request.filesystem.denied_paths == ("/w/.git",)
    rule = request.network.egress.allow[0]
    assert rule.to == (PeerSpec("10.0.0.5/32", ("10.0.0.5/32",)),)  # canonical CIDR text
    assert rule.ports == (PortSpec("tcp", 80, 81),)
    assert (
        request.network.egress.deny[0].to is None and request.network.egress.deny[0].ports is None
    )
    assert (
        request.network.ingress.host_loopback == "allow"
        and request.network.ingress.default == "deny"
    )
    assert request.network_proxy == "http://localhost:3128"
    assert request.ui.clipboard == "read" and not request.ui.disable and not request.ui.injection
    assert request.container_id == "c"


def test_env_omitted_is_none_not_empty() -> None:
    request = parse_request(one_shot())
    assert request.process is not None and request.process.env is None


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"process": {"commandLine": "true", "foo": 1}}, "process.foo"),
        ({"process": {"commandLine": ""}}, "process.commandLine"),
        ({"process": {"commandLine": "true", "cwd": None}}, "process.cwd"),
        (
            {"network": {"egress": {"allow": [{"to": [{"cidr": "10.0.0.1/8"}]}]}}},
            "network.egress.allow[0].to[0].cidr",
        ),
        ({"network": {"egress": {"allow": [{"to": []}]}}}, "network.egress.allow[0].to"),
        (
            {"network": {"egress": {"allow": [{"ports": [{"protocol": "icmp", "port": 1}]}]}}},
            "network.egress.allow[0].ports[0]",
        ),
        (
            {"network": {"egress": {"allow": [{"ports": [{"port": 9, "endPort": 8}]}]}}},
            "network.egress.allow[0].ports[0].endPort",
        ),
        (
            {"network": {"egress": {"allow": [{"ports": [{"endPort": 8}]}]}}},
            "network.egress.allow[0].ports[0].endPort",
        ),
        (
            {"network": {"egress": {"allow": [{"ports": [{"port": 65536}]}]}}},
            "network.egress.allow[0].ports[0].port",
        ),
        ({"filesystem": {"deniedPaths": ["/a", ""]}}, "filesystem.deniedPaths[1]"),
        ({"lxc": {"distribution": "a", "release": "b"}}, "lxc"),
        (
            {"runtimeConfig": {"networkProxy": "http://example.com:8080"}},
            "runtimeConfig.networkProxy",
        ),
    ],
)
def test_violations_name_their_path(fields: dict[str, Any], path: str) -> None:
    error = rejection(one_shot(**fields))
    assert error.code == ErrorCode.MALFORMED_REQUEST
    assert error.details["path"] == path
    assert error.message.startswith(path)


def test_unknown_field_message_says_what_and_how() -> None:
    error = rejection(one_shot(process={"commandLine": "x", "comandLine": "y"}))
    assert "unknown field 'comandLine'" in error.message
    assert "did you mean 'commandLine'" in error.message
    assert "Remove it" in error.message


def test_missing_version_is_required_unless_filled() -> None:
    error = rejection({"process": PROCESS})
    assert error.details["path"] == "version" and '"version": "1.0.0"' in error.message
    filled = parse_request({"process": PROCESS}, fill_version=True)
    assert filled.version == "1.0.0" and filled.raw["version"] == "1.0.0"
    assert (
        parse_request(one_shot(version="0.9.0-alpha"), fill_version=True).version == "0.9.0-alpha"
    )


def test_every_supported_version_parses() -> None:
    assert SUPPORTED_VERSIONS == ("0.9.0-alpha", "1.0.0", "1.1.0-alpha")
    for version in SUPPORTED_VERSIONS:
        assert parse_request(one_shot(version=version)).version == version
    assert rejection(one_shot(version="2.0.0")).details["path"] == "version"


def test_unknown_containment_and_phase_have_their_own_codes() -> None:
    assert rejection(one_shot(containment="docker")).code == ErrorCode.UNSUPPORTED_CONTAINMENT
    assert rejection(one_shot(containment=3)).code == ErrorCode.MALFORMED_REQUEST
    error = rejection({"version": "1.0.0", "phase": "pause", "sandboxId": "x"})
    assert error.code == ErrorCode.UNSUPPORTED_PHASE and error.details["path"] == "phase"
    error = rejection({"version": "1.0.0", "phase": "provision", "containment": "lxc"})
    assert error.code == ErrorCode.UNSUPPORTED_CONTAINMENT


@pytest.mark.parametrize("containment", ["vm", "microvm", "hyperlight", "windows_sandbox"])
def test_experimental_containments_need_the_switch(containment: str) -> None:
    request = one_shot(version="1.1.0-alpha", containment=containment)
    error = rejection(request)
    assert error.code == ErrorCode.UNSUPPORTED_CONTAINMENT
    assert (
        f"the '{containment}' backend is experimental; enable experimental features to use it"
        in error.message
    )
    assert parse_request(request, experimental=True).containment == containment


def test_legacy_aliases_are_folded() -> None:
    request = parse_request(
        one_shot(
            version="0.9.0-alpha", containment="appcontainer", appContainer={"learningMode": True}
        )
    )
    assert request.containment == "processcontainer"
    assert (
        parse_request(one_shot(version="0.9.0-alpha", containment="macos_sandbox")).containment
        == "seatbelt"
    )
    assert rejection(one_shot(containment="appcontainer")).code == ErrorCode.UNSUPPORTED_CONTAINMENT


def test_backend_section_message_names_the_rule() -> None:
    error = rejection(one_shot(containment="lxc", seatbelt={}))
    assert "Multiple containment backends configured" in error.message
    assert error.details == {"path": "seatbelt", "rule": "backend_section"}


@pytest.mark.parametrize("phase", ["start", "stop", "deprovision"])
def test_lifecycle_phases(phase: str) -> None:
    request = parse_request({"version": "1.0.0", "phase": phase, "sandboxId": "process:abc"})
    assert (
        request.phase == phase and request.sandbox_id == "process:abc" and not request.is_one_shot
    )
    assert rejection({"version": "1.0.0", "phase": phase}).details["path"] == "sandboxId"
    for field in ("containment", "filesystem", "process", "network", "ui", "corral"):
        error = rejection({"version": "1.0.0", "phase": phase, "sandboxId": "x", field: {}})
        assert error.details["path"] == field


def test_exec_requires_process_and_takes_network_values() -> None:
    base = {"version": "1.0.0", "phase": "exec", "sandboxId": "x"}
    assert rejection(base).details["path"] == "process"
    request = parse_request(
        {**base, "process": PROCESS, "network": {"egress": {"default": "allow"}}}
    )
    assert request.network.egress.default == "allow" and request.network_given
    for field in ("containment", "filesystem", "ui"):
        assert rejection({**base, "process": PROCESS, field: {}}).details["path"] == field


def test_provision_shapes() -> None:
    base = {"version": "1.0.0", "phase": "provision"}
    assert rejection(base).details["path"] == "containment"
    wslc = parse_request({**base, "containment": "wslc", "wslc": {"provision": {"image": "i"}}})
    assert wslc.containment == "wslc" and wslc.process is None
    assert (
        rejection({**base, "containment": "wslc", "process": PROCESS}).details["path"] == "process"
    )
    # isolation_session: network required; Corral accepts a restricted one too.
    assert rejection({**base, "containment": "isolation_session"}).details["path"] == "network"
    restricted = parse_request({**base, "containment": "isolation_session", "network": {}})
    assert restricted.network.egress.default == "deny"
    # Corral's own provisionable containments.
    process = parse_request(
        {**base, "containment": "process", "ui": {"disable": True}, "corral": {"requireKvm": False}}
    )
    assert process.containment == "process"
    microvm = {**base, "version": "1.1.0-alpha", "containment": "microvm"}
    assert rejection(microvm).code == ErrorCode.UNSUPPORTED_CONTAINMENT
    assert parse_request(microvm, experimental=True).containment == "microvm"
    assert (
        rejection({**base, "containment": "microvm"}, experimental=True).code
        == ErrorCode.UNSUPPORTED_CONTAINMENT
    )


def test_corral_section_maps_to_typed_model() -> None:
    section = {
        "resources": {"memoryMb": 512, "pids": 64, "cpuPercent": 150},
        "network": {
            "publish": [
                {"hostPort": 8080, "sandboxPort": 80},
                {"hostPort": 8080, "sandboxPort": 53, "protocol": "udp"},
            ],
            "hosts": {
                "allow": [{"host": "*.NPMjs.org", "methods": ["GET", "HEAD"], "paths": ["/pkg"]}],
                "deny": [{"host": "evil.example.com", "ports": [443]}],
            },
            "tlsInterception": True,
        },
        "actor": {"kind": "human", "name": "ana"},
        "protectedPaths": {"add": ["/srv/secrets"], "relax": ["/root/.ssh"]},
        "requireKvm": True,
    }
    corral = parse_request(one_shot(corral=section)).corral
    assert (corral.resources.memory_mb, corral.resources.pids, corral.resources.cpu_percent) == (
        512,
        64,
        150,
    )
    assert corral.network.publish == (PublishSpec(8080, 80, "tcp"), PublishSpec(8080, 53, "udp"))
    assert corral.network.hosts.allow == (
        HostRule("*.npmjs.org", (80, 443), ("GET", "HEAD"), ("/pkg",)),
    )
    assert corral.network.hosts.deny == (HostRule("evil.example.com", (443,)),)
    assert corral.network.hosts_given and corral.network.tls_interception
    assert corral.actor == ActorSpec("human", "ana", None)
    assert corral.protected_paths.add == ("/srv/secrets",) and corral.require_kvm
    assert corral.raw == section
    # Absent: a pure MXC request with the defaults.
    plain = parse_request(one_shot())
    assert (
        plain.corral.raw == {}
        and plain.corral.actor is None
        and not plain.corral.network.hosts_given
    )


@pytest.mark.parametrize(
    ("section", "path"),
    [
        ({"resources": {"memoryMb": 3}}, "corral.resources.memoryMb"),
        ({"resources": {"pids": 0}}, "corral.resources.pids"),
        ({"resources": {"cpuPercent": 10001}}, "corral.resources.cpuPercent"),
        ({"resources": {"cpuPercent": 1.0}}, "corral.resources.cpuPercent"),
        ({"resources": None}, "corral.resources"),
        ({"resouces": {}}, "corral.resouces"),
        (
            {"network": {"publish": [{"hostPort": 0, "sandboxPort": 1}]}},
            "corral.network.publish[0].hostPort",
        ),
        ({"network": {"publish": [{"hostPort": 1}]}}, "corral.network.publish[0].sandboxPort"),
        (
            {"network": {"publish": [{"hostPort": 1, "sandboxPort": 1, "protocol": "sctp"}]}},
            "corral.network.publish[0].protocol",
        ),
        (
            {
                "network": {
                    "publish": [
                        {"hostPort": 9, "sandboxPort": 1},
                        {"hostPort": 9, "sandboxPort": 2},
                    ]
                }
            },
            "corral.network.publish[1].hostPort",
        ),
        (
            {"network": {"hosts": {"allow": [{"host": "1.2.3.4"}]}}},
            "corral.network.hosts.allow[0].host",
        ),
        (
            {"network": {"hosts": {"allow": [{"host": "a..b"}]}}},
            "corral.network.hosts.allow[0].host",
        ),
        ({"network": {"hosts": {"allow": [{"host": "*"}]}}}, "corral.network.hosts.allow[0].host"),
        (
            {"network": {"hosts": {"allow": [{"host": "-a.com"}]}}},
            "corral.network.hosts.allow[0].host",
        ),
        (
            {"network": {"hosts": {"allow": [{"host": "a.com/x"}]}}},
            "corral.network.hosts.allow[0].host",
        ),
        (
            {"network": {"hosts": {"allow": [{"host": ("a" * 60 + ".") * 5 + "com"}]}}},
            "corral.network.hosts.allow[0].host",
        ),
        (
            {"network": {"hosts": {"deny": [{"host": "a.com", "ports": []}]}}},
            "corral.network.hosts.deny[0].ports",
        ),
        (
            {"network": {"hosts": {"deny": [{"host": "a.com", "ports": [70000]}]}}},
            "corral.network.hosts.deny[0].ports[0]",
        ),
        (
            {"network": {"hosts": {"deny": [{"host": "a.com", "methods": ["get"]}]}}},
            "corral.network.hosts.deny[0].methods[0]",
        ),
        (
            {"network": {"hosts": {"deny": [{"host": "a.com", "paths": ["x"]}]}}},
            "corral.network.hosts.deny[0].paths[0]",
        ),
        ({"network": {"hosts": {"deny": [{"ports": [1]}]}}}, "corral.network.hosts.deny[0].host"),
        ({"network": {"tlsInterception": "yes"}}, "corral.network.tlsInterception"),
        ({"actor": {"name": "x"}}, "corral.actor.kind"),
        ({"actor": {"kind": "robot"}}, "corral.actor.kind"),
        ({"protectedPaths": {"add": ["relative"]}}, "corral.protectedPaths.add[0]"),
        ({"requireKvm": None}, "corral.requireKvm"),
    ],
)
def test_corral_section_is_strict(section: dict[str, Any], path: str) -> None:
    error = rejection(one_shot(corral=section))
    assert error.details["path"] == path
    assert error.code == ErrorCode.MALFORMED_REQUEST


def test_corral_in_exec_takes_network_only() -> None:
    base = {"version": "1.0.0", "phase": "exec", "sandboxId": "x", "process": PROCESS}
    hosts = {"network": {"hosts": {"allow": [{"host": "pypi.org"}]}}}
    assert parse_request({**base, "corral": hosts}).corral.network.hosts.allow[0].host == "pypi.org"
    assert rejection({**base, "corral": {"resources": {}}}).details["path"] == "corral.resources"


@pytest.mark.parametrize(
    "data",
    [
        b"\xff{}",
        "\ufeff{}",
        "nope",
        "[1]",
        "null",
        "",
        '{"a":1} {}',
        '{"a":NaN}',
        b'{"v":"\\ud800"}',
        42,
    ],
)
def test_unreadable_input_is_a_parse_error(data: Any) -> None:
    with pytest.raises(RequestParseError) as info:
        parse_request(data)
    assert info.value.code == ErrorCode.MALFORMED_REQUEST


def test_duplicate_keys_are_refused_where_they_are() -> None:
    text = '{"version":"1.0.0","process":{"commandLine":"a","commandLine":"b"}}'
    assert rejection(text).details == {"path": "process.commandLine", "rule": "duplicate_key"}
    # ...but not inside the free-form _comment, which MXC ignores.
    assert isinstance(
        parse_request('{"version":"1.0.0","process":{"commandLine":"a"},"_comment":{"k":1,"k":2}}'),
        Request,
    )


def test_huge_and_float_numbers_are_refused_not_crashed() -> None:
    for number in ("1" * 5000, "1e400", "-0", "100.0"):
        text = '{"version":"1.0.0","process":{"commandLine":"a","timeout":' + number + "}}"
        assert rejection(text).details["path"] == "process.timeout"
