"""What network enforcement this host really offers, found by trying it (a few ms)."""

from __future__ import annotations

import importlib.util
import os
import shutil

from corral.errors import CorralError
from corral.net import nft
from corral.net.nsexec import run_in_fresh_netns

_TRIAL = "table inet corral_probe {\n chain c {\n  type filter hook output priority 0;\n }\n}\n"


def probe() -> dict[str, str]:
    """Mechanism name -> detail, only for mechanisms that work here."""
    found: dict[str, str] = {}
    if _nftables_works():
        found["nftables"] = "one inet table per sandbox, inside its network namespace"
    umn = _user_mode_networking()
    if umn:
        found["user-mode-networking"] = umn
    if "nftables" in found and umn:
        found["proxy-only-network"] = "nftables: only the proxy's port on the host loopback"
        if importlib.util.find_spec("h11") is not None:
            found["policy-proxy"] = "Corral's HTTP(S) proxy: hostnames, ports, methods, paths"
    return found


def _nftables_works() -> bool:
    try:
        nft.library()
        run_in_fresh_netns(lambda: nft.run_here(_TRIAL), timeout=5.0)
    except CorralError:
        return False
    return True


def _user_mode_networking() -> str | None:
    path = shutil.which("slirp4netns")
    if path is None:
        return None
    try:
        os.close(os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return None
    return f"slirp4netns ({path})"
