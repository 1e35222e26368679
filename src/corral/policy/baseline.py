"""The minimal read-only system view every process sandbox starts from (deny-by-default)."""

from __future__ import annotations

import os

# Program and library trees: read-only, never anything under /home, /root, /var or /run.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")

# /etc is rebuilt from this allow-list: name resolution, the dynamic linker, TLS roots and
# locale/terminal data; never shadow, gshadow, sudoers, ssh host keys or machine secrets.
ETC_ENTRIES = (
    "passwd", "group", "hosts", "host.conf", "resolv.conf", "nsswitch.conf", "gai.conf",
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "timezone", "ssl",
    "ca-certificates", "ca-certificates.conf", "alternatives", "mime.types", "protocols",
    "services", "os-release", "debian_version", "bash.bashrc", "profile", "inputrc",
    "terminfo", "locale.alias", "mtab", "magic", "python3", "python3.11", "xdg",
)  # fmt: skip

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# MXC's bubblewrap backend gives exactly these two variables when `env` is omitted.
DEFAULT_ENV = {"PATH": DEFAULT_PATH, "TERM": "xterm-256color"}


def system_dirs() -> list[str]:
    """The baseline directories that exist on this host, as (resolved) paths."""
    seen: list[str] = []
    for d in SYSTEM_DIRS:
        if os.path.isdir(d) and not os.path.islink(d):
            seen.append(d)
    return seen


def system_symlinks() -> dict[str, str]:
    """Baseline entries that are symlinks on this host (merged-/usr: /bin -> usr/bin,
    /etc/mtab -> ../proc/self/mounts): recreated as the same symlinks, never resolved."""
    names = [*SYSTEM_DIRS, *(f"/etc/{n}" for n in ETC_ENTRIES)]
    return {p: os.readlink(p) for p in names if os.path.islink(p)}


def etc_entries() -> list[str]:
    """The /etc allow-list entries that exist here and are not symlinks."""
    return [
        p for p in (f"/etc/{n}" for n in ETC_ENTRIES) if os.path.exists(p) and not os.path.islink(p)
    ]
