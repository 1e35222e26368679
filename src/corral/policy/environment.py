"""The workload's environment and working directory, with MXC's semantics."""

from __future__ import annotations

import os

from corral.contract.model import ProcessSpec
from corral.errors import PolicyError
from corral.policy.baseline import DEFAULT_ENV
from corral.policy.filesystem import FilesystemPolicy

# Proxy variables are replaced, never inherited, when the sandbox is proxy-only.
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "ftp_proxy", "no_proxy")


def proxy_environment(url: str) -> dict[str, str]:
    """``url`` as the proxy in every spelling tools read (http, https, all; both cases)."""
    return {spelling: url for name in PROXY_VARIABLES[:3] for spelling in (name, name.upper())}


def build_environment(process: ProcessSpec, *, proxy_url: str | None = None) -> dict[str, str]:
    """Omitted env: the backend default; given: verbatim, or layered on the default when
    ``inheritDefaultEnv`` is set."""
    env: dict[str, str] = {}
    if process.env is None or process.inherit_default_env:
        env.update(DEFAULT_ENV)
    for item in process.env or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PolicyError(
                f"environment entry {item!r} is not KEY=VALUE",
                details={"path": "process.env"},
                remediation='write each entry as "NAME=value"',
            )
        env[key] = value
    if proxy_url is not None:
        for name in PROXY_VARIABLES:
            env.pop(name, None)
            env.pop(name.upper(), None)
        for name in PROXY_VARIABLES[:4]:
            env[name] = env[name.upper()] = proxy_url
    return env


def choose_cwd(process: ProcessSpec, fs: FilesystemPolicy) -> str:
    """Requested cwd (must be visible in the sandbox), else the first read-write grant, else
    the first read-only grant, else /."""
    if process.cwd is not None:
        real = os.path.realpath(process.cwd)
        access = "ro" if real == "/" else fs.access_of(real)  # the sandbox's root always exists
        if access in (None, "deny"):
            raise PolicyError(
                f"working directory {process.cwd!r} is not visible inside the sandbox",
                details={"path": "process.cwd"},
                remediation="grant it (readonlyPaths or readwritePaths) or choose a granted cwd",
            )
        return process.cwd
    for wanted in ("rw", "ro"):
        for entry in fs.entries:
            if entry.origin == "request" and entry.access == wanted and entry.is_dir:
                return entry.requested
    return "/"
