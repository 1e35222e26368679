"""A short-lived on-disk cache of backend probes, so each `corral` command does not re-probe
the host (tens of milliseconds). Keyed by boot, user and Corral version; a stale or damaged
entry is simply probed again. A cached claim can only make Corral *try* a mechanism, which
then fails closed if the host no longer has it."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable

from corral.backends.base import BackendInfo

TTL_SECONDS = 60.0


def cache_dir() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if os.geteuid() == 0:
        return "/run/corral/probe"
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "corral", "probe")
    return os.path.join(tempfile.gettempdir(), f"corral-{os.geteuid()}", "probe")


def cached_probe(name: str, compute: Callable[[], BackendInfo]) -> BackendInfo:
    path = os.path.join(cache_dir(), f"{name}.json")
    key = _key()
    try:
        with open(path) as f:
            entry = json.load(f)
        if entry["key"] == key and time.time() - entry["time"] < TTL_SECONDS:
            i = entry["info"]
            return BackendInfo(
                i["name"],
                i["available"],
                i["reason"],
                dict(i["mechanisms"]),
                tuple(i["containments"]),
            )
    except (OSError, ValueError, KeyError, TypeError):
        pass
    info = compute()
    _store(path, {"key": key, "time": time.time(), "info": _fields(info)})
    return info


def _fields(info: BackendInfo) -> dict[str, object]:
    return {
        "name": info.name,
        "available": info.available,
        "reason": info.reason,
        "mechanisms": info.mechanisms,
        "containments": list(info.containments),
    }


def _key() -> str:
    from corral import __version__

    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    return f"{boot}:{os.geteuid()}:{__version__}:{os.uname().release}"


def _store(path: str, entry: dict[str, object]) -> None:
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path))
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f)
        os.replace(tmp, path)
    except OSError:
        pass  # caching is an optimisation only
