"""Hand-written hypothesis strategies for wire requests: valid ones, and mutations of them."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import strategies as st

VERSIONS = ("0.9.0-alpha", "1.0.0", "1.1.0-alpha")
PATHS = st.sampled_from(["/usr", "/tmp", "/work/a b", "/ü", "rel", "/etc/shadow"])
CIDRS = st.sampled_from(
    [
        "10.0.0.0/8",
        "10.0.0.1/8",
        "0.0.0.0/0",
        "::/0",
        "fe80::/10",
        "192.168.1.7",
        "bad",
        "10.0.0.0/33",
    ]
)
PORT_NUMBERS = st.one_of(st.integers(1, 65535), st.sampled_from([0, 65536, -1]))

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
random_json = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)

process = st.fixed_dictionaries(
    {"commandLine": st.sampled_from(["true", "echo ü", "ls -l"])},
    optional={
        "cwd": PATHS,
        "env": st.lists(st.sampled_from(["A=1", "PATH=/bin", "B"]), max_size=2),
        "inheritDefaultEnv": st.booleans(),
        "timeout": st.integers(0, 2**32 - 1),
    },
)
filesystem = st.fixed_dictionaries(
    {},
    optional={
        "readonlyPaths": st.lists(PATHS, max_size=2),
        "readwritePaths": st.lists(PATHS, max_size=2),
        "deniedPaths": st.lists(PATHS, max_size=2),
    },
)
port = st.fixed_dictionaries(
    {},
    optional={
        "protocol": st.sampled_from(["tcp", "udp", "icmp", "any"]),
        "port": PORT_NUMBERS,
        "endPort": PORT_NUMBERS,
    },
)
rule = st.fixed_dictionaries(
    {},
    optional={
        "to": st.lists(
            st.fixed_dictionaries(
                {"cidr": CIDRS}, optional={"except": st.lists(CIDRS, max_size=2)}
            ),
            min_size=1,
            max_size=2,
        ),
        "ports": st.lists(port, min_size=1, max_size=2),
    },
)
ACTIONS = st.sampled_from(["allow", "deny"])
network = st.fixed_dictionaries(
    {},
    optional={
        "egress": st.fixed_dictionaries(
            {},
            optional={
                "default": ACTIONS,
                "allow": st.lists(rule, max_size=2),
                "deny": st.lists(rule, max_size=2),
            },
        ),
        "ingress": st.fixed_dictionaries(
            {}, optional={"default": ACTIONS, "hostLoopback": ACTIONS}
        ),
    },
)
ui = st.fixed_dictionaries(
    {},
    optional={
        "disable": st.booleans(),
        "clipboard": st.sampled_from(["none", "read", "write", "all"]),
        "injection": st.booleans(),
    },
)
runtime_config = st.fixed_dictionaries(
    {},
    optional={
        "networkProxy": st.sampled_from(
            ["http://localhost:3128", "http://127.0.0.1:8080", "http://example.com:1", "nope"]
        )
    },
)
host_rule = st.fixed_dictionaries(
    {"host": st.sampled_from(["pypi.org", "*.npmjs.org", "1.2.3.4", "a..b", "API.Example.com"])},
    optional={
        "ports": st.lists(PORT_NUMBERS, min_size=1, max_size=2),
        "methods": st.lists(st.sampled_from(["GET", "POST", "get"]), min_size=1, max_size=2),
        "paths": st.lists(st.sampled_from(["/", "/simple", "x"]), min_size=1, max_size=2),
    },
)
corral_network = st.fixed_dictionaries(
    {},
    optional={
        "publish": st.lists(
            st.fixed_dictionaries(
                {"hostPort": PORT_NUMBERS, "sandboxPort": PORT_NUMBERS},
                optional={"protocol": st.sampled_from(["tcp", "udp"])},
            ),
            max_size=2,
        ),
        "hosts": st.fixed_dictionaries(
            {},
            optional={
                "allow": st.lists(host_rule, max_size=2),
                "deny": st.lists(host_rule, max_size=1),
            },
        ),
        "tlsInterception": st.booleans(),
    },
)
corral = st.fixed_dictionaries(
    {},
    optional={
        "resources": st.fixed_dictionaries(
            {},
            optional={
                "memoryMb": st.integers(0, 2**20),
                "pids": st.integers(0, 4096),
                "cpuPercent": st.integers(0, 20000),
            },
        ),
        "network": corral_network,
        "actor": st.fixed_dictionaries(
            {"kind": st.sampled_from(["agent", "human"])},
            optional={"name": st.text(max_size=5), "session": st.text(max_size=5)},
        ),
        "protectedPaths": st.fixed_dictionaries(
            {}, optional={"add": st.lists(PATHS, max_size=2), "relax": st.lists(PATHS, max_size=2)}
        ),
        "requireKvm": st.booleans(),
    },
)


@st.composite
def one_shot(draw: st.DrawFn) -> dict[str, Any]:
    version = draw(st.sampled_from(VERSIONS))
    containments = ["process", "bubblewrap", "lxc", "isolation_session"]
    if version == "1.1.0-alpha":
        containments += ["microvm", "vm", "hyperlight"]
    request = draw(
        st.fixed_dictionaries(
            {"version": st.just(version), "process": process},
            optional={
                "containment": st.sampled_from(containments),
                "filesystem": filesystem,
                "network": network,
                "ui": ui,
                "runtimeConfig": runtime_config,
                "corral": corral,
                "_comment": random_json,
                "$schema": st.just("https://example.invalid/s.json"),
                "telemetry": st.fixed_dictionaries({}, optional={"enabled": st.booleans()}),
            },
        )
    )
    if request.get("containment") == "lxc" and draw(st.booleans()):
        request["lxc"] = {"distribution": "debian", "release": "bookworm"}
    return request


@st.composite
def lifecycle(draw: st.DrawFn) -> dict[str, Any]:
    version = draw(st.sampled_from(VERSIONS))
    phase = draw(st.sampled_from(["start", "exec", "stop", "deprovision"]))
    request: dict[str, Any] = {"version": version, "phase": phase, "sandboxId": "process:abc"}
    if phase == "exec":
        request["process"] = draw(process)
        request.update(
            draw(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "network": network,
                        "runtimeConfig": runtime_config,
                        "corral": st.fixed_dictionaries({}, optional={"network": corral_network}),
                    },
                )
            )
        )
    return request


@st.composite
def provision(draw: st.DrawFn) -> dict[str, Any]:
    version = draw(st.sampled_from(VERSIONS))
    containment = draw(st.sampled_from(["wslc", "isolation_session", "process", "bubblewrap"]))
    request: dict[str, Any] = {"version": version, "phase": "provision", "containment": containment}
    optional: dict[str, Any] = {"corral": corral}
    if containment == "isolation_session":
        request["network"] = draw(network)
    else:
        optional |= {"filesystem": filesystem, "network": network}
    if containment in ("process", "bubblewrap"):
        optional |= {"ui": ui, "runtimeConfig": runtime_config}
    request.update(draw(st.fixed_dictionaries({}, optional=optional)))
    return request


requests = st.one_of(one_shot(), lifecycle(), provision())


def _slots(value: Any, found: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every (container, key) pair inside a JSON value."""
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, item in items:
        found.append((value, key))
        _slots(item, found)
    return found


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    """A valid-looking request with one to three random edits: drop, insert, retype, null, wrap."""
    request: dict[str, Any] = copy.deepcopy(draw(requests))
    for _ in range(draw(st.integers(1, 3))):
        slots = _slots(request, [])
        if not slots:
            break
        container, key = draw(st.sampled_from(slots))
        operation = draw(st.sampled_from(["drop", "insert", "retype", "null", "wrap", "empty"]))
        if operation == "drop":
            del container[key]
        elif operation == "insert" and isinstance(container, dict):
            container[
                draw(st.sampled_from(["foo", "Process", "$schema", "_comment", "corral", "phase"]))
            ] = draw(random_json)
        elif operation == "retype":
            container[key] = draw(random_json)
        elif operation == "null":
            container[key] = None
        elif operation == "wrap":
            container[key] = [container[key]]
        else:
            container[key] = draw(st.sampled_from([[], {}, ""]))
    return request
